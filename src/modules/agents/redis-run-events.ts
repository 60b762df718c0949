import { createHash } from 'node:crypto';

import type { Redis } from 'ioredis';

import { asRunBusError, type RedisSubscriber } from './redis-subscriber.js';
import { FINAL_RUN_EVENTS, type NewRunEvent, rememberCursor, type RunEvent, type RunEventLog, type RunEventName } from './run-bus.js';
import { RunEventsRefusedError } from './run-bus-errors.js';

/**
 * Scaled mode's run event log: one Redis Stream per run, `<prefix>run:<id>:events`, whose entry IDs
 * are `0-<seq>`. Redis refuses an ID not above the stream's top, so the stream itself can never hold
 * a duplicate or out-of-order seq, whoever writes to it.
 *
 * Live delivery, and why not XREAD BLOCK: a blocked XREAD holds its connection, so either each
 * open SSE stream costs a Redis connection (1000 streams, 1000 connections), or one loop XREADs
 * every watched stream at once — and then must be interrupted (CLIENT UNBLOCK) whenever a reader
 * comes or goes, and re-sends all N keys after every wake-up, O(N) per event. Instead the append
 * script PUBLISHes the appended events on the run's channel, and the process listens through its
 * one subscriber connection (RedisSubscriber), only on the channels of runs it has readers for.
 * Per run and process there is one `RunTail`: it subscribes, learns the stream's top, then keeps
 * the latest events in a small window that all its readers read from. Pub/sub may drop messages
 * (a reconnection); every event carries its seq, so a gap — or a reconnection — makes the tail
 * fetch what it missed with XRANGE. The stream stays the truth; pub/sub only saves a round trip.
 *
 * Readers pull: each holds a cursor and nothing else; a reader that falls behind the shared
 * window reads its own pages with XRANGE. So a slow reader costs neither the writer nor the other
 * readers anything, and no reader buffers more than one page.
 *
 * Writers batch: appends to one run go out one script call at a time, and those made while one is
 * in flight (a model's deltas, which the runner does not wait for one by one) go out together in the
 * next — one round trip, one XADD per event and one PUBLISH for all of them.
 */

/** An abandoned stream (its run never ends: a bug, or lost with its worker) expires this long after its last append. */
export const LIVE_RUN_EVENTS_TTL_SECONDS = 7 * 24 * 3600;
/** Events a tail keeps for its readers beyond the slowest one's cursor; readers further behind page from Redis. */
const TAIL_WINDOW = 64;
/** A window this short is not worth a pass over the readers to trim. */
const UNTRIMMED_EVENTS = 16;
/** Events per XRANGE page (replay, catching up). */
const PAGE_SIZE = 200;
/** Runs with an `expect` not yet followed by an append that a log keeps (the oldest is forgotten: its writer reads the top). */
const MAX_EXPECTED = 1_000;
/** Most events of queued appends one script call takes (the rest go in the next). */
const MAX_BATCH_EVENTS = 256;

export interface RedisRunEventLogOptions {
  /** REDIS_KEY_PREFIX. */
  keyPrefix: string;
  /** RUN_EVENTS_TTL_SECONDS: how long a stream stays after its final event. */
  endedTtlSeconds: number;
}

type StreamEntry = [id: string, fields: string[]];

/**
 * Appends atomically, refusing when the run has ended or when the stream's top is above where this
 * writer left it (another writer appended). A top below it means the stream lost its latest events
 * (Redis flushed, or restarted without them): the writer goes on after its own seq (the events'
 * seqs are the writer's), since numbering from the top again would give seqs that readers have seen
 * to other events (an open stream skips them as seen, a resumed one waits past the run's end).
 * KEYS[1] the stream; ARGV: the writer's last seq, the TTL to set, the channel, the message to
 * publish, then (seq, event, data) per event, seqs above the writer's.
 */
const APPEND_SCRIPT = `
local FINAL = {${[...FINAL_RUN_EVENTS].map((name) => `['${name}'] = true`).join(', ')}}
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = 0
if top[1] then
  last = tonumber(string.sub(top[1][1], 3))
  if FINAL[top[1][2][2]] then return {'ended', last} end
end
local after = tonumber(ARGV[1])
if last > after then return {'stale', last} end
for i = 5, #ARGV, 3 do
  redis.call('XADD', KEYS[1], '0-' .. ARGV[i], 'event', ARGV[i + 1], 'data', ARGV[i + 2])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {'ok', last}
`;
const APPEND_SCRIPT_SHA = createHash('sha1').update(APPEND_SCRIPT).digest('hex');

function isFinal(event: RunEventName): boolean {
  return FINAL_RUN_EVENTS.has(event);
}

/** An append waiting for the one in flight on its run. */
interface QueuedAppend {
  events: readonly NewRunEvent[];
  resolve: (stored: RunEvent[]) => void;
  reject: (error: unknown) => void;
}

function parseEntry([id, fields]: StreamEntry): RunEvent {
  // Fields are written as event, <name>, data, <json> (see APPEND_SCRIPT).
  return { seq: Number(id.slice(2)), event: fields[1] as RunEventName, data: JSON.parse(fields[3]!) as RunEvent['data'] };
}

export class RedisRunEventLog implements RunEventLog {
  /** Per run, the seq this log last appended or read with lastSeq: where its next append must continue. */
  private readonly cursors = new Map<string, number>();
  /**
   * Per run taken up with numberAfter, until an append of it lands: the seq its events are numbered
   * after at least (the run's ceiling, recorded in the database), whatever the stream's top.
   */
  private readonly floors = new Map<string, number>();
  /** Runs whose cursor a writer set with `expect`, until their next append: that one continues from the real top if the guess is wrong. */
  private readonly expected = new Set<string>();
  /** Per run with an append in flight: the appends made since, which go out together after it. */
  private readonly queued = new Map<string, QueuedAppend[]>();
  private readonly tails = new Map<string, RunTail>();
  private readonly releaseSubscriber: () => void;
  private readonly stopCatchingUp: () => void;
  private closed = false;

  constructor(
    private readonly redis: Redis,
    private readonly subscriber: RedisSubscriber,
    private readonly options: RedisRunEventLogOptions,
  ) {
    this.releaseSubscriber = subscriber.use();
    this.stopCatchingUp = subscriber.onReconnect(() => {
      for (const tail of this.tails.values()) tail.catchUp();
    });
  }

  streamKey(runId: string): string {
    return `${this.options.keyPrefix}run:${runId}:events`;
  }

  private channel(runId: string): string {
    return `${this.options.keyPrefix}run:${runId}:appended`;
  }

  // ==================== Writing ====================

  append(runId: string, events: readonly NewRunEvent[]): Promise<RunEvent[]> {
    if (events.length === 0) return Promise.resolve([]);
    const finalAt = events.findIndex((event) => isFinal(event.event));
    if (finalAt !== -1 && finalAt < events.length - 1) {
      return Promise.reject(new RunEventsRefusedError(runId, 'ended', this.cursors.get(runId) ?? 0));
    }
    // One script call at a time per run, each continuing from the seq the previous one left.
    return new Promise<RunEvent[]>((resolve, reject) => {
      const append: QueuedAppend = { events, resolve, reject };
      const waiting = this.queued.get(runId);
      if (waiting) {
        waiting.push(append);
        return;
      }
      this.queued.set(runId, []);
      void this.send(runId, [append]);
    });
  }

  /** Sends `batch` as one script call, then whatever was queued meanwhile, until nothing is. */
  private async send(runId: string, batch: QueuedAppend[]): Promise<void> {
    while (batch.length) {
      try {
        const stored = await this.appendNow(runId, batch.flatMap((append) => append.events));
        let from = 0;
        for (const append of batch) append.resolve(stored.slice(from, (from += append.events.length)));
      } catch (error) {
        // What was queued behind a refused or failed append fails with it: a writer's events are
        // stored in order or not at all, never with a hole where a failed one was.
        for (const append of [...batch, ...this.queued.get(runId)!.splice(0)]) append.reject(error);
      }
      batch = this.nextBatch(this.queued.get(runId)!);
    }
    this.queued.delete(runId);
  }

  /** Takes queued appends for one script call: up to MAX_BATCH_EVENTS events, and none after a final event. */
  private nextBatch(waiting: QueuedAppend[]): QueuedAppend[] {
    let take = 0;
    let events = 0;
    while (take < waiting.length && (take === 0 || events + waiting[take]!.events.length <= MAX_BATCH_EVENTS)) {
      events += waiting[take]!.events.length;
      take++;
      if (isFinal(waiting[take - 1]!.events.at(-1)!.event)) break;
    }
    return waiting.splice(0, take);
  }

  private async appendNow(runId: string, events: readonly NewRunEvent[]): Promise<RunEvent[]> {
    const expected = this.expected.delete(runId);
    try {
      // A run's first event (its start writes run.queued) needs no look-up: the script refuses it
      // ('stale') were the stream not empty.
      const after = this.cursors.get(runId) ?? (events[0]!.event === 'run.queued' ? 0 : (await this.top(runId)).seq);
      // Past the stream's top (checked by the script) and past what the run's earlier writers may have numbered.
      const from = Math.max(after, this.floors.get(runId) ?? 0);
      const stored: RunEvent[] = events.map((event, index) => {
        const seq = from + index + 1;
        return { seq, event: event.event, data: { ...event.data, run_id: runId, seq } };
      });
      const ended = isFinal(stored.at(-1)!.event);
      // Each event's data is serialized once, for its stream entry and for the published message.
      const data = stored.map((event) => JSON.stringify(event.data));
      const message = `[${stored.map((event, i) => `{"seq":${event.seq},"event":"${event.event}","data":${data[i]}}`).join(',')}]`;
      const args = [
        after,
        ended ? this.options.endedTtlSeconds : LIVE_RUN_EVENTS_TTL_SECONDS,
        this.channel(runId),
        message,
        ...stored.flatMap((event, i) => [event.seq, event.event, data[i]!]),
      ];
      const [outcome, last] = await this.runAppendScript(this.streamKey(runId), args);
      if (outcome === 'ended') {
        this.cursors.delete(runId);
        this.floors.delete(runId);
        throw new RunEventsRefusedError(runId, 'ended', last);
      }
      if (outcome === 'stale' && expected) {
        // The writer's `expect` was wrong (another writer appended past run.queued): the script told
        // where the log is. A top below the guess (run.queued missing, or lost with the stream) is
        // not refused: the guess is numbered past, as a client may have seen run.queued as seq 1.
        this.remember(runId, last);
        return await this.appendNow(runId, events);
      }
      // A stale writer keeps its cursor: it stays refused until it reads lastSeq (resumes the run).
      if (outcome === 'stale') throw new RunEventsRefusedError(runId, 'stale', last);
      this.floors.delete(runId);
      if (ended) this.cursors.delete(runId);
      else this.remember(runId, stored.at(-1)!.seq);
      return stored;
    } catch (error) {
      if (error instanceof RunEventsRefusedError) throw error;
      // Whether the script ran is unknown: the next append reads the top again instead of guessing.
      this.cursors.delete(runId);
      throw asRunBusError(error);
    }
  }

  private async runAppendScript(key: string, args: (string | number)[]): Promise<[string, number]> {
    try {
      return (await this.redis.evalsha(APPEND_SCRIPT_SHA, 1, key, ...args)) as [string, number];
    } catch (error) {
      if (!(error instanceof Error) || !error.message.startsWith('NOSCRIPT')) throw error;
      return (await this.redis.eval(APPEND_SCRIPT, 1, key, ...args)) as [string, number];
    }
  }

  /**
   * Sets where the run's next append continues. A cursor a writer set with `expect` is never lowered
   * until that writer's append (a reader's lastSeq in this process asks too): a first start expects
   * past run.queued's seq 1, which a client may have seen though the stream lost it, so its first
   * event must not be numbered 1 again.
   */
  private remember(runId: string, seq: number): void {
    const expected = this.expected.has(runId) ? this.cursors.get(runId) : undefined;
    rememberCursor(this.cursors, runId, expected === undefined ? seq : Math.max(seq, expected));
  }

  expect(runId: string, seq: number): void {
    this.expected.delete(runId);
    this.remember(runId, seq);
    this.expected.add(runId);
    // A writer appends right after it expects; this only bounds what a writer that never did leaves.
    if (this.expected.size > MAX_EXPECTED) {
      const oldest = this.expected.values().next().value!;
      this.expected.delete(oldest);
      this.cursors.delete(oldest);
    }
  }

  /**
   * A writer taking up a run (its worker, or the end of one no worker holds) whose earlier writers
   * may have numbered up to `floor` (runs.event_seq_ceiling): the next append of the run numbers its
   * events after it too, not only after the stream's top, which is below it when Redis lost the
   * stream with them (then their seqs may be known to clients) and at most it otherwise.
   */
  numberAfter(runId: string, floor: number): void {
    rememberCursor(this.floors, runId, floor);
  }

  /** The highest seq (0 when none); also where this log's next append continues (a writer resuming a run). */
  async lastSeq(runId: string): Promise<number> {
    try {
      const { seq } = await this.top(runId);
      this.remember(runId, seq);
      return seq;
    } catch (error) {
      throw asRunBusError(error);
    }
  }

  async reachable(): Promise<void> {
    try {
      await this.redis.ping();
    } catch (error) {
      throw asRunBusError(error);
    }
  }

  // ==================== Reading ====================

  /** The stream's last event's seq (0 when none) and whether it is a final event. */
  async top(runId: string): Promise<{ seq: number; ended: boolean }> {
    const [entry] = (await this.redis.xrevrange(this.streamKey(runId), '+', '-', 'COUNT', 1)) as StreamEntry[];
    if (!entry) return { seq: 0, ended: false };
    const event = parseEntry(entry);
    return { seq: event.seq, ended: isFinal(event.event) };
  }

  /** Up to `count` events after seq `after`. */
  async range(runId: string, after: number, count: number): Promise<RunEvent[]> {
    const entries = (await this.redis.xrange(this.streamKey(runId), `(0-${after}`, '+', 'COUNT', count)) as StreamEntry[];
    return entries.map(parseEntry);
  }

  async stored(runId: string): Promise<RunEvent[]> {
    const events: RunEvent[] = [];
    for (;;) {
      const page = await this.page(runId, events.at(-1)?.seq ?? 0);
      events.push(...page);
      if (page.length < PAGE_SIZE) return events;
    }
  }

  async *read(runId: string, after: number, signal: AbortSignal): AsyncGenerator<RunEvent> {
    if (signal.aborted || this.closed) return;
    const reader: TailReader = { cursor: Math.max(0, Math.floor(after)) || 0 };
    const tail = this.tailOf(runId, reader.cursor);
    const wakeOnAbort = () => tail.wake(reader);
    signal.addEventListener('abort', wakeOnAbort, { once: true });
    tail.readers.add(reader);
    try {
      await tail.ready;
      while (!signal.aborted) {
        if (tail.failure) throw tail.failure;
        if (tail.closed) return;
        if (reader.cursor >= tail.last) {
          if (tail.ended) return;
          await tail.waitForMore(reader);
          continue;
        }
        const batch = reader.cursor >= tail.windowStart() - 1 ? tail.windowAfter(reader.cursor) : await this.page(runId, reader.cursor);
        // Empty while the top is beyond the cursor: the stream expired under the reader.
        if (batch.length === 0) return;
        for (const event of batch) {
          // IDs 0-<seq> keep a stream in order: anything else is corruption. A gap is events the
          // stream lost (Redis flushed or restarted without them; see APPEND_SCRIPT): they are gone,
          // and the reader goes on with what is there.
          if (event.seq <= reader.cursor) throw new Error(`Run ${runId}: event ${event.seq} follows ${reader.cursor}`);
          reader.cursor = event.seq;
          yield event;
          if (isFinal(event.event) || signal.aborted) return;
        }
      }
    } finally {
      signal.removeEventListener('abort', wakeOnAbort);
      tail.readers.delete(reader);
      if (tail.readers.size === 0) this.dropTail(runId, tail);
    }
  }

  private async page(runId: string, after: number): Promise<RunEvent[]> {
    try {
      return await this.range(runId, after, PAGE_SIZE);
    } catch (error) {
      throw asRunBusError(error);
    }
  }

  /** The run's tail, started for a first reader at `after` when there is none. */
  private tailOf(runId: string, after: number): RunTail {
    let tail = this.tails.get(runId);
    if (!tail || tail.failure) {
      tail = new RunTail(runId, this);
      const created = tail;
      this.tails.set(runId, created);
      created.ready = created.start(this.subscriber, this.channel(runId), after).catch((error: unknown) => {
        const failure = asRunBusError(error);
        created.fail(failure);
        throw failure;
      });
    }
    return tail;
  }

  private dropTail(runId: string, tail: RunTail): void {
    tail.stop();
    if (this.tails.get(runId) === tail) this.tails.delete(runId);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stopCatchingUp();
    for (const [runId, tail] of this.tails) {
      tail.close();
      this.dropTail(runId, tail);
    }
    this.releaseSubscriber();
  }
}

interface TailReader {
  /** The seq of the last event this reader has taken. */
  cursor: number;
  /** Set while the reader waits for the tail to advance. */
  wake?: () => void;
}

/** What this process knows of one run's stream while it has readers there (see the top of this file). */
class RunTail {
  readonly readers = new Set<TailReader>();
  /** The latest events, contiguous and ending at `last`. */
  private window: RunEvent[] = [];
  /** The highest seq known. */
  last = 0;
  ended = false;
  closed = false;
  failure: Error | null = null;
  ready: Promise<void> = Promise.resolve();
  /** Messages that arrived before the stream's top was known. */
  private early: RunEvent[][] | null = [];
  private stopListening?: () => void;
  private stopped = false;
  /** Readers waiting in waitForMore. */
  private waiting = 0;
  private catchingUp: Promise<void> | null = null;
  private catchUpAgain = false;

  constructor(
    private readonly runId: string,
    private readonly log: RedisRunEventLog,
  ) {}

  /**
   * Subscribes first, then reads the top: an event appended in between arrives by either path.
   * The top comes with the first reader's replay (after `after`), one XRANGE: a page that is not
   * full ends at the top, and becomes the window (that reader, and any at the same point, read it
   * without another round trip). Only an empty or full page needs the top read on its own.
   */
  async start(subscriber: RedisSubscriber, channel: string, after: number): Promise<void> {
    const stop = await subscriber.listen(channel, (message) => this.receive(message));
    if (this.stopped) return stop();
    this.stopListening = stop;
    const page = await this.log.range(this.runId, after, PAGE_SIZE);
    if (page.length > 0 && page.length < PAGE_SIZE) {
      this.window = page;
      this.last = page.at(-1)!.seq;
      this.ended = isFinal(page.at(-1)!.event);
    } else {
      const top = await this.log.top(this.runId);
      this.last = top.seq;
      this.ended = top.ended;
    }
    const early = this.early ?? [];
    this.early = null;
    for (const events of early) this.add(events);
  }

  stop(): void {
    this.stopped = true;
    this.stopListening?.();
    this.stopListening = undefined;
  }

  windowStart(): number {
    return this.window[0]?.seq ?? this.last + 1;
  }

  windowAfter(cursor: number): RunEvent[] {
    return this.window.slice(cursor + 1 - this.windowStart());
  }

  private receive(message: string): void {
    let events: RunEvent[];
    try {
      events = JSON.parse(message) as RunEvent[];
    } catch {
      return this.catchUp(); // not ours to parse: the stream has the truth
    }
    if (this.early) this.early.push(events);
    else this.add(events);
  }

  /**
   * Takes events that continue the window; a gap in messages (missed ones) fetches from the stream
   * instead. A gap in what the stream holds (`fromStream`) is events it lost: the window starts again after it.
   */
  private add(events: readonly RunEvent[], fromStream = false): void {
    if (this.ended || this.closed) return;
    let advanced = false;
    for (const event of events) {
      if (event.seq <= this.last) continue;
      if (event.seq !== this.last + 1 && !fromStream) {
        this.catchUp();
        break;
      }
      if (event.seq !== this.last + 1) this.window = [];
      this.window.push(event);
      this.last = event.seq;
      if (isFinal(event.event)) this.ended = true;
      advanced = true;
    }
    if (!advanced) return;
    this.trim();
    this.wakeReaders();
  }

  /** Drops what every reader has passed, and beyond TAIL_WINDOW what only laggards still need (they page). */
  private trim(): void {
    if (this.window.length <= UNTRIMMED_EVENTS) return;
    let slowest = this.last;
    for (const reader of this.readers) slowest = Math.min(slowest, reader.cursor);
    const drop = Math.max(slowest + 1, this.last - TAIL_WINDOW + 1) - this.windowStart();
    if (drop > 0) this.window = this.window.slice(drop);
  }

  /**
   * Waits until the tail advances (or the reader is woken). When every reader waits, every reader
   * has every event: the window is dropped, so an idle run holds no events in memory.
   */
  waitForMore(reader: TailReader): Promise<void> {
    if (++this.waiting === this.readers.size) this.window = [];
    return new Promise<void>((resolve) => (reader.wake = resolve));
  }

  wake(reader: TailReader): void {
    if (!reader.wake) return;
    this.waiting--;
    reader.wake();
    reader.wake = undefined;
  }

  private wakeReaders(): void {
    for (const reader of this.readers) this.wake(reader);
  }

  /** Fetches everything after `last` from the stream (one fetch at a time; a request during one repeats it). */
  catchUp(): void {
    if (this.early || this.stopped) return; // start() has not read the top yet: it will
    if (this.catchingUp) {
      this.catchUpAgain = true;
      return;
    }
    this.catchingUp = (async () => {
      do {
        this.catchUpAgain = false;
        let page: RunEvent[];
        do {
          page = await this.log.range(this.runId, this.last, PAGE_SIZE);
          this.add(page, true);
        } while (page.length === PAGE_SIZE && !this.ended);
      } while (this.catchUpAgain && !this.ended);
    })()
      .catch((error: unknown) => this.fail(asRunBusError(error)))
      .finally(() => (this.catchingUp = null));
  }

  fail(error: Error): void {
    this.failure = error;
    this.wakeReaders();
  }

  close(): void {
    this.closed = true;
    this.wakeReaders();
  }
}
