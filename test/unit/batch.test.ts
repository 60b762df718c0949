import { describe, expect, it } from 'vitest';

import type { Db } from '../../src/core/db.js';

import { batchedById } from '../../src/crud/batch.js';

// A stand-in handle: batchedById only uses it as a key and passes it through to readMany.
const db = {} as Db;
const otherDb = {} as Db;

describe('batchedById', () => {
  it('folds lookups made together into one read and gives each caller its own row', async () => {
    const reads: string[][] = [];
    const getById = batchedById<{ id: string; n: number }>(async (_db, ids) => {
      reads.push(ids);
      return ids.filter((id) => id !== 'missing').map((id) => ({ id, n: Number(id.slice(1)) }));
    });
    const results = await Promise.all(['a1', 'a2', 'missing', 'a3'].map((id) => getById(db, id)));
    expect(results).toEqual([{ id: 'a1', n: 1 }, { id: 'a2', n: 2 }, undefined, { id: 'a3', n: 3 }]);
    expect(reads).toEqual([['a1', 'a2', 'missing', 'a3']]);
  });

  it('batches lookups started from separate callbacks in one pass of the event loop', async () => {
    const reads: string[][] = [];
    const getById = batchedById<{ id: string }>(async (_db, ids) => (reads.push(ids), ids.map((id) => ({ id }))));
    // Like requests read from different sockets: separate macrotasks, each with its own microtasks.
    const results = await Promise.all(
      ['x', 'y', 'z'].map((id) => new Promise((resolve) => setImmediate(() => resolve(getById(db, id))))),
    );
    expect(results).toEqual([{ id: 'x' }, { id: 'y' }, { id: 'z' }]);
    expect(reads.length).toBeLessThanOrEqual(2);
    expect(reads.flat().sort()).toEqual(['x', 'y', 'z']);
  });

  it('never mixes database handles, never caches, and fails every caller of a failed batch', async () => {
    const reads: { db: Db; ids: string[] }[] = [];
    let fail = false;
    const getById = batchedById<{ id: string }>(async (handle, ids) => {
      reads.push({ db: handle, ids });
      if (fail) throw new Error('database down');
      return ids.map((id) => ({ id }));
    });
    await Promise.all([getById(db, 'a'), getById(otherDb, 'b')]);
    expect(reads.map((r) => r.ids)).toEqual([['a'], ['b']]);
    await getById(db, 'a');
    expect(reads).toHaveLength(3); // read again: no cache
    fail = true;
    const failed = await Promise.allSettled([getById(db, 'a'), getById(db, 'c')]);
    expect(failed.map((r) => r.status)).toEqual(['rejected', 'rejected']);
  });
});
