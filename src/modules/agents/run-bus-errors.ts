import { ConflictError, ServiceUnavailableError } from '../../core/errors.js';

/**
 * An append the event log refused: the run has ended (a final event is in the log, or in the batch
 * before other events), or another writer has appended since this one last did (`stale`: this
 * writer no longer holds the run; a writer that resumes a run calls `lastSeq` first).
 */
export class RunEventsRefusedError extends ConflictError {
  constructor(
    readonly runId: string,
    readonly reason: 'ended' | 'stale',
    /** The highest seq in the log when the append was refused. */
    readonly lastSeq: number,
  ) {
    super(reason === 'ended' ? 'The run has ended' : 'Another writer appended events to this run');
  }
}

/** The run bus's store (Redis) cannot be reached; the caller fails fast instead of waiting. */
export class RunBusUnavailableError extends ServiceUnavailableError {
  constructor(options?: { cause?: unknown }) {
    super('Run events are unavailable, try again later');
    if (options?.cause !== undefined) this.cause = options.cause;
  }
}
