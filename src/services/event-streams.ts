import type { ServerResponse } from 'node:http';

import { TooManyRequestsError } from '../core/errors.js';
import type { EventStreamMetrics } from '../core/metrics.js';

/** What a client refused a stream is told to wait before it tries again. */
const STREAM_REFUSED_RETRY_AFTER_SECONDS = 5;

/**
 * The long-lived readers of run events one user holds open on this process (`GET /runs/{id}/events`,
 * streamed `agent:` completions on /v1), at most RUN_EVENTS_MAX_STREAMS_PER_USER at once. Each holds
 * a socket, a keep-alive timer and a reader of the run's log that buffers up to ~2,000 events: without
 * a cap, one user opening thousands (or reconnecting in a loop without closing) could exhaust the
 * node's memory and sockets. Per process, as the streams' costs are: a user may hold that many on
 * each node behind a load balancer.
 */
export class EventStreamSlots {
  private readonly open = new Map<string, number>();

  constructor(
    private readonly max: number,
    private readonly metrics: EventStreamMetrics,
  ) {}

  /**
   * Counts a stream of `userId`'s on `raw` from now until its socket closes, whichever way it
   * ends (the run's end, the client leaving, a stalled reader cut off, the server closing, an
   * error, an answer that is no stream at all: a 404, a HEAD). 429 with a retry-after when the
   * user holds RUN_EVENTS_MAX_STREAMS_PER_USER already.
   */
  hold(userId: string, raw: ServerResponse): void {
    const held = this.open.get(userId) ?? 0;
    if (held >= this.max) {
      this.metrics.refused.inc();
      throw new TooManyRequestsError(
        STREAM_REFUSED_RETRY_AFTER_SECONDS,
        `Too many run event streams open: at most ${this.max} at once per user on this server (RUN_EVENTS_MAX_STREAMS_PER_USER); close one before opening another`,
      );
    }
    this.open.set(userId, held + 1);
    this.metrics.open.inc();
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      this.metrics.open.dec();
      const left = (this.open.get(userId) ?? 1) - 1;
      if (left > 0) this.open.set(userId, left);
      else this.open.delete(userId);
    };
    // A client gone before its stream was counted (while it was authenticated) closed its socket already: no 'close' comes again.
    if (raw.closed) release();
    else raw.once('close', release);
  }

  /** A stream whose reader took nothing for too long was cut off (its place is given back when its socket closes). */
  cutOffStalled(): void {
    this.metrics.stalled.inc();
  }

  /** The streams `userId` holds open on this process now. */
  heldBy(userId: string): number {
    return this.open.get(userId) ?? 0;
  }
}
