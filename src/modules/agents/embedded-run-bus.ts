/**
 * The embedded implementations of the run bus (run-bus.ts): the event log in the database
 * (`run_events`) with in-process notification, and cancels through an in-process registry. One
 * process holds the data directory (embedded mode), so every writer and reader of a run is here.
 */
import { and, asc, desc, eq, gt, inArray, lt, sql } from 'drizzle-orm';

import type { Db } from '../../core/db.js';
import type { Logger } from '../../core/logger.js';

import { runEvents, runs } from '../../models/index.js';

import { FINAL_RUN_EVENTS, type NewRunEvent, type RunEvent, type RunEventLog, type RunEventName, type RunSignals } from './run-bus.js';

/** Appending after a run's final event, or a seq another writer already stored. */
export class RunLogClosedError extends Error {
  constructor(readonly runId: string) {
    super(`run ${runId} has ended: its event log takes no more events`);
  }
}

/** Stored events read per query while a reader catches up. */
const REPLAY_PAGE = 500;
/** Streamed text pending beyond this many characters is written at once rather than on the timer. */
const FLUSH_CHARS = 4_096;
/** Rows per INSERT when a flush writes many events. */
const INSERT_BATCH = 500;
/**
 * Live events a reader may have waiting (a slow SSE client). Beyond it the reader drops them and
 * catches up from the log instead, so its memory stays bounded and the writer never waits for it.
 */
export const READER_BUFFER_EVENTS = 2_000;

type Listener = (events: readonly RunEvent[]) => void;

/** One run's log as this process sees it: the writer's next seq, events not yet stored, readers. */
interface RunLogState {
  /** The next seq to give; null until a writer here loaded it from the database. */
  nextSeq: number | null;
  ended: boolean;
  /** Events given a seq (and sent to live readers) but not yet stored, in seq order. */
  pending: RunEvent[];
  pendingChars: number;
  listeners: Set<Listener>;
  /** Appends run one after the other. */
  tail: Promise<unknown>;
  flushing: Promise<void> | null;
  flushTimer: NodeJS.Timeout | undefined;
}

const isFinal = (event: RunEvent) => FINAL_RUN_EVENTS.has(event.event);
const deltaChars = (event: RunEvent) => (event.event === 'message.delta' && typeof event.data.delta === 'string' ? event.data.delta.length : 0);

/**
 * The database event log. `message.delta` events get their seq and reach live readers at once but
 * are stored in batches (at most every RUN_EVENTS_FLUSH_MS, or FLUSH_CHARS of text): PGlite is not
 * written per token, and a reader that replays later gets the very same events and seqs. Any other
 * event is stored, with every delta before it, before `append` returns.
 */
export class DatabaseRunEventLog implements RunEventLog {
  private readonly states = new Map<string, RunLogState>();
  private closed = false;

  constructor(
    private readonly db: Db,
    private readonly log: Logger,
    private readonly flushMs: number,
  ) {}

  private stateOf(runId: string): RunLogState {
    let state = this.states.get(runId);
    if (!state) {
      state = { nextSeq: null, ended: false, pending: [], pendingChars: 0, listeners: new Set(), tail: Promise.resolve(), flushing: null, flushTimer: undefined };
      this.states.set(runId, state);
    }
    return state;
  }

  /** Drops what this process keeps of a run once everything is stored and nobody listens. */
  private forgetIfIdle(runId: string, state: RunLogState): void {
    if (state.pending.length || state.listeners.size || state.flushing) return;
    // A writer's seq is kept until its run ends; a reader-only state can go at once.
    if (state.nextSeq !== null && !state.ended) return;
    if (this.states.get(runId) === state) this.states.delete(runId);
  }

  private async storedLast(runId: string): Promise<{ seq: number; event: RunEventName } | undefined> {
    const [row] = await this.db.select({ seq: runEvents.seq, event: runEvents.event }).from(runEvents).where(eq(runEvents.run_id, runId)).orderBy(desc(runEvents.seq)).limit(1);
    return row && { seq: row.seq, event: row.event as RunEventName };
  }

  append(runId: string, events: readonly NewRunEvent[]): Promise<RunEvent[]> {
    if (this.closed) return Promise.reject(new Error('run event log closed'));
    const state = this.stateOf(runId);
    const appended = state.tail.then(async () => {
      if (state.nextSeq === null && events[0]?.event === 'run.queued') {
        // A run's first event (its start writes it): nothing to look up. Were it not, the insert
        // would collide with the stored seq 1 (the primary key) rather than write a duplicate.
        state.nextSeq = 1;
      } else if (state.nextSeq === null) {
        const last = await this.storedLast(runId);
        state.nextSeq = (last?.seq ?? 0) + 1;
        state.ended = last !== undefined && FINAL_RUN_EVENTS.has(last.event);
      }
      if (state.ended) throw new RunLogClosedError(runId);
      const stamped = events.map((e): RunEvent => {
        const seq = state.nextSeq!++;
        return { seq, event: e.event, data: { ...e.data, run_id: runId, seq } };
      });
      state.pending.push(...stamped);
      for (const event of stamped) state.pendingChars += deltaChars(event);
      if (stamped.some(isFinal)) state.ended = true;
      // Live readers first: they never wait for the database.
      for (const listener of state.listeners) listener(stamped);
      if (stamped.every((event) => event.event === 'message.delta') && state.pendingChars < FLUSH_CHARS) {
        state.flushTimer ??= setTimeout(() => void this.flush(runId, state).catch(() => undefined), this.flushMs);
        return stamped;
      }
      await this.flush(runId, state);
      return stamped;
    });
    state.tail = appended.catch(() => undefined);
    return appended;
  }

  /** Stores the pending events (one flush at a time per run); they stay pending, for readers, until stored. */
  private flush(runId: string, state: RunLogState): Promise<void> {
    clearTimeout(state.flushTimer);
    state.flushTimer = undefined;
    if (state.flushing) return state.flushing.then(() => (state.pending.length ? this.flush(runId, state) : undefined));
    if (!state.pending.length) return Promise.resolve();
    const batch = state.pending.slice();
    state.flushing = (async () => {
      try {
        for (let i = 0; i < batch.length; i += INSERT_BATCH) {
          const rows = batch.slice(i, i + INSERT_BATCH).map((e) => ({ run_id: runId, seq: e.seq, event: e.event, data: e.data }));
          await this.db.insert(runEvents).values(rows);
        }
        state.pending.splice(0, batch.length);
        state.pendingChars = state.pending.reduce((n, e) => n + deltaChars(e), 0);
      } catch (error) {
        this.log.error({ err: (error as { cause?: unknown }).cause ?? error, runId, events: batch.length }, 'run events not stored; kept for the next flush');
        if (!this.closed) state.flushTimer ??= setTimeout(() => void this.flush(runId, state).catch(() => undefined), Math.max(this.flushMs, 1_000));
        throw error;
      } finally {
        state.flushing = null;
      }
    })();
    const flushed = state.flushing.then(() => this.forgetIfIdle(runId, state));
    return flushed;
  }

  async *read(runId: string, after: number, signal: AbortSignal): AsyncIterable<RunEvent> {
    let last = after;
    for (;;) {
      const state = this.stateOf(runId);
      const inbox: RunEvent[] = [];
      let overflowed = false;
      let wake: (() => void) | null = null;
      const listener: Listener = (events) => {
        if (overflowed) return;
        inbox.push(...events);
        if (inbox.length > READER_BUFFER_EVENTS) {
          overflowed = true;
          inbox.length = 0;
        }
        wake?.();
      };
      const onAbort = () => wake?.();
      // Listening starts before the replay: an event appended meanwhile is in the inbox, one
      // appended before is stored or in the snapshot of pending ones; `last` skips overlaps.
      state.listeners.add(listener);
      signal.addEventListener('abort', onAbort);
      try {
        const snapshot = state.pending.slice();
        for (;;) {
          const rows = await this.db
            .select({ seq: runEvents.seq, event: runEvents.event, data: runEvents.data })
            .from(runEvents)
            .where(and(eq(runEvents.run_id, runId), gt(runEvents.seq, last)))
            .orderBy(asc(runEvents.seq))
            .limit(REPLAY_PAGE);
          for (const row of rows) {
            if (signal.aborted) return;
            const event = row as RunEvent;
            yield event;
            last = event.seq;
            if (isFinal(event)) return;
          }
          if (rows.length < REPLAY_PAGE) break;
        }
        for (const event of snapshot) {
          if (event.seq <= last) continue;
          if (signal.aborted) return;
          yield event;
          last = event.seq;
          if (isFinal(event)) return;
        }
        while (!signal.aborted && !overflowed) {
          if (!inbox.length) {
            await new Promise<void>((resolve) => (wake = resolve));
            wake = null;
            continue;
          }
          for (const event of inbox.splice(0)) {
            if (event.seq <= last) continue;
            yield event;
            last = event.seq;
            if (isFinal(event)) return;
          }
        }
        if (signal.aborted) return;
        // Overflowed: the live events were dropped; catch up from the log again.
      } finally {
        state.listeners.delete(listener);
        signal.removeEventListener('abort', onAbort);
        this.forgetIfIdle(runId, state);
      }
    }
  }

  async lastSeq(runId: string): Promise<number> {
    const state = this.states.get(runId);
    if (state && state.nextSeq !== null) return state.nextSeq - 1;
    return (await this.storedLast(runId))?.seq ?? 0;
  }

  async expire(ttlSeconds: number): Promise<number> {
    const ended = this.db
      .select({ id: runs.id })
      .from(runs)
      .where(lt(runs.ended_at, sql`now() - make_interval(secs => ${ttlSeconds})`));
    const deleted = await this.db.delete(runEvents).where(inArray(runEvents.run_id, ended)).returning({ run_id: runEvents.run_id });
    return deleted.length;
  }

  /** Stores every pending event; later appends are refused. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.allSettled([...this.states].map(([runId, state]) => state.tail.then(() => this.flush(runId, state))));
  }
}

/** Cancels within this process: the node that runs a run is the node that hears its cancel. */
export class InProcessRunSignals implements RunSignals {
  private readonly subscribers = new Map<string, Set<(reason: string | undefined) => void>>();

  cancel(runId: string, reason?: string): Promise<void> {
    for (const onCancel of [...(this.subscribers.get(runId) ?? [])]) onCancel(reason);
    return Promise.resolve();
  }

  subscribe(runId: string, onCancel: (reason: string | undefined) => void): () => void {
    let fired = false;
    const once = (reason: string | undefined) => {
      if (fired) return;
      fired = true;
      onCancel(reason);
    };
    let set = this.subscribers.get(runId);
    if (!set) this.subscribers.set(runId, (set = new Set()));
    set.add(once);
    return () => {
      set.delete(once);
      if (!set.size && this.subscribers.get(runId) === set) this.subscribers.delete(runId);
    };
  }

  close(): Promise<void> {
    this.subscribers.clear();
    return Promise.resolve();
  }
}
