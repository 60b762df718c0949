/**
 * How a run's events and cancels travel between nodes: the interfaces both modes implement.
 *
 * Embedded (no REDIS_URL): events in the database log (`run_events`), in-process notification,
 * cancels through an in-process emitter. Scaled: events in a Redis Stream per run, cancels over Redis
 * pub/sub, so any API node serves any run's stream and a cancel sent to any node reaches the worker.
 */
import type { Db } from '../../core/db.js';

import { RunEventsRefusedError } from './run-bus-errors.js';

/** The event names of SPEC §5, in the order a run can emit them. */
export const RUN_EVENT_NAMES = [
  'run.queued',
  'run.started',
  'message.created',
  'message.delta',
  'tool.call',
  'tool.result',
  'message.completed',
  'run.completed',
  'run.failed',
  'run.cancelled',
] as const;
export type RunEventName = (typeof RUN_EVENT_NAMES)[number];

/** The events after which a run's stream ends. */
export const FINAL_RUN_EVENTS: ReadonlySet<RunEventName> = new Set(['run.completed', 'run.failed', 'run.cancelled']);

/** One event as stored and sent: `seq` counts from 1 per run; `data` carries `run_id` and `seq` too. */
export interface RunEvent {
  seq: number;
  event: RunEventName;
  data: Record<string, unknown> & { run_id: string; seq: number };
}

/** Each event's `data` as JSON, once: the log's store and every SSE reader of the event write the same text. */
const dataJson = new WeakMap<RunEvent, string>();

/** `JSON.stringify(event.data)`, made once per event object (its data never changes once stamped). */
export function eventDataJson(event: RunEvent): string {
  let json = dataJson.get(event);
  if (json === undefined) {
    json = JSON.stringify(event.data);
    dataJson.set(event, json);
  }
  return json;
}

/** An event to append; the log gives it its `seq` (and puts `run_id` and `seq` into its data). */
export interface NewRunEvent {
  event: RunEventName;
  data: Record<string, unknown>;
}

/**
 * The append-only event log of runs. One writer per run at a time (the holder of the run's lease,
 * or the API node that queues or cancels it before a worker has it); readers anywhere.
 */
export interface RunEventLog {
  /**
   * Appends events in order and returns them with their seq. Appending after a final event, or a
   * seq that already exists (a second writer), throws instead of writing a duplicate.
   */
  append(runId: string, events: readonly NewRunEvent[]): Promise<RunEvent[]>;
  /**
   * Every event with seq > `after`, exactly once and in order, then the live ones as they are
   * appended; ends after a final event, or when `signal` aborts. A slow reader never blocks writers.
   */
  read(runId: string, after: number, signal: AbortSignal): AsyncIterable<RunEvent>;
  /**
   * Every event of the run the log holds now, in order, without waiting for more (and without
   * moving this log's writer cursor): what an end or a resumed writer reads to close the messages
   * an earlier writer opened (run-lifecycle's openMessagesClosed).
   */
  stored(runId: string): Promise<RunEvent[]>;
  /** The highest seq of the run (0 when it has none): where a resumed writer continues. */
  lastSeq(runId: string): Promise<number>;
  /**
   * `lastSeq` for a writer resuming a run another process was writing, where that process could
   * hand readers events before storing them (embedded: deltas wait for the flush timer): its next
   * events are numbered after a gap wider than those can reach, so a reader that saw them and
   * reconnects (Last-Event-ID) gets all of the new attempt. Absent where an event is stored
   * before any reader gets it (Redis).
   */
  resumeSeq?(runId: string): Promise<number>;
  /**
   * A writer that knows where the run's log should be without reading it (a run's first start:
   * after its run.queued, seq 1): its next append continues after `seq` — and, should the log be
   * further (another writer appended), from the log's real top rather than being refused as stale;
   * a log below `seq` (run.queued never written, or lost) is numbered past `seq` all the same, a
   * seq a client may have seen. Later appends are fenced as after `lastSeq`. Absent where `lastSeq`
   * costs nothing.
   */
  expect?(runId: string, seq: number): void;
  /**
   * Where the log is kept apart from the runs' database and can lose its latest events on its own
   * (Redis flushed, or restarted without them; absent elsewhere): a writer taking up a run whose
   * earlier writers numbered up to `floor` at most (runs.event_seq_ceiling) has its next append
   * numbered after `floor` as well as after the log's top, so that no seq a client saw names
   * another event. Its presence is what makes the runner keep the ceiling.
   */
  numberAfter?(runId: string, floor: number): void;
  /**
   * Resolves when the log's store answers, throws RunBusUnavailableError when it cannot be reached:
   * asked before work that is only worth starting if its events can be read (an `agent:` completion,
   * which answers from them). Absent where the log is in the run's database (nothing to start without it).
   */
  reachable?(): Promise<void>;
  /** Forgets events of runs that ended more than `ttlSeconds` ago (RUN_EVENTS_TTL_SECONDS). */
  expire?(ttlSeconds: number): Promise<number>;
  /**
   * Only where the log is in the run's database (embedded; absent otherwise, and the caller
   * appends after its commit): the first events of a new run, stored in the transaction `tx` that
   * creates it; they are the run's log once it commits.
   */
  appendFirst?(tx: Db, runId: string, events: readonly NewRunEvent[]): Promise<RunEvent[]>;
  /**
   * Only where the log is in the run's database: runs `work` (a transaction), whose `store(tx,
   * events)` appends events (after those not yet stored) inside it. They are appended when `work`
   * returns (committed); nothing is when it throws. Refused as `append` is (ended, stale).
   */
  appendWithin?<T>(runId: string, work: (store: (tx: Db, events: readonly NewRunEvent[]) => Promise<RunEvent[]>) => Promise<T>): Promise<T>;
  close(): Promise<void>;
}

/**
 * A cancel also leaves a mark this long, so a cancel sent before the worker subscribed (it was
 * just picking the run up) or while its subscriber was reconnecting is still seen. Runs are never
 * restarted under the same id, so a mark outliving its run harms nothing.
 */
export const CANCEL_MARK_TTL_SECONDS = 300;

/** Cancels across nodes: the node running a run listens; any node may send. */
export interface RunSignals {
  /** Tells whichever node runs `runId` to abort it now (no-op when none does). */
  cancel(runId: string, reason?: string): Promise<void>;
  /** Called by the node that runs `runId`; `onCancel` fires at most once. Returns the unsubscribe. */
  subscribe(runId: string, onCancel: (reason: string | undefined) => void): () => void;
  close(): Promise<void>;
}

/** How a run's events and cancels travel: the one pair every part of the app uses. */
export interface RunBus {
  events: RunEventLog;
  signals: RunSignals;
}

const ignore = (): void => undefined;

/**
 * Seqs a worker may number past its run's ceiling (runs.event_seq_ceiling) before raising it again:
 * its claim raises the ceiling by this much, and a raise goes out ahead, in the background, once
 * half of it is used. So a step's events cost no database write until a run has used 500 of them
 * (then one, not waited for, per 500), and a run taken up after its worker died and its stream
 * was lost goes on at most this far past its last event.
 */
export const RUN_EVENT_SEQ_ROOM = 1_000;

/** A worker's hold on its run's seq ceiling, where the log keeps it (RunEventLog.numberAfter). */
export interface RunSeqCeiling {
  /** What this writer's events are numbered after at most: the run's ceiling before it took the run up. */
  after: number;
  /** The run's ceiling as the database has it (the claim's). */
  at: number;
  /** How far past the seqs sent each raise puts the ceiling: the room the claim gave (RUN_EVENT_SEQ_ROOM). */
  room: number;
  /** Raises it in the database to `to`; throws when the run is no longer this worker's (having stopped it). */
  raise(to: number): Promise<void>;
}

/** Catch-ups in a row one append may take (each means another writer appended again in between) before its refusal stands. */
const MAX_CATCH_UPS = 10;

const isStale = (error: unknown): error is RunEventsRefusedError => error instanceof RunEventsRefusedError && error.reason === 'stale';
const isEnded = (error: unknown): error is RunEventsRefusedError => error instanceof RunEventsRefusedError && error.reason === 'ended';

/**
 * The appends of the worker that holds a run's lease: every event it writes goes through here, in
 * order. Those it does not wait for one by one (a model's deltas: `add`) go out without waiting for
 * each other (the log keeps their order, and Redis sends those made while one is in flight
 * together); the first failure of those is kept: `check` throws it at the writer's next step,
 * `settle` after waiting for all of them. `append` and `within` are waited for.
 *
 * A `stale` refusal (another writer appended since this one last did) is not the end of the run
 * as such: a worker whose lease expired without its noticing (renewals failing for longer than the
 * lease) may still append between the new owner's `lastSeq` and its first append. So the writer
 * asks the database (`stillHolds`): while it holds the run, it catches up (`lastSeq`) and appends the
 * refused events and every later one, in order, after what is there; when it no longer does, the
 * refusal stands (and `stillHolds` has stopped the run, as a lost lease does) — which is how the
 * old worker stops at its next append once the new owner has appended.
 *
 * An `ended` refusal (the log holds the run's final event) stands too, but the database is asked
 * all the same, before the refusal reaches the run: a worker woken from a pause past its lease may
 * append its stream's buffered parts before its next renewal, after the new owner completed the
 * run, and without the question it failed the run with the refusal ("run failed: The run has
 * ended") rather than stopping as one that lost it.
 */
export class RunWriter {
  /** The latest append's outcome (after any catch-up): outcomes settle in the order the appends were made. */
  private latest: Promise<unknown> = Promise.resolve();
  /** The latest append sent straight to the log: it settles after every one sent before it. */
  private sent: Promise<unknown> = Promise.resolve();
  /** After a stale refusal, until the appends made since are through: each waits for the one before instead of going straight to the log. */
  private inTurn = false;
  /** The stale refusal not caught up with yet. */
  private behind: RunEventsRefusedError | null = null;
  /** The refusal that stands: the run is no longer this writer's. */
  private lost: RunEventsRefusedError | null = null;
  private failure: { error: unknown } | null = null;
  /** The question an `ended` refusal asked (`stillHolds`): every append refused so waits for its answer. */
  private endedAsked: Promise<unknown> | null = null;
  /** Catch-ups so far: events made from the log before the latest one may miss what the other writer appended. */
  private catchUps = 0;
  /** A seq at or above every one the log holds of the run as far as this writer knows (its answers, its catch-ups). */
  private high: number;
  /** Events sent to the log and not answered: numbered after `high` at most. */
  private unanswered = 0;
  /** Appends waiting for the ceiling to be raised: later ones wait behind them, so none overtakes. */
  private roomTurn: Promise<void> | null = null;
  private raising: Promise<void> | null = null;
  /** The seq of the last event this writer stored; undefined once an append failed without an answer (its events may be there). */
  private last: number | undefined;

  constructor(
    private readonly log: RunEventLog,
    private readonly runId: string,
    /** Whether this worker still holds the run, as the database says (and, when it does not, stops the run); asked on the refusal given. */
    private readonly stillHolds: (refusal: RunEventsRefusedError) => Promise<boolean>,
    /** Where the log can lose events on its own: the ceiling the writer stays under, raising it first. */
    private readonly ceiling?: RunSeqCeiling,
  ) {
    this.high = ceiling?.after ?? 0;
    this.last = ceiling?.after;
  }

  /** The log's top as the writer read it on taking the run up: its events are numbered after it. */
  followsTop(seq: number): void {
    this.high = Math.max(this.high, seq);
    this.last = Math.max(this.last ?? 0, seq);
  }

  /**
   * After `settle`: the seq of the run's last event, where this writer is sure of it (every append
   * it sent was answered, and it stored or was refused); what a hand-back leaves as the ceiling.
   */
  lastSeq(): number | undefined {
    return this.ceiling && this.unanswered === 0 ? this.last : undefined;
  }

  /** Appends without the caller waiting; a failure is kept for `check` and `settle`. */
  add(events: readonly NewRunEvent[], again?: () => Promise<readonly NewRunEvent[]>): void {
    this.append(events, again).catch((error: unknown) => void (this.failure ??= { error }));
  }

  /**
   * `again`, for events made from what the log held (the end of the messages an earlier writer
   * left open): makes them anew when they go out after a catch-up. The other writer appended in
   * between, after they were made, and they are appended after that: made before, they would say
   * the log ended where it did not (a message's end without its last text, a tool call answered twice).
   */
  append(events: readonly NewRunEvent[], again?: () => Promise<readonly NewRunEvent[]>): Promise<RunEvent[]> {
    let batch = events;
    let madeAt = this.catchUps;
    return this.write(async () => {
      if (again && madeAt !== this.catchUps) {
        madeAt = this.catchUps;
        batch = await again();
      }
      const room = this.room(batch.length);
      if (room) await room;
      return this.sendToLog(batch);
    });
  }

  /**
   * Counts `count` events about to be sent against the ceiling: raises it ahead (in the background)
   * once half its room is used, and returns what to wait for when they would pass it (or when an
   * earlier append waits: none overtakes another).
   */
  private room(count: number): Promise<void> | undefined {
    const ceiling = this.ceiling;
    if (!ceiling) return undefined;
    this.unanswered += count;
    const needed = this.high + this.unanswered;
    if (needed > ceiling.at - ceiling.room / 2) this.raise().catch(ignore);
    if (needed <= ceiling.at && !this.roomTurn) return undefined;
    const turn = (this.roomTurn ?? Promise.resolve()).then(async () => {
      while (needed > ceiling.at) await this.raise();
    });
    this.roomTurn = turn;
    const done = () => {
      if (this.roomTurn === turn) this.roomTurn = null;
    };
    turn.then(done, done);
    return turn;
  }

  /**
   * Room under the ceiling for `count` events appended right after this writer's by the one who
   * sends them itself (a run's final batch: appendFinalEvent), numbered after `top` where it read the
   * log's top: raises the ceiling first, waited for, when they would pass it. Uncounted, a final
   * batch of a few hundred events (the results of a step's unanswered tool calls) could pass it, and
   * the sweep writing the final event again after a lost stream would number over what clients saw.
   */
  async reserve(count: number, top = 0): Promise<void> {
    const ceiling = this.ceiling;
    if (!ceiling) return;
    this.high = Math.max(this.high, top);
    this.unanswered += count;
    try {
      while (this.high + this.unanswered > ceiling.at) await this.raise();
    } finally {
      this.unanswered -= count;
    }
  }

  /** One raise at a time, to the room past every event sent so far. */
  private raise(): Promise<void> {
    const ceiling = this.ceiling!;
    this.raising ??= (async () => {
      const to = this.high + this.unanswered + ceiling.room;
      await ceiling.raise(to);
      ceiling.at = Math.max(ceiling.at, to);
    })().finally(() => (this.raising = null));
    return this.raising;
  }

  private async sendToLog(batch: readonly NewRunEvent[]): Promise<RunEvent[]> {
    let stored: RunEvent[];
    try {
      stored = await this.log.append(this.runId, batch);
    } catch (error) {
      // A refusal stored nothing; any other failure may have stored the events: they stay counted.
      const refused = error instanceof RunEventsRefusedError;
      if (refused && this.ceiling) this.unanswered -= batch.length;
      if (!refused) this.last = undefined;
      throw error;
    }
    if (this.ceiling) this.unanswered -= batch.length;
    const last = stored.at(-1)?.seq;
    if (last !== undefined) {
      this.high = Math.max(this.high, last);
      if (this.last !== undefined) this.last = last;
    }
    return stored;
  }

  /** `appendWithin` (where the log has it): `work` runs again after a catch-up (its transaction rolled back). */
  within<T>(work: (store: (tx: Db, events: readonly NewRunEvent[]) => Promise<RunEvent[]>) => Promise<T>): Promise<T> {
    return this.write(() => this.log.appendWithin!(this.runId, work));
  }

  check(): void {
    if (this.failure) throw this.failure.error;
  }

  async settle(): Promise<void> {
    await this.latest.then(ignore, ignore);
    this.check();
  }

  private write<T>(send: () => Promise<T>): Promise<T> {
    const previous = this.latest;
    let outcome: Promise<T>;
    if (this.inTurn) {
      outcome = this.inTurnWrite(send, previous);
      const done = () => {
        if (this.latest === outcome) this.inTurn = false;
      };
      outcome.then(done, done);
    } else {
      const sent = send();
      this.sent = sent;
      outcome = sent.catch((error: unknown) => {
        if (isEnded(error)) return this.refusedAsEnded(error);
        if (!isStale(error)) throw error;
        // Every append sent after this one is refused too (this writer's cursor stays behind until
        // it catches up); from now on appends wait their turn, so none lands before the refused ones.
        this.inTurn = true;
        this.behind ??= error;
        return this.inTurnWrite(send, previous);
      });
    }
    this.latest = outcome;
    return outcome;
  }

  private async inTurnWrite<T>(send: () => Promise<T>, previous: Promise<unknown>): Promise<T> {
    await previous.then(ignore, ignore);
    for (let catchUps = 0; ; catchUps++) {
      if (this.lost) throw this.lost;
      if (this.behind) await this.catchUp(this.behind);
      try {
        return await send();
      } catch (error) {
        if (isEnded(error)) return this.refusedAsEnded(error);
        if (!isStale(error) || catchUps >= MAX_CATCH_UPS) throw error;
        this.behind = error;
      }
    }
  }

  /** Throws the refusal once the database has been asked (once for all of them) whether this writer still holds the run. */
  private async refusedAsEnded(refusal: RunEventsRefusedError): Promise<never> {
    // Its failure leaves the refusal to stand as it would have.
    this.endedAsked ??= this.stillHolds(refusal).catch(ignore);
    await this.endedAsked;
    throw refusal;
  }

  private async catchUp(refusal: RunEventsRefusedError): Promise<void> {
    // Every append sent straight to the log has been answered (refused): none can land after the catch-up.
    await this.sent.then(ignore, ignore);
    if (!(await this.stillHolds(refusal))) {
      this.lost = refusal;
      throw refusal;
    }
    const top = await this.log.lastSeq(this.runId);
    this.high = Math.max(this.high, top);
    // The other writer's events are the run's last too: a hand-back's ceiling (lastSeq) stays above them.
    if (this.last !== undefined) this.last = Math.max(this.last, top);
    this.catchUps++;
    this.behind = null;
  }
}

/** Runs whose writer cursor a log remembers; the oldest is forgotten first (its next append reads the top). */
const MAX_WRITER_CURSORS = 10_000;

/** Sets a log's writer cursor for a run, forgetting the oldest beyond MAX_WRITER_CURSORS (readers set them too, through lastSeq). */
export function rememberCursor(cursors: Map<string, number>, runId: string, seq: number): void {
  cursors.delete(runId); // re-inserted at the end: the Map's order is the eviction order
  cursors.set(runId, seq);
  if (cursors.size > MAX_WRITER_CURSORS) cursors.delete(cursors.keys().next().value!);
}
