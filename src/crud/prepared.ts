import type { Db } from '../core/db.js';

/**
 * One prepared statement per database handle, built on first use. Hot-path lookups go through
 * this: a prepared query skips Drizzle's SQL building and the server's parse/plan on every call.
 */
export function preparedPerDb<T>(build: (db: Db) => T): (db: Db) => T {
  const cache = new WeakMap<Db, T>();
  return (db) => {
    let statement = cache.get(db);
    if (statement === undefined) {
      statement = build(db);
      cache.set(db, statement);
    }
    return statement;
  };
}
