import { describe, expect, it } from 'vitest';

import { AsyncQueue } from '../../src/utils/async-queue.js';

async function drain<T>(queue: AsyncQueue<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const item of queue) out.push(item);
  return out;
}

describe('AsyncQueue', () => {
  it('hands over queued items in order, then those pushed while the reader waits, and ends', async () => {
    const queue = new AsyncQueue<number>();
    queue.push(1);
    queue.push(2);
    const read = drain(queue);
    await Promise.resolve();
    queue.push(3);
    setTimeout(() => {
      queue.push(4);
      queue.end();
      queue.push(5); // after the end: not taken
    }, 5);
    expect(await read).toEqual([1, 2, 3, 4]);
  });

  it('throws a failure once the items queued before it are taken; with discard, at once', async () => {
    const queue = new AsyncQueue<string>();
    queue.push('a');
    queue.fail(new Error('upstream gone'));
    const seen: string[] = [];
    await expect(
      (async () => {
        for await (const item of queue) seen.push(item);
      })(),
    ).rejects.toThrow('upstream gone');
    expect(seen).toEqual(['a']);

    const discarding = new AsyncQueue<string>();
    discarding.push('a');
    discarding.fail(new Error('aborted'), true);
    await expect(discarding.next()).rejects.toThrow('aborted');
  });

  it('wakes a waiting reader with a failure', async () => {
    const queue = new AsyncQueue<number>();
    const next = queue.next();
    queue.fail(new Error('dropped'));
    await expect(next).rejects.toThrow('dropped');
  });

  it('a reader that stops early drops what is queued and tells the producer once; not after the end', async () => {
    let returned = 0;
    const queue = new AsyncQueue<number>({ onReturn: () => returned++ });
    queue.push(1);
    queue.push(2);
    for await (const item of queue) if (item === 1) break;
    expect(returned).toBe(1);
    expect(queue.size).toBe(0);
    queue.push(3);
    expect(await queue.next()).toEqual({ value: undefined, done: true });
    await queue.return();
    expect(returned).toBe(1);

    // Stopped from outside while a next() waits (a body destroyed while it waits for the next
    // event): the producer is told, and that next() gets what the producer ends with.
    let stops = 0;
    const waiting: AsyncQueue<number> = new AsyncQueue<number>({ onReturn: () => stops++ });
    const pending = waiting.next();
    await waiting.return();
    await waiting.return();
    expect(stops).toBe(1);
    waiting.fail(new Error('aborted by its reader'));
    await expect(pending).rejects.toThrow('aborted by its reader');
    await waiting.return();
    expect(stops).toBe(1);

    const ended = new AsyncQueue<number>({ onReturn: () => returned++ });
    ended.push(1);
    ended.end();
    for await (const item of ended) if (item === 1) break;
    expect(returned).toBe(1); // the producer was done already
  });

  it('tells a paused producer when the last item is taken, and loses nothing it pushes then', async () => {
    // A waiting reader is handed the one item pushed, which drains the queue inside the push.
    let drained = 0;
    const waited = new AsyncQueue<number>({ onDrained: () => drained++ });
    const next = waited.next();
    waited.push(7);
    expect(await next).toEqual({ value: 7, done: false });
    expect(drained).toBe(1);

    let pushed = false;
    const queue: AsyncQueue<number> = new AsyncQueue<number>({
      onDrained: () => {
        if (pushed) return;
        pushed = true;
        queue.push(3); // as a resumed upstream may, from inside the take
        queue.end();
      },
    });
    queue.push(1);
    queue.push(2);
    expect(await drain(queue)).toEqual([1, 2, 3]);
    expect(queue.size).toBe(0);
  });

  it('has one reader: a second next() while one waits is refused, and the first still gets its item', async () => {
    const queue = new AsyncQueue<number>();
    const first = queue.next();
    await expect(queue.next()).rejects.toThrow('another next() waits');
    queue.push(1);
    expect(await first).toEqual({ value: 1, done: false });
  });
});
