import { asc, eq, inArray, sql } from 'drizzle-orm';
import pino from 'pino';
import { beforeAll, describe, expect, it } from 'vitest';

import { runEvents, runs } from '../../src/models/index.js';

import { DatabaseRunEventLog, EmbeddedRunEvents, InProcessRunSignals, READER_BUFFER_EVENTS } from '../../src/modules/agents/embedded-run-bus.js';
import type { RunEvent } from '../../src/modules/agents/run-bus.js';
import { RunEventsRefusedError } from '../../src/modules/agents/run-bus-errors.js';
import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { sleep } from '../helpers/http.js';
import { createThread } from '../helpers/runs.js';

// The embedded event log on its own: coalesced writes, exactly-once replay, slow readers.
const ctx = useTestApp();
const FLUSH_MS = 40;
let log: DatabaseRunEventLog;
let ownerId: string;
let threadId: string;

beforeAll(async () => {
  log = new DatabaseRunEventLog(new EmbeddedRunEvents(ctx.app.db, pino({ level: 'silent' }), FLUSH_MS));
  const owner = await createUser(ctx.app);
  ownerId = owner.user.id;
  threadId = (await createThread(ctx.app, owner.headers)).id;
});

/** A run row to hang events on (ended, so it holds no thread). */
async function newRun(): Promise<string> {
  const [row] = await ctx.app.db.insert(runs).values({ owner_id: ownerId, thread_id: threadId, agent_version: 1, model: 'm', status: 'completed' }).returning({ id: runs.id });
  return row!.id;
}

async function collect(iterable: AsyncIterable<RunEvent>, onEvent?: (event: RunEvent) => Promise<void>): Promise<RunEvent[]> {
  const out: RunEvent[] = [];
  for await (const event of iterable) {
    out.push(event);
    await onEvent?.(event);
  }
  return out;
}

/** The run's stored events, in seq order (a row of run_events holds a batch of them). */
const stored = async (runId: string) => (await storedRows(runId)).flatMap((row) => row.events);
const storedRows = async (runId: string) => ctx.app.db.select().from(runEvents).where(eq(runEvents.run_id, runId)).orderBy(asc(runEvents.seq));
/** The stored rows of `runIds` once there are `count` of them (the flush timer's), with created_at as text (microseconds). */
async function storedOnceAll(runIds: string[], count: number): Promise<{ run_id: string; seq: number; last_seq: number; created: string }[]> {
  for (let waited = 0; ; waited += 10) {
    const rows = await ctx.app.db
      .select({ run_id: runEvents.run_id, seq: runEvents.seq, last_seq: runEvents.last_seq, created: sql<string>`${runEvents.created_at}::text` })
      .from(runEvents)
      .where(inArray(runEvents.run_id, runIds));
    if (rows.length >= count || waited > 5_000) return rows;
    await sleep(10);
  }
}
const delta = (text: string) => ({ event: 'message.delta' as const, data: { delta: text } });

describe('the database run event log', () => {
  it('gives deltas to live readers at once but stores them in batches, under the same seqs', async () => {
    const runId = await newRun();
    const controller = new AbortController();
    const reading = collect(log.read(runId, 0, controller.signal));
    await log.append(runId, [{ event: 'run.started', data: {} }]);
    for (let i = 0; i < 200; i++) await log.append(runId, [delta(`t${i} `)]);
    // Right after the appends most deltas are not stored yet, yet lastSeq counts them.
    expect((await stored(runId)).length).toBeLessThan(201);
    expect(await log.lastSeq(runId)).toBe(201);
    await log.append(runId, [{ event: 'run.completed', data: {} }]);
    const live = await reading;
    expect(live.map((e) => e.seq)).toEqual(Array.from({ length: 202 }, (_, i) => i + 1));
    const rows = await stored(runId);
    expect(rows.map((r) => [r.seq, r.event, r.data])).toEqual(live.map((e) => [e.seq, e.event, e.data]));
    expect(live[5]!.data).toEqual({ delta: 't4 ', run_id: runId, seq: 6 });
  });

  it('a reader that joins while deltas are pending gets each event exactly once, from any point', async () => {
    const runId = await newRun();
    await log.append(runId, [{ event: 'run.started', data: {} }]);
    for (let i = 0; i < 30; i++) await log.append(runId, [delta(`a${i}`)]);
    // Some stored, some pending: readers from several points see the same sequence.
    const readers = [0, 1, 10, 31].map((after) => ({ after, events: collect(log.read(runId, after, new AbortController().signal)) }));
    for (let i = 0; i < 30; i++) await log.append(runId, [delta(`b${i}`)]);
    await log.append(runId, [{ event: 'run.failed', data: {} }]);
    for (const reader of readers) {
      const events = await reader.events;
      expect(events.map((e) => e.seq)).toEqual(Array.from({ length: 62 - reader.after }, (_, i) => reader.after + i + 1));
    }
  });

  it('refuses events after the final one, also for a writer that loads the log fresh', async () => {
    const runId = await newRun();
    await log.append(runId, [{ event: 'run.cancelled', data: {} }]);
    await expect(log.append(runId, [delta('late')])).rejects.toBeInstanceOf(RunEventsRefusedError);
    // Another process's view: nothing in memory, the log read from the database.
    const fresh = new DatabaseRunEventLog(new EmbeddedRunEvents(ctx.app.db, pino({ level: 'silent' }), FLUSH_MS));
    await expect(fresh.append(runId, [{ event: 'run.completed', data: {} }])).rejects.toBeInstanceOf(RunEventsRefusedError);
    expect(await fresh.lastSeq(runId)).toBe(1);
  });

  it('a reader (of a process that holds none of the log) that starts past the end of an int4 seq reads nothing and ends', async () => {
    const runId = await newRun();
    await log.append(runId, [{ event: 'run.started', data: {} }, delta('a'), { event: 'run.completed', data: {} }]);
    const fresh = new DatabaseRunEventLog(new EmbeddedRunEvents(ctx.app.db, pino({ level: 'silent' }), FLUSH_MS));
    // `?after=` takes any safe integer, Last-Event-ID up to 15 digits.
    for (const after of [2 ** 31, Number.MAX_SAFE_INTEGER]) expect(await collect(fresh.read(runId, after, new AbortController().signal))).toEqual([]);
  });

  it('never waits for a slow reader: past its buffer it catches up from the log, still exactly once', async () => {
    const runId = await newRun();
    const controller = new AbortController();
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    // The reader takes the first event, then stalls until every event has been appended.
    const reading = collect(log.read(runId, 0, controller.signal), async (event) => {
      if (event.seq === 1) await gate;
    });
    await log.append(runId, [{ event: 'run.started', data: {} }]);
    await sleep(20);
    const total = READER_BUFFER_EVENTS * 2;
    const started = performance.now();
    for (let i = 0; i < total; i++) await log.append(runId, [delta('x')]);
    await log.append(runId, [{ event: 'run.completed', data: {} }]);
    const writing = performance.now() - started;
    release();
    const events = await reading;
    expect(events.map((e) => e.seq)).toEqual(Array.from({ length: total + 2 }, (_, i) => i + 1));
    // The writer did not wait for the reader (a few seconds at most even on a busy machine).
    expect(writing).toBeLessThan(10_000);
  });

  it('stores the deferred events of runs streaming at the same time in one statement per flush', async () => {
    const runIds = [await newRun(), await newRun(), await newRun()];
    // A log of its own whose deferred flush comes a second after the first append: the six appends
    // fall within it however slow the machine (at FLUSH_MS a busy CI split them between two flushes).
    const slow = new DatabaseRunEventLog(new EmbeddedRunEvents(ctx.app.db, pino({ level: 'silent' }), 1_000));
    for (const runId of runIds) await slow.append(runId, [{ event: 'run.started', data: {} }, delta('a')]);
    for (const runId of runIds) await slow.append(runId, [delta('b')]);
    // A row per run, holding its three events.
    const rows = await storedOnceAll(runIds, 3);
    await slow.close();
    expect(rows.map((r) => `${runIds.indexOf(r.run_id)}:${r.seq}-${r.last_seq}`).sort()).toEqual(['0:1-3', '1:1-3', '2:1-3']);
    // now() is its transaction's start: one value for the three rows, so one statement (and commit) wrote them.
    expect(new Set(rows.map((r) => r.created))).toHaveProperty('size', 1);
    for (const runId of runIds) expect((await stored(runId)).map((e) => [e.seq, e.event])).toEqual([[1, 'run.started'], [2, 'message.delta'], [3, 'message.delta']]);
  });

  it('one run whose events cannot be stored (its row deleted) holds up no other run\'s; they are dropped, not retried for ever, and its readers end', async () => {
    const lines: { level: number; msg: string }[] = [];
    const logger = pino({ level: 'info' }, { write: (line: string) => lines.push(JSON.parse(line) as { level: number; msg: string }) });
    const own = new DatabaseRunEventLog(new EmbeddedRunEvents(ctx.app.db, logger, FLUSH_MS));
    const [gone, kept] = [await newRun(), await newRun()];
    await own.append(gone, [delta('x')]);
    await own.append(kept, [delta('y')]);
    const reading = collect(own.read(gone, 0, new AbortController().signal)).then((events) => events.map((e) => e.seq));
    // Its run row deleted before the flush: its events break the foreign key.
    await ctx.app.db.delete(runs).where(eq(runs.id, gone));
    expect((await storedOnceAll([kept], 1)).map((r) => r.seq)).toEqual([1]);
    expect(await stored(gone)).toEqual([]);
    expect(await Promise.race([reading, sleep(3_000).then(() => 'still waiting')])).toEqual([1]);
    // A failed store is retried a second later while the log is open: not one of a run that is gone.
    await sleep(1_500);
    expect(lines.filter((line) => line.level >= 50).map((line) => line.msg)).toEqual([]);
    expect(lines.map((line) => line.msg)).toContain('run deleted: its unstored events dropped');
    await own.close();
  });

  it('replays from the database from any seq, within a stored row or at its edges, exactly once', async () => {
    const runId = await newRun();
    // One append of 1,200 events (not deferred): rows of at most 500 events.
    await log.append(runId, Array.from({ length: 1_200 }, (_, i) => ({ event: 'tool.result' as const, data: { i } })));
    await log.append(runId, [{ event: 'run.completed', data: {} }]);
    expect((await storedRows(runId)).map((r) => [r.seq, r.last_seq, r.last_event])).toEqual([
      [1, 500, 'tool.result'],
      [501, 1000, 'tool.result'],
      [1001, 1200, 'tool.result'],
      [1201, 1201, 'run.completed'],
    ]);
    // Another process's view: nothing in memory, every event read from the database.
    const fresh = new DatabaseRunEventLog(new EmbeddedRunEvents(ctx.app.db, pino({ level: 'silent' }), FLUSH_MS));
    for (const after of [0, 1, 499, 500, 501, 999, 1200]) {
      const events = await collect(fresh.read(runId, after, new AbortController().signal));
      expect(events.map((e) => e.seq)).toEqual(Array.from({ length: 1201 - after }, (_, i) => after + i + 1));
    }
    expect(await fresh.lastSeq(runId)).toBe(1201);
    await fresh.close();
  });

  it('forgets events of runs that ended more than the TTL ago', async () => {
    const runId = await newRun();
    await log.append(runId, [{ event: 'run.started', data: {} }, { event: 'run.completed', data: {} }]);
    await ctx.app.db.update(runs).set({ ended_at: new Date(Date.now() - 2 * 3600_000) }).where(eq(runs.id, runId));
    // Counted in events (one row holds both).
    expect(await log.expire(3600)).toBeGreaterThanOrEqual(2);
    expect(await stored(runId)).toEqual([]);
  });
});

describe('in-process run signals', () => {
  it('tell the subscriber once; an unsubscribed one hears nothing', async () => {
    const signals = new InProcessRunSignals();
    const heard: (string | undefined)[] = [];
    const stop = signals.subscribe('r1', (reason) => heard.push(reason));
    const other: string[] = [];
    signals.subscribe('r2', () => other.push('r2'));
    await signals.cancel('r1', 'user');
    await signals.cancel('r1', 'again');
    stop();
    await signals.cancel('r1');
    expect(heard).toEqual(['user']);
    expect(other).toEqual([]);
    await signals.close();
  });
});
