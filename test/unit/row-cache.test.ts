import { describe, expect, it } from 'vitest';

import { RowCache } from '../../src/core/row-cache.js';

const reader = (value: string | undefined) => {
  const calls = { count: 0 };
  return { calls, read: async () => (calls.count++, value) };
};

describe('RowCache', () => {
  it('reads once, then answers from memory until evicted', async () => {
    const cache = new RowCache<string>({ ttlMs: 60_000, maxEntries: 10 });
    const { calls, read } = reader('row');
    expect(await cache.load('a', read)).toBe('row');
    expect(await cache.load('a', read)).toBe('row');
    expect(calls.count).toBe(1);
    cache.evict('a');
    await cache.load('a', read);
    expect(calls.count).toBe(2);
  });

  it('does not store a row read before an eviction that happened while it was read', async () => {
    const cache = new RowCache<string>({ ttlMs: 60_000, maxEntries: 10 });
    let finish!: (v: string) => void;
    const slow = cache.load('a', () => new Promise<string>((resolve) => (finish = resolve)));
    cache.evict('a'); // the row changed while the old one was on its way
    finish('old');
    expect(await slow).toBe('old');
    const { calls, read } = reader('new');
    expect(await cache.load('a', read)).toBe('new');
    expect(calls.count).toBe(1);
  });

  it('reads through and keeps nothing while disabled; re-enabling starts empty', async () => {
    const cache = new RowCache<string>({ ttlMs: 60_000, maxEntries: 10, enabled: false });
    const { calls, read } = reader('row');
    await cache.load('a', read);
    await cache.load('a', read);
    expect(calls.count).toBe(2);
    cache.setEnabled(true);
    await cache.load('a', read);
    await cache.load('a', read);
    expect(calls.count).toBe(3);
    cache.setEnabled(false);
    await cache.load('a', read);
    expect(calls.count).toBe(4);
  });

  it('expires rows after the TTL, never caches a miss, and stays within maxEntries', async () => {
    const cache = new RowCache<string>({ ttlMs: 20, maxEntries: 2 });
    const missing = reader(undefined);
    await cache.load('gone', missing.read);
    await cache.load('gone', missing.read);
    expect(missing.calls.count).toBe(2);

    const a = reader('a');
    await cache.load('a', a.read);
    await new Promise((resolve) => setTimeout(resolve, 30));
    await cache.load('a', a.read);
    expect(a.calls.count).toBe(2);

    const b = reader('b');
    const c = reader('c');
    await cache.load('b', b.read);
    await cache.load('c', c.read); // the oldest entry ('a') makes room
    await cache.load('a', a.read);
    expect(a.calls.count).toBe(3);
  });
});
