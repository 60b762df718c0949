import DataLoader from 'dataloader';

import type { Db } from '../core/db.js';

/**
 * Reads rows by id, folding the lookups that arrive together (the same pass of the event loop)
 * into one `id = any($1)` query. Under concurrent requests one round trip serves many of them:
 * on this machine a round trip's system calls cost more than the lookup itself. Nothing is
 * cached: every call reads the database. One loader per database handle (a transaction is one).
 */
export function batchedById<T extends { id: string }>(
  readMany: (db: Db, ids: string[]) => Promise<T[]>,
): (db: Db, id: string) => Promise<T | undefined> {
  const loaders = new WeakMap<Db, DataLoader<string, T | undefined>>();
  return (db, id) => {
    let loader = loaders.get(db);
    if (!loader) {
      loader = new DataLoader<string, T | undefined>(
        async (ids) => {
          const rows = await readMany(db, [...ids]);
          const byId = new Map(rows.map((row) => [row.id, row]));
          return ids.map((key) => byId.get(key));
        },
        // setImmediate, not DataLoader's default (the next tick): requests read from different
        // sockets in one pass of the event loop then share a batch, not only those of one callback.
        { cache: false, maxBatchSize: 100, batchScheduleFn: (run) => setImmediate(run) },
      );
      loaders.set(db, loader);
    }
    return loader.load(id);
  };
}
