/**
 * The embedded implementations of the run bus (run-bus.ts): the event log in the database
 * (`run_events`) with in-process notification, and cancels through an in-process registry. One
 * process holds the data directory (embedded mode), so every writer and reader of a run is here.
 */
import { and, asc, desc, eq, gt, gte, inArray, lt, lte, sql } from 'drizzle-orm';

import { afterCommit, type Db } from '../../core/db.js';
import { databaseError } from '../../core/errors.js';
import type { Logger } from '../../core/logger.js';

import { runEvents, runs } from '../../models/index.js';

import { preparedAnywhere } from '../../crud/prepared.js';
import { CANCEL_MARK_TTL_SECONDS, eventDataJson, FINAL_RUN_EVENTS, type NewRunEvent, rememberCursor, type RunEvent, type RunEventLog, type RunEventName, type RunSignals } from './run-bus.js';
import { RunEventsRefusedError } from './run-bus-errors.js';

/** Rows of stored events read per query while a reader catches up (each holds at most ROW_EVENTS). */
const REPLAY_PAGE = 20;
/** Streamed text pending beyond this many characters is written at once rather than on the timer. */
const FLUSH_CHARS = 4_096;
/** Events pending beyond this many are written at once rather than on the timer (deltas of a few characters each). */
const FLUSH_EVENTS = 256;
/**
 * How far a resumed run's events are numbered past the stored top (see `resume`): beyond what a
 * dead process can have handed readers without storing — the pending events (FLUSH_EVENTS, or
 * FLUSH_CHARS of text, at most) and a batch being stored, with room to spare.
 */
export const UNSTORED_SEQS = 4 * FLUSH_EVENTS;
/** Events per row of run_events at most: a long backlog (a reader that stalled, a failed flush) is stored in several rows. */
const ROW_EVENTS = 500;
/** Stored events a run's state keeps for readers that start (the usual reader opens at the run's start). */
const RECENT_EVENTS = 64;
/**
 * Live events a reader may have waiting (a slow SSE client). Beyond it the reader drops them and
 * catches up from the log instead, so its memory stays bounded and the writer never waits for it.
 */
export const READER_BUFFER_EVENTS = 2_000;

type Listener = (events: readonly RunEvent[]) => void;

const slot = <T>(name: string) => sql.placeholder(name) as unknown as T;
// Every run writes and reads its log: these are prepared once (see preparedAnywhere).
const lastStored = preparedAnywhere('run_events_last', (db, name) =>
  db
    .select({ seq: runEvents.last_seq, event: runEvents.last_event })
    .from(runEvents)
    .where(eq(runEvents.run_id, slot<string>('run_id')))
    .orderBy(desc(runEvents.seq))
    .limit(1)
    .prepare(name),
);
/**
 * The rows that hold events after `after`: from the row that holds `after` + 1 (a row's seqs are contiguous, rows follow on).
 * `after` as bigint: a reader's `?after=`/Last-Event-ID may be past any int4 seq (then nothing is after it).
 */
const storedAfter = preparedAnywhere('run_events_after', (db, name) => {
  const after = sql`${sql.placeholder('after')}::bigint`;
  const holding = db.$with('holding').as(
    db
      .select({ seq: sql<number>`coalesce(max(${runEvents.seq}), 0)`.as('seq') })
      .from(runEvents)
      .where(and(eq(runEvents.run_id, slot<string>('run_id')), lte(runEvents.seq, sql`${after} + 1`))),
  );
  return db
    .with(holding)
    .select({ events: runEvents.events })
    .from(runEvents)
    .where(and(eq(runEvents.run_id, slot<string>('run_id')), gte(runEvents.seq, sql`(select ${holding.seq} from ${holding})`), gt(runEvents.last_seq, after)))
    .orderBy(asc(runEvents.seq))
    .limit(REPLAY_PAGE)
    .prepare(name);
});
// A store's rows: one (a run's start, a step's end, a run's own flush) as plain parameters; several
// (the flush timer's, for many runs) as arrays. Neither has the database parse a JSON document to
// find the rows: json_to_recordset did, ~80 µs more per statement on PGlite (bench/RESULTS.md).
const eventRow = preparedAnywhere('run_events_insert', (db, name) =>
  db
    .insert(runEvents)
    .values({
      run_id: slot<string>('run_id'),
      seq: slot<number>('seq'),
      last_seq: slot<number>('last_seq'),
      last_event: slot<string>('last_event'),
      // The JSON text as the log wrote it (a placeholder of the column would encode it again).
      events: sql`${sql.placeholder('events')}::json`,
    })
    .prepare(name),
);
const eventRows = preparedAnywhere('run_events_insert_many', (db, name) =>
  db
    .insert(runEvents)
    .select(
      db
        .select({ run_id: sql`x.run_id`.as('run_id'), seq: sql`x.seq`.as('seq'), last_seq: sql`x.last_seq`.as('last_seq'), last_event: sql`x.last_event`.as('last_event'), events: sql`x.events`.as('events'), created_at: sql`now()`.as('created_at') })
        .from(
          sql`unnest(${sql.placeholder('run_ids')}::uuid[], ${sql.placeholder('seqs')}::integer[], ${sql.placeholder('last_seqs')}::integer[], ${sql.placeholder('last_events')}::varchar[], ${sql.placeholder('events')}::json[]) as x(run_id, seq, last_seq, last_event, events)`,
        ) as never,
    )
    .prepare(name),
);

/** Events of one or more runs to store: each run's, in seq order. */
type EventBatch = readonly { runId: string; events: readonly RunEvent[] }[];

/** Stores the events of `batches` in one statement: a row per run (per ROW_EVENTS events), with its first and last seq. */
async function storeEvents(db: Db, batches: EventBatch): Promise<void> {
  const rows: { run_id: string; seq: number; last_seq: number; last_event: string; events: string }[] = [];
  for (const { runId, events } of batches) {
    for (let i = 0; i < events.length; i += ROW_EVENTS) {
      const part = events.slice(i, i + ROW_EVENTS);
      const last = part[part.length - 1]!;
      // The StoredRunEvent[] as JSON.stringify writes it, each event's data as its SSE readers get it (written once).
      const json = part.map((e) => `{"seq":${e.seq},"event":${JSON.stringify(e.event)},"data":${eventDataJson(e)}}`);
      rows.push({ run_id: runId, seq: part[0]!.seq, last_seq: last.seq, last_event: last.event, events: `[${json.join(',')}]` });
    }
  }
  if (rows.length === 1) await eventRow(db).execute(rows[0]);
  else if (rows.length > 1) {
    await eventRows(db).execute({
      run_ids: rows.map((r) => r.run_id),
      seqs: rows.map((r) => r.seq),
      last_seqs: rows.map((r) => r.last_seq),
      last_events: rows.map((r) => r.last_event),
      events: rows.map((r) => r.events),
    });
  }
}

const storeRunEvents = (db: Db, runId: string, events: readonly RunEvent[]) => storeEvents(db, [{ runId, events }]);

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
  /** After a failed store: the timer's flush leaves the run's events until then (Date.now() ms). */
  retryAt: number;
  /** The last events stored (at most RECENT_EVENTS, in seq order, up to the first pending one): a reader replays them without a query. */
  recent: RunEvent[];
  /** The run's row is gone (deleted): its events have nowhere to go, and its readers have ended. */
  gone: boolean;
}

/**
 * Events stored on the flush timer (with the deltas) rather than before `append` returns: the
 * streamed text, and the announcements a step opens with. Whatever comes next (a tool call, the
 * step's messages, the end) stores them with it, so a quick run writes its log once.
 */
const DEFERRED_EVENTS: ReadonlySet<RunEventName> = new Set(['message.delta', 'message.created', 'run.started']);

const isFinal = (event: RunEvent) => FINAL_RUN_EVENTS.has(event.event);
const deltaChars = (event: RunEvent) => (event.event === 'message.delta' && typeof event.data.delta === 'string' ? event.data.delta.length : 0);

/**
 * The database event log as one process holds it: each run's live state (the next seq, events not
 * yet stored, live readers), shared by every `DatabaseRunEventLog` on it. `message.delta` events
 * (and a step's opening `run.started` / `message.created`: DEFERRED_EVENTS) get their seq and reach live readers at once but are stored in batches (at most every
 * RUN_EVENTS_FLUSH_MS, or FLUSH_CHARS of text): PGlite is not written per token, and a reader that
 * replays later gets the very same events and seqs. Any other event is stored, with every
 * deferred one before it, before `append` returns.
 */
export class EmbeddedRunEvents {
  private readonly states = new Map<string, RunLogState>();
  /**
   * Runs whose deferred events wait for the flush timer. One timer for all of them, and one INSERT
   * per tick for every run that is due: with many runs streaming at once, each run's deltas would
   * otherwise cost a statement (and a commit) of their own.
   */
  private readonly deferred = new Map<string, RunLogState>();
  private flushTimer: NodeJS.Timeout | undefined;
  /** Logs open on it: a failed flush is retried only while one is (not after shutdown). */
  private users = 0;

  constructor(
    private readonly db: Db,
    private readonly log: Logger,
    private readonly flushMs: number,
  ) {}

  /** Takes a share; the returned function gives it back. */
  use(): () => void {
    this.users++;
    let released = false;
    return () => {
      if (!released) this.users--;
      released = true;
    };
  }

  private stateOf(runId: string): RunLogState {
    let state = this.states.get(runId);
    if (!state) {
      state = { nextSeq: null, ended: false, pending: [], pendingChars: 0, listeners: new Set(), tail: Promise.resolve(), flushing: null, retryAt: 0, recent: [], gone: false };
      this.states.set(runId, state);
    }
    return state;
  }

  /** Once everything of a run is stored: it no longer waits for the flush timer, and what this process keeps of it goes once nobody listens. */
  private forgetIfIdle(runId: string, state: RunLogState): void {
    if (state.pending.length || state.flushing) return;
    this.undefer(runId, state);
    if (state.listeners.size) return;
    // A writer's seq is kept until its run ends; a reader-only state can go at once.
    if (state.nextSeq !== null && !state.ended) return;
    if (this.states.get(runId) === state) this.states.delete(runId);
  }

  /** The run's pending events are stored by the next flush timer's tick (unless something stores them first). */
  private defer(runId: string, state: RunLogState): void {
    this.deferred.set(runId, state);
    this.flushTimer ??= setTimeout(() => this.flushDeferred(), this.flushMs);
  }

  /** Nothing of the run waits for the timer (stored otherwise): the timer stops when no run does. */
  private undefer(runId: string, state: RunLogState): void {
    if (this.deferred.get(runId) === state) this.deferred.delete(runId);
    if (!this.deferred.size && this.flushTimer) {
      clearTimeout(this.flushTimer);
      this.flushTimer = undefined;
    }
  }

  /**
   * The timer's tick: every deferred run that is not being stored already (by its own flush or
   * transaction, which leaves what it did not store deferred) nor waiting to retry, in one INSERT.
   * Should that fail, each run is flushed on its own, so that one run's failure (its row gone)
   * holds up no other run's events.
   */
  private flushDeferred(): void {
    this.flushTimer = undefined;
    const now = Date.now();
    const due: { runId: string; state: RunLogState; events: RunEvent[] }[] = [];
    for (const [runId, state] of this.deferred) {
      if (!state.pending.length) this.deferred.delete(runId);
      else if (!state.flushing && state.retryAt <= now) {
        this.deferred.delete(runId);
        due.push({ runId, state, events: state.pending.slice() });
      }
    }
    if (this.deferred.size) this.flushTimer = setTimeout(() => this.flushDeferred(), this.flushMs);
    if (!due.length) return;
    let release!: () => void;
    const flushing = new Promise<void>((resolve) => (release = resolve));
    for (const { state } of due) state.flushing = flushing;
    void (async () => {
      try {
        if (due.length > 1) {
          try {
            await storeEvents(this.db, due);
            for (const { state, events } of due) this.stored(state, events.length);
            return;
          } catch {
            // Stored run by run below.
          }
        }
        // Each run's own flush (which logs a failure and retries it later) takes over.
        for (const { state } of due) state.flushing = null;
        for (const { runId, state } of due) void this.flush(runId, state).catch(() => undefined);
      } finally {
        for (const { state } of due) if (state.flushing === flushing) state.flushing = null;
        release();
        for (const { runId, state } of due) this.forgetIfIdle(runId, state);
      }
    })();
  }

  private async storedLast(runId: string): Promise<{ seq: number; event: RunEventName } | undefined> {
    const [row] = await lastStored(this.db).execute({ run_id: runId });
    return row && { seq: row.seq, event: row.event as RunEventName };
  }

  /** Loads the run's next seq from the database unless this process knows it. */
  private async load(runId: string, state: RunLogState): Promise<number> {
    if (state.nextSeq === null) {
      const last = await this.storedLast(runId);
      state.nextSeq = (last?.seq ?? 0) + 1;
      state.ended = last !== undefined && FINAL_RUN_EVENTS.has(last.event);
    }
    return state.nextSeq - 1;
  }

  /**
   * Appends for a writer whose last seq per run is in `cursors` (none: it continues from the top);
   * refuses after a final event, or when another writer appended since this one (`stale`).
   */
  append(runId: string, events: readonly NewRunEvent[], cursors: Map<string, number>): Promise<RunEvent[]> {
    const state = this.stateOf(runId);
    const appended = state.tail.then(async () => {
      if (state.nextSeq === null && events[0]?.event === 'run.queued') {
        // A run's first event (its start writes it): nothing to look up. Were it not, the insert
        // would collide with the stored seq 1 (the primary key) rather than write a duplicate.
        state.nextSeq = 1;
        state.ended = false;
      }
      const top = await this.load(runId, state);
      if (state.ended) {
        cursors.delete(runId);
        throw new RunEventsRefusedError(runId, 'ended', top);
      }
      const cursor = cursors.get(runId);
      if (cursor !== undefined && cursor !== top) throw new RunEventsRefusedError(runId, 'stale', top);
      const stamped = events.map((e): RunEvent => {
        const seq = state.nextSeq!++;
        return { seq, event: e.event, data: { ...e.data, run_id: runId, seq } };
      });
      if (stamped.some(isFinal)) cursors.delete(runId);
      else rememberCursor(cursors, runId, state.nextSeq! - 1);
      state.pending.push(...stamped);
      for (const event of stamped) state.pendingChars += deltaChars(event);
      if (stamped.some(isFinal)) state.ended = true;
      // Live readers first: they never wait for the database.
      for (const listener of state.listeners) listener(stamped);
      if (stamped.every((event) => DEFERRED_EVENTS.has(event.event)) && state.pendingChars < FLUSH_CHARS && state.pending.length < FLUSH_EVENTS) {
        this.defer(runId, state);
        return stamped;
      }
      await this.flush(runId, state);
      return stamped;
    });
    state.tail = appended.catch(() => undefined);
    return appended;
  }

  /**
   * `lastSeq` for a writer taking up a run another process was writing (a resumed run): that
   * process handed live readers its deferred events before storing them, so seqs past the stored
   * top may be known to readers (and a reader reconnecting with its Last-Event-ID would skip the
   * new attempt's events that reused them). Unless this process wrote the run, its next events are
   * numbered after a gap of UNSTORED_SEQS. Returns the stored top.
   */
  resume(runId: string, cursors: Map<string, number>): Promise<number> {
    const state = this.stateOf(runId);
    const resumed = state.tail.then(async () => {
      const known = state.nextSeq !== null;
      const top = await this.load(runId, state);
      if (!known && !state.ended) state.nextSeq = top + UNSTORED_SEQS + 1;
      rememberCursor(cursors, runId, state.nextSeq! - 1);
      return top;
    });
    state.tail = resumed.catch(() => undefined);
    return resumed;
  }

  /** The first `count` pending events are stored: they move to `recent`. */
  private stored(state: RunLogState, count: number): void {
    const stored = state.pending.splice(0, count);
    state.pendingChars = state.pending.reduce((n, e) => n + deltaChars(e), 0);
    state.recent.push(...stored);
    if (state.recent.length > RECENT_EVENTS) state.recent.splice(0, state.recent.length - RECENT_EVENTS);
  }

  /**
   * A new run's first events, stored in the transaction that creates the run (`tx`): seq from 1,
   * and this process's state of the run once it commits (nothing, when it rolls back).
   */
  async appendFirst(tx: Db, runId: string, events: readonly NewRunEvent[]): Promise<RunEvent[]> {
    const stamped = events.map((e, i): RunEvent => ({ seq: i + 1, event: e.event, data: { ...e.data, run_id: runId, seq: i + 1 } }));
    await storeRunEvents(tx, runId, stamped);
    afterCommit(tx, () => {
      const state = this.stateOf(runId);
      // Nobody but its creator knew the run before the commit: the state is new.
      if (state.nextSeq !== null) return;
      state.nextSeq = stamped.length + 1;
      state.ended = stamped.some(isFinal);
      state.recent.push(...stamped);
      for (const listener of state.listeners) listener(stamped);
    });
    return stamped;
  }

  /**
   * Runs `work` (a transaction) with a `store` that appends in it: the pending events and the new
   * ones are written by the transaction, and become the run's (seq, readers, stored) once `work`
   * returns. While it runs, the run's other appends wait (its writer is the one running it) and the
   * flush timer holds off (the pending events are the transaction's to store).
   */
  appendWithin<T>(runId: string, cursors: Map<string, number>, work: (store: (tx: Db, events: readonly NewRunEvent[]) => Promise<RunEvent[]>) => Promise<T>): Promise<T> {
    const state = this.stateOf(runId);
    const done = state.tail.then(async () => {
      // A flush in flight finishes first, outside the transaction (it needs the database's turn).
      while (state.flushing) await state.flushing.catch(() => undefined);
      const top = await this.load(runId, state);
      let staged: { stamped: RunEvent[]; pending: number } | null = null;
      let release!: () => void;
      state.flushing = new Promise<void>((resolve) => (release = resolve));
      try {
        const result = await work(async (tx, events) => {
          if (staged) throw new Error('appendWithin stores once');
          if (state.ended) {
            cursors.delete(runId);
            throw new RunEventsRefusedError(runId, 'ended', top);
          }
          const cursor = cursors.get(runId);
          if (cursor !== undefined && cursor !== top) throw new RunEventsRefusedError(runId, 'stale', top);
          const stamped = events.map((e, i): RunEvent => {
            const seq = state.nextSeq! + i;
            return { seq, event: e.event, data: { ...e.data, run_id: runId, seq } };
          });
          const rows = [...state.pending, ...stamped];
          await storeRunEvents(tx, runId, rows);
          staged = { stamped, pending: state.pending.length };
          return stamped;
        });
        if (staged) this.committed(runId, state, cursors, staged);
        return result;
      } finally {
        state.flushing = null;
        release();
        if (state.pending.length) this.defer(runId, state);
        this.forgetIfIdle(runId, state);
      }
    });
    state.tail = done.catch(() => undefined);
    return done;
  }

  /** After appendWithin's commit: its events are the run's, stored with the pending ones before them. */
  private committed(runId: string, state: RunLogState, cursors: Map<string, number>, { stamped, pending }: { stamped: RunEvent[]; pending: number }): void {
    state.nextSeq! += stamped.length;
    this.stored(state, pending);
    state.recent.push(...stamped);
    if (state.recent.length > RECENT_EVENTS) state.recent.splice(0, state.recent.length - RECENT_EVENTS);
    if (stamped.some(isFinal)) {
      state.ended = true;
      cursors.delete(runId);
    } else rememberCursor(cursors, runId, state.nextSeq! - 1);
    for (const listener of state.listeners) listener(stamped);
  }

  /** Stores the pending events (one flush at a time per run); they stay pending, for readers, until stored. */
  private flush(runId: string, state: RunLogState): Promise<void> {
    if (state.flushing) return state.flushing.then(() => (state.pending.length ? this.flush(runId, state) : undefined));
    if (!state.pending.length) return Promise.resolve();
    const batch = state.pending.slice();
    state.flushing = (async () => {
      try {
        await storeRunEvents(this.db, runId, batch);
        this.stored(state, batch.length);
        state.retryAt = 0;
      } catch (error) {
        if (databaseError(error)?.code === '23503') {
          // Its run's row is gone (deleted with what held it): no store will ever take them, and
          // retried every second they filled the log for as long as the process ran.
          this.log.warn({ runId, events: batch.length }, 'run deleted: its unstored events dropped');
          this.drop(state);
          return;
        }
        this.log.error({ err: (error as { cause?: unknown }).cause ?? error, runId, events: batch.length }, 'run events not stored; kept for the next flush');
        if (this.users > 0) {
          state.retryAt = Date.now() + Math.max(this.flushMs, 1_000);
          this.defer(runId, state);
        }
        throw error;
      } finally {
        state.flushing = null;
      }
    })();
    const flushed = state.flushing.then(() => this.forgetIfIdle(runId, state));
    return flushed;
  }

  /** A run whose row is gone: what waits to be stored is dropped, and its readers end (no final event will come). */
  private drop(state: RunLogState): void {
    state.gone = true;
    state.ended = true;
    state.pending = [];
    state.pendingChars = 0;
    for (const listener of state.listeners) listener([]);
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
        // The stored events this process still holds, when they reach back to where the reader is.
        const recent = state.recent[0] !== undefined && state.recent[0].seq <= last + 1 ? state.recent.slice() : null;
        for (;;) {
          const page = recent ? null : await storedAfter(this.db).execute({ run_id: runId, after: last });
          const events = recent ?? page!.flatMap((row) => row.events as RunEvent[]);
          for (const event of events) {
            if (signal.aborted) return;
            if (event.seq <= last) continue;
            yield event;
            last = event.seq;
            if (isFinal(event)) return;
          }
          if (recent || page!.length < REPLAY_PAGE) break;
        }
        for (const event of snapshot) {
          if (event.seq <= last) continue;
          if (signal.aborted) return;
          yield event;
          last = event.seq;
          if (isFinal(event)) return;
        }
        // A reader that starts at or past the final event (it has read it all) ends at once.
        if (await this.endedBy(runId, state, last)) return;
        while (!signal.aborted && !overflowed) {
          if (state.gone) return;
          if (!inbox.length) {
            await new Promise<void>((resolve) => (wake = resolve));
            wake = null;
            continue;
          }
          for (const event of inbox.splice(0)) {
            // The final event ends a reader that started past it too (a Last-Event-ID ahead of the run).
            if (event.seq <= last) {
              if (isFinal(event)) return;
              continue;
            }
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

  /** Every event of the run stored or given a seq here (RunEventLog.stored). */
  async eventsOf(runId: string): Promise<RunEvent[]> {
    // The pending ones first: one stored meanwhile is in the database by the time it is read.
    const pending = this.states.get(runId)?.pending.slice() ?? [];
    const events: RunEvent[] = [];
    let last = 0;
    const take = (event: RunEvent) => {
      if (event.seq <= last) return;
      events.push(event);
      last = event.seq;
    };
    for (;;) {
      const page = await storedAfter(this.db).execute({ run_id: runId, after: last });
      for (const row of page) for (const event of row.events as RunEvent[]) take(event);
      if (page.length < REPLAY_PAGE) break;
    }
    for (const event of pending) take(event);
    return events;
  }

  /** Whether the run's final event has a seq of at most `seq`. */
  private async endedBy(runId: string, state: RunLogState, seq: number): Promise<boolean> {
    if (state.nextSeq !== null) return state.ended && state.nextSeq - 1 <= seq;
    const last = await this.storedLast(runId);
    return last !== undefined && FINAL_RUN_EVENTS.has(last.event) && last.seq <= seq;
  }

  /** The highest seq given (stored or pending); 0 when the run has none. */
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
    // Counted in events, not rows (a row holds a batch).
    const deleted = await this.db.delete(runEvents).where(inArray(runEvents.run_id, ended)).returning({ events: sql<number>`${runEvents.last_seq} - ${runEvents.seq} + 1` });
    return deleted.reduce((n, row) => n + Number(row.events), 0);
  }

  /** Stores every pending event. */
  async flushAll(): Promise<void> {
    await Promise.allSettled([...this.states].map(([runId, state]) => state.tail.then(() => this.flush(runId, state))));
    for (const [runId, state] of this.deferred) if (!state.pending.length) this.deferred.delete(runId);
    if (!this.deferred.size) {
      clearTimeout(this.flushTimer);
      this.flushTimer = undefined;
    }
  }
}

/**
 * One writer and reader of the embedded log (run-bus.ts's RunEventLog): it remembers, per run, the
 * seq it last appended or read with `lastSeq`, and is refused (`stale`) when another writer on the
 * same events appended since — the same rule as the Redis log, so both modes keep one contract.
 */
export class DatabaseRunEventLog implements RunEventLog {
  private readonly cursors = new Map<string, number>();
  private readonly release: () => void;
  private closed = false;

  constructor(private readonly events: EmbeddedRunEvents) {
    this.release = events.use();
  }

  append(runId: string, events: readonly NewRunEvent[]): Promise<RunEvent[]> {
    if (this.closed) return Promise.reject(new Error('run event log closed'));
    if (events.length === 0) return Promise.resolve([]);
    const finalAt = events.findIndex((event) => FINAL_RUN_EVENTS.has(event.event));
    if (finalAt !== -1 && finalAt < events.length - 1) return Promise.reject(new RunEventsRefusedError(runId, 'ended', this.cursors.get(runId) ?? 0));
    return this.events.append(runId, events, this.cursors).catch((error: unknown) => {
      // Stored or not is unknown (the database failed): the next append continues from the top.
      if (!(error instanceof RunEventsRefusedError)) this.cursors.delete(runId);
      throw error;
    });
  }

  appendFirst(tx: Db, runId: string, events: readonly NewRunEvent[]): Promise<RunEvent[]> {
    if (this.closed) return Promise.reject(new Error('run event log closed'));
    return this.events.appendFirst(tx, runId, events);
  }

  appendWithin<T>(runId: string, work: (store: (tx: Db, events: readonly NewRunEvent[]) => Promise<RunEvent[]>) => Promise<T>): Promise<T> {
    if (this.closed) return Promise.reject(new Error('run event log closed'));
    return this.events.appendWithin(runId, this.cursors, work);
  }

  read(runId: string, after: number, signal: AbortSignal): AsyncIterable<RunEvent> {
    return this.events.read(runId, after, signal);
  }

  stored(runId: string): Promise<RunEvent[]> {
    return this.events.eventsOf(runId);
  }

  async lastSeq(runId: string): Promise<number> {
    const seq = await this.events.lastSeq(runId);
    rememberCursor(this.cursors, runId, seq);
    return seq;
  }

  resumeSeq(runId: string): Promise<number> {
    if (this.closed) return Promise.reject(new Error('run event log closed'));
    return this.events.resume(runId, this.cursors);
  }

  expire(ttlSeconds: number): Promise<number> {
    return this.events.expire(ttlSeconds);
  }

  /** Stores every pending event; later appends are refused. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.cursors.clear();
    await this.events.flushAll();
    this.release();
  }
}

/** A cancel's mark: kept this long, so a cancel sent just before its run's worker subscribed is not lost. */
const CANCEL_MARK_MS = CANCEL_MARK_TTL_SECONDS * 1000;
/** Marks kept at most (cancels are rare; the oldest goes first). */
const MAX_CANCEL_MARKS = 10_000;

type CancelHandler = (reason: string | undefined) => void;

/**
 * Cancels within this process, shared by every `InProcessRunSignals` on it: the node that runs a
 * run is the node that hears its cancel. Like the Redis signals, a cancel also leaves a mark for a
 * while, which a later subscribe delivers.
 */
export class InProcessCancels {
  private readonly subscribers = new Map<string, Set<CancelHandler>>();
  /** Run id → the first cancel's reason and when it expires, oldest first. */
  private readonly marks = new Map<string, { reason: string | undefined; until: number }>();

  cancel(runId: string, reason: string | undefined): void {
    const now = Date.now();
    for (const [id, mark] of this.marks) {
      if (mark.until > now && this.marks.size < MAX_CANCEL_MARKS) break;
      this.marks.delete(id);
    }
    // The first cancel's reason stands, as onCancel reports only the first.
    if (!this.marks.has(runId)) this.marks.set(runId, { reason, until: now + CANCEL_MARK_MS });
    for (const onCancel of [...(this.subscribers.get(runId) ?? [])]) onCancel(reason);
  }

  subscribe(runId: string, onCancel: CancelHandler): () => void {
    let set = this.subscribers.get(runId);
    if (!set) this.subscribers.set(runId, (set = new Set()));
    set.add(onCancel);
    const mark = this.marks.get(runId);
    if (mark && mark.until > Date.now()) onCancel(mark.reason);
    return () => {
      set.delete(onCancel);
      if (!set.size && this.subscribers.get(runId) === set) this.subscribers.delete(runId);
    };
  }
}

/** One node's run signals (run-bus.ts's RunSignals) on the process's `InProcessCancels`. */
export class InProcessRunSignals implements RunSignals {
  private readonly unsubscribes = new Set<() => void>();

  constructor(private readonly cancels: InProcessCancels = new InProcessCancels()) {}

  cancel(runId: string, reason?: string): Promise<void> {
    this.cancels.cancel(runId, reason);
    return Promise.resolve();
  }

  subscribe(runId: string, onCancel: CancelHandler): () => void {
    let fired = false;
    const unsubscribe = this.cancels.subscribe(runId, (reason) => {
      if (fired) return;
      fired = true;
      onCancel(reason);
    });
    this.unsubscribes.add(unsubscribe);
    return () => {
      unsubscribe();
      this.unsubscribes.delete(unsubscribe);
    };
  }

  close(): Promise<void> {
    for (const unsubscribe of this.unsubscribes) unsubscribe();
    this.unsubscribes.clear();
    return Promise.resolve();
  }
}
