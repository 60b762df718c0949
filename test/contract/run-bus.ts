import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';

import { afterEach, describe, expect, it } from 'vitest';

import { type NewRunEvent, type RunEvent, type RunEventLog, type RunSignals, RunWriter } from '../../src/modules/agents/run-bus.js';
import { RunEventsRefusedError } from '../../src/modules/agents/run-bus-errors.js';

/**
 * The contract both run buses keep (embedded and Redis), as tests. Each factory call is one more
 * "node" on the same backend (the same database, the same Redis): what one node appends or sends,
 * another reads or receives. The suite closes every node it made.
 *
 * Writers: a log remembers, per run, the seq it last appended (or read with `lastSeq`) and
 * continues from there; when another writer has appended since, the append is refused
 * (RunEventsRefusedError 'stale') and nothing is written — a writer that lost its run finds out on
 * its next append. A writer taking a run over calls `lastSeq` first.
 */

type Factory<T> = () => T | Promise<T>;

const delta = (text: string): NewRunEvent => ({ event: 'message.delta', data: { message_id: 'm1', delta: text } });
const deltas = (count: number, from = 0): NewRunEvent[] => Array.from({ length: count }, (_, i) => delta(`t${from + i}`));
const completed: NewRunEvent = { event: 'run.completed', data: { run: { status: 'completed' } } };
const seqs = (events: readonly RunEvent[]) => events.map((event) => event.seq);
const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** Reads in the background: what arrived so far, whether the reader ended, and a way to stop it. */
function startReading(log: RunEventLog, runId: string, after: number, signal = new AbortController()) {
  const events: RunEvent[] = [];
  const done = (async () => {
    for await (const event of log.read(runId, after, signal.signal)) events.push(event);
  })();
  let ended = false;
  void done.then(
    () => (ended = true),
    () => (ended = true),
  );
  return { events, done, abort: () => signal.abort(), ended: () => ended };
}

/** A run with `stored` events (deltas) and a reader on `readerLog` after seq `after` that has taken their replay. */
async function replayed(writer: RunEventLog, readerLog: RunEventLog, stored: number, after: number) {
  const runId = randomUUID();
  await writer.append(runId, deltas(stored));
  const reader = startReading(readerLog, runId, after);
  await until(() => reader.events.length === stored - after, 2_000, 'the replay');
  return { runId, reader };
}

async function readAll(log: RunEventLog, runId: string, after: number): Promise<RunEvent[]> {
  const reading = startReading(log, runId, after);
  await withinMs(reading.done, 5_000, 'the reader to end');
  return reading.events;
}

export async function withinMs<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`waited ${ms} ms for ${what}`)), ms)));
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export async function until(condition: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`waited ${ms} ms for ${what}`);
    await sleep(5);
  }
}

/** Node factories that close what they made after each test. */
function nodesOf<T extends { close(): Promise<void> }>(make: Factory<T>): () => Promise<T> {
  const made: T[] = [];
  afterEach(async () => {
    await Promise.all(made.splice(0).map((node) => node.close()));
  });
  return async () => {
    const node = await make();
    made.push(node);
    return node;
  };
}

async function expectRefused(append: Promise<unknown>, reason: 'ended' | 'stale'): Promise<void> {
  const error = await append.then(
    () => null,
    (thrown: unknown) => thrown,
  );
  expect(error).toBeInstanceOf(RunEventsRefusedError);
  expect((error as RunEventsRefusedError).reason).toBe(reason);
}

export function runEventLogContract(name: string, makeLog: Factory<RunEventLog>): void {
  describe(`${name}: run event log`, () => {
    const node = nodesOf(makeLog);

    it('numbers events from 1 per run, with run_id and seq in their data', async () => {
      const log = await node();
      const [runA, runB] = [randomUUID(), randomUUID()];
      const first = await log.append(runA, [{ event: 'run.queued', data: { run: { id: runA } } }]);
      const next = await log.append(runA, [{ event: 'run.started', data: { run: { id: runA } } }, delta('a')]);
      const other = await log.append(runB, [{ event: 'run.queued', data: {} }]);
      expect([...first, ...next].map(({ seq, event }) => [seq, event])).toEqual([
        [1, 'run.queued'],
        [2, 'run.started'],
        [3, 'message.delta'],
      ]);
      expect(next[1]!.data).toEqual({ message_id: 'm1', delta: 'a', run_id: runA, seq: 3 });
      expect(other[0]!.data).toEqual({ run_id: runB, seq: 1 });
      expect(await log.append(runA, [])).toEqual([]);
      expect(await log.lastSeq(runA)).toBe(3);
    });

    it('answers lastSeq: 0 for a run without events, then the highest seq', async () => {
      const log = await node();
      const runId = randomUUID();
      expect(await log.lastSeq(runId)).toBe(0);
      await log.append(runId, deltas(4));
      expect(await log.lastSeq(runId)).toBe(4);
      await log.append(runId, [completed]);
      expect(await log.lastSeq(runId)).toBe(5);
    });

    it('gives every event it holds with stored (none for an unknown run), without waiting for more; another node\'s too', async () => {
      const log = await node();
      const other = await node();
      const runId = randomUUID();
      expect(await log.stored(runId)).toEqual([]);
      // More than a page of either log's replay, each append answered before the next.
      for (let i = 0; i < 5; i++) await log.append(runId, deltas(100));
      const held = await log.stored(runId);
      expect(held.map((e) => e.seq)).toEqual(Array.from({ length: 500 }, (_, i) => i + 1));
      expect((await other.stored(runId)).map((e) => e.seq)).toEqual(held.map((e) => e.seq));
      // The writer goes on after its reads.
      const next = await log.append(runId, [completed]);
      expect(next[0]!.seq).toBe(501);
      expect((await log.stored(runId)).at(-1)).toMatchObject({ seq: 501, event: 'run.completed' });
    });

    it('replays every event after N exactly once, in order, and ends after the final one', async () => {
      const log = await node();
      const runId = randomUUID();
      await log.append(runId, [...deltas(5), completed]);
      expect(seqs(await readAll(log, runId, 0))).toEqual(range(1, 6));
      expect(seqs(await readAll(log, runId, 2))).toEqual(range(3, 6));
      expect(seqs(await readAll(log, runId, 5))).toEqual([6]);
      expect(seqs(await readAll(log, runId, 6))).toEqual([]);
      expect((await readAll(log, runId, 3)).map((event) => event.data.delta ?? event.event)).toEqual(['t3', 't4', 'run.completed']);
    });

    it('gives the live events after the replay, without loss or repeat, then ends', async () => {
      const log = await node();
      const { runId, reader } = await replayed(log, log, 3, 1);
      for (let batch = 0; batch < 5; batch++) {
        await log.append(runId, deltas(2, 3 + batch * 2));
        await sleep(5);
      }
      await log.append(runId, [completed]);
      await withinMs(reader.done, 2_000, 'the reader to end after the final event');
      expect(seqs(reader.events)).toEqual(range(2, 14));
      expect(reader.events.at(-1)!.event).toBe('run.completed');
    });

    it('ends a reader that started at or past the final event once the final event comes (a Last-Event-ID ahead of a live run)', async () => {
      const log = await node();
      const runId = randomUUID();
      await log.append(runId, deltas(2));
      const readers = [startReading(log, runId, 3), startReading(log, runId, 1_000_000)];
      await sleep(50);
      expect(readers.map((reader) => reader.ended())).toEqual([false, false]);
      await log.append(runId, [completed]); // seq 3
      for (const reader of readers) await withinMs(reader.done, 2_000, 'a reader past the run\'s events to end with the run');
      expect(readers.map((reader) => reader.events)).toEqual([[], []]);
    });

    it('ends a reader when its signal aborts, and at once when it is already aborted', async () => {
      const log = await node();
      const { runId, reader } = await replayed(log, log, 2, 0);
      expect(reader.ended()).toBe(false);
      reader.abort();
      await withinMs(reader.done, 1_000, 'the aborted reader to end');
      expect(seqs(reader.events)).toEqual([1, 2]);

      const aborted = new AbortController();
      aborted.abort();
      const none = startReading(log, runId, 0, aborted);
      await withinMs(none.done, 1_000, 'a reader with an aborted signal to end');
      expect(none.events).toEqual([]);
    });

    it('refuses an append after a final event, and a batch with events after its final one', async () => {
      const [writer, other] = [await node(), await node()];
      const runId = randomUUID();
      await expectRefused(writer.append(runId, [delta('a'), completed, delta('b')]), 'ended');
      expect(await writer.lastSeq(runId)).toBe(0);
      await writer.append(runId, [delta('a'), completed]);
      await expectRefused(writer.append(runId, [delta('late')]), 'ended');
      await expectRefused(writer.append(runId, [{ event: 'run.cancelled', data: {} }]), 'ended');
      await expectRefused(other.append(runId, [delta('late')]), 'ended');
      expect(seqs(await readAll(other, runId, 0))).toEqual([1, 2]);
    });

    it('refuses a writer another writer has overtaken, writing no duplicate seq, until it resumes from lastSeq', async () => {
      const [first, second] = [await node(), await node()];
      const runId = randomUUID();
      await first.append(runId, deltas(2));
      expect(seqs(await second.append(runId, [delta('second')]))).toEqual([3]);
      await expectRefused(first.append(runId, [delta('stale')]), 'stale');
      await expectRefused(first.append(runId, [delta('still stale')]), 'stale');
      expect(await first.lastSeq(runId)).toBe(3);
      expect(seqs(await first.append(runId, [delta('resumed'), completed]))).toEqual([4, 5]);
      const events = await readAll(second, runId, 0);
      expect(seqs(events)).toEqual(range(1, 5));
      expect(events.map((event) => event.data.delta ?? event.event)).toEqual(['t0', 't1', 'second', 'resumed', 'run.completed']);
    });

    it('keeps the order of appends the writer does not wait for, each answered with its own seqs', async () => {
      const [writer, readerNode] = [await node(), await node()];
      const runId = randomUUID();
      const reader = startReading(readerNode, runId, 0);
      await writer.append(runId, [{ event: 'run.queued', data: {} }]);
      // A model's deltas, appended as they come without waiting for each (as the runner does).
      const appended = await Promise.all([...Array.from({ length: 30 }, (_, i) => writer.append(runId, [delta(`t${i}`)])), writer.append(runId, deltas(3, 30)), writer.append(runId, [completed])]);
      expect(appended.map(seqs)).toEqual([...range(2, 31).map((seq) => [seq]), [32, 33, 34], [35]]);
      await withinMs(reader.done, 2_000, 'the reader to end');
      expect(seqs(reader.events)).toEqual(range(1, 35));
      expect(reader.events.slice(1, -1).map((event) => event.data.delta)).toEqual(Array.from({ length: 33 }, (_, i) => `t${i}`));
    });

    it('refuses the appends made behind a refused one, writing none of them', async () => {
      const [first, second] = [await node(), await node()];
      const runId = randomUUID();
      await first.append(runId, deltas(2));
      await second.append(runId, [delta('second')]);
      const outcomes = await Promise.allSettled([first.append(runId, [delta('stale')]), first.append(runId, [delta('behind')]), first.append(runId, [completed])]);
      for (const outcome of outcomes) {
        expect(outcome.status).toBe('rejected');
        expect((outcome as PromiseRejectedResult).reason).toBeInstanceOf(RunEventsRefusedError);
      }
      expect(await second.lastSeq(runId)).toBe(3);
    });

    it('a lease holder\'s RunWriter refused as stale asks whether it still holds the run: if so it catches up, every append in order; if not, it stops', async () => {
      const [old, owner, third, readerNode] = [await node(), await node(), await node(), await node()];
      const runId = randomUUID();
      await old.append(runId, deltas(2));
      // The new owner reads the top; the old worker, whose lease expired unnoticed, appends once more.
      await owner.lastSeq(runId);
      await old.append(runId, [delta('stale')]);
      let asked = 0;
      // The question goes to the database: answered at once, then after a round trip during which the writer goes on appending.
      const writer = new RunWriter(owner, runId, () => (asked++ === 0 ? Promise.resolve(true) : sleep(10).then(() => true)));
      // Appends made without waiting, before and while the refusal comes back, and one waited for.
      for (let i = 0; i < 20; i++) writer.add([delta(`n${i}`)]);
      const awaited = writer.append([delta('awaited')]);
      for (let i = 20; i < 25; i++) writer.add([delta(`n${i}`)]);
      expect(seqs(await awaited)).toEqual([24]);
      await writer.settle();
      expect(asked).toBe(1);
      // Another writer gets in again, mid-stream: one more catch-up, the order kept.
      await third.lastSeq(runId);
      await third.append(runId, [delta('third')]);
      for (let i = 25; i < 65; i++) {
        writer.add([delta(`n${i}`)]);
        await sleep(1);
      }
      await writer.settle();
      expect(asked).toBe(2);

      // The old worker's next append is refused; it no longer holds the run: the refusal stands, without asking again.
      let oldAsked = 0;
      const stopped = new RunWriter(old, runId, () => Promise.resolve(++oldAsked < 0));
      await expectRefused(stopped.append([delta('late')]), 'stale');
      stopped.add([delta('later')]);
      await expectRefused(stopped.settle(), 'stale');
      expect(oldAsked).toBe(1);

      writer.add([completed]);
      await writer.settle();
      const events = await readAll(readerNode, runId, 0);
      expect(seqs(events)).toEqual(range(1, events.length));
      const mine = [...Array.from({ length: 20 }, (_, i) => `n${i}`), 'awaited', ...Array.from({ length: 5 }, (_, i) => `n${20 + i}`)];
      expect(events.map((event) => event.data.delta ?? event.event)).toEqual(['t0', 't1', 'stale', ...mine, 'third', ...Array.from({ length: 40 }, (_, i) => `n${25 + i}`), 'run.completed']);
    });

    it('lets exactly one of two writers racing from the same seq append', async () => {
      const [first, second] = [await node(), await node()];
      const runId = randomUUID();
      await first.append(runId, [delta('a')]);
      expect(await second.lastSeq(runId)).toBe(1);
      const outcomes = await Promise.allSettled([first.append(runId, deltas(3)), second.append(runId, deltas(2))]);
      const won = outcomes.filter((outcome) => outcome.status === 'fulfilled');
      const lost = outcomes.filter((outcome) => outcome.status === 'rejected');
      expect(won).toHaveLength(1);
      expect(lost).toHaveLength(1);
      expect((lost[0] as PromiseRejectedResult).reason).toBeInstanceOf(RunEventsRefusedError);
      const count = 1 + (won[0] as PromiseFulfilledResult<RunEvent[]>).value.length;
      expect(await first.lastSeq(runId)).toBe(count);
      await first.append(runId, [completed]);
      expect(seqs(await readAll(second, runId, 0))).toEqual(range(1, count + 1));
    });

    it('serves a fast reader at once while a slow one lags, then gives the slow one everything', async () => {
      const log = await node();
      const runId = randomUUID();
      const slowAbort = new AbortController();
      const slow = log.read(runId, 0, slowAbort.signal)[Symbol.asyncIterator]();
      const fast = startReading(log, runId, 0);
      await log.append(runId, [delta('first')]);
      expect((await withinMs(slow.next(), 2_000, 'the slow reader\'s first event')).value).toMatchObject({ seq: 1 });
      // The slow reader takes nothing more while 500 events are written: no writer and no other reader waits for it.
      const started = Date.now();
      for (let batch = 0; batch < 50; batch++) await log.append(runId, deltas(10, 1 + batch * 10));
      await log.append(runId, [completed]);
      await withinMs(fast.done, 5_000, 'the fast reader to end');
      const fastMs = Date.now() - started;
      expect(seqs(fast.events)).toEqual(range(1, 502));
      expect(fastMs).toBeLessThan(5_000);

      const rest: RunEvent[] = [];
      for (let next = await slow.next(); !next.done; next = await slow.next()) rest.push(next.value);
      expect(seqs(rest)).toEqual(range(2, 502));
    });

    it('serves 200 concurrent readers on one node, each every event once and in order', async () => {
      const [writer, readerNode] = [await node(), await node()];
      const runId = randomUUID();
      await writer.append(runId, deltas(5));
      const readers = Array.from({ length: 200 }, (_, i) => startReading(readerNode, runId, i % 6));
      for (let batch = 0; batch < 10; batch++) {
        await writer.append(runId, deltas(5, 5 + batch * 5));
        await sleep(2);
      }
      await writer.append(runId, [completed]);
      await withinMs(Promise.all(readers.map((reader) => reader.done)), 10_000, '200 readers to end');
      readers.forEach((reader, i) => expect(seqs(reader.events)).toEqual(range((i % 6) + 1, 56)));
    });

    it('reads on one node what another node appends, replayed and live', async () => {
      const [nodeA, nodeB] = [await node(), await node()];
      const { runId, reader } = await replayed(nodeA, nodeB, 3, 1);
      const sent = Date.now();
      await nodeA.append(runId, [delta('live')]);
      await until(() => reader.events.length === 3, 1_000, 'the live event on node B');
      expect(Date.now() - sent).toBeLessThan(1_000);
      await nodeA.append(runId, [completed]);
      await withinMs(reader.done, 2_000, 'the reader on node B to end');
      expect(reader.events.map((event) => [event.seq, event.data.delta ?? event.event])).toEqual([
        [2, 't1'],
        [3, 't2'],
        [4, 'live'],
        [5, 'run.completed'],
      ]);
    });

    it('keeps runs apart: a reader sees only its run', async () => {
      const log = await node();
      const [runA, runB] = [randomUUID(), randomUUID()];
      const readerA = startReading(log, runA, 0);
      const readerB = startReading(log, runB, 0);
      await log.append(runB, deltas(3));
      await log.append(runA, [delta('a'), completed]);
      await withinMs(readerA.done, 2_000, 'run A\'s reader to end');
      expect(readerA.events.map((event) => event.data.run_id)).toEqual([runA, runA]);
      await until(() => readerB.events.length === 3, 2_000, 'run B\'s events');
      expect(readerB.ended()).toBe(false);
      readerB.abort();
      await readerB.done;
    });
  });
}

export function runSignalsContract(name: string, makeSignals: Factory<RunSignals>): void {
  describe(`${name}: run signals`, () => {
    const node = nodesOf(makeSignals);

    /** Subscribes and records every onCancel call with when it came. */
    function listen(signals: RunSignals, runId: string) {
      const calls: { reason: string | undefined; at: number }[] = [];
      const unsubscribe = signals.subscribe(runId, (reason) => calls.push({ reason, at: Date.now() }));
      return { calls, unsubscribe };
    }

    it('delivers a cancel sent on another node within 1 s, with its reason', async () => {
      const [worker, api] = [await node(), await node()];
      const runId = randomUUID();
      const listener = listen(worker, runId);
      await sleep(100); // the worker is listening, as a running run's would be
      const sent = Date.now();
      await api.cancel(runId, 'cancelled by the user');
      await until(() => listener.calls.length === 1, 1_000, 'the cancel on the other node');
      expect(listener.calls[0]!.reason).toBe('cancelled by the user');
      expect(listener.calls[0]!.at - sent).toBeLessThan(1_000);
      listener.unsubscribe();
    });

    it('delivers a cancel sent on the same node, without a reason as undefined', async () => {
      const signals = await node();
      const runId = randomUUID();
      const listener = listen(signals, runId);
      await signals.cancel(runId);
      await until(() => listener.calls.length === 1, 1_000, 'the cancel');
      expect(listener.calls[0]!.reason).toBeUndefined();
    });

    it('calls onCancel at most once, and never after unsubscribe', async () => {
      const [worker, api] = [await node(), await node()];
      const [runId, other] = [randomUUID(), randomUUID()];
      const once = listen(worker, runId);
      const gone = listen(worker, other);
      await sleep(100);
      gone.unsubscribe();
      await api.cancel(runId, 'first');
      await api.cancel(runId, 'second');
      await worker.cancel(runId, 'third');
      await api.cancel(other, 'after unsubscribe');
      await sleep(300);
      expect(once.calls.map((call) => call.reason)).toEqual(['first']);
      expect(gone.calls).toEqual([]);
    });

    it('does not lose a cancel sent before the worker subscribed', async () => {
      const api = await node();
      const runId = randomUUID();
      await api.cancel(runId, 'early');
      await api.cancel(runId, 'later'); // the first cancel is the one reported
      const worker = await node();
      const listener = listen(worker, runId);
      await until(() => listener.calls.length === 1, 1_000, 'the earlier cancel');
      expect(listener.calls[0]!.reason).toBe('early');
      const sameNode = listen(api, runId);
      await until(() => sameNode.calls.length === 1, 1_000, 'the earlier cancel on the sending node');
    });

    it('calls every subscriber of the run, and no subscriber of another run', async () => {
      const [worker, api] = [await node(), await node()];
      const [runId, other] = [randomUUID(), randomUUID()];
      const first = listen(worker, runId);
      const second = listen(worker, runId);
      const bystander = listen(worker, other);
      await sleep(100);
      await api.cancel(runId, 'stop');
      await until(() => first.calls.length === 1 && second.calls.length === 1, 1_000, 'both subscribers');
      await api.cancel(randomUUID(), 'nobody listens'); // resolves all the same
      await sleep(200);
      expect(bystander.calls).toEqual([]);
    });
  });
}
