import type { Db } from '../core/db.js';

/** Every prepared statement's name, taken when its module loads (that is, at start-up). */
const statementNames = new Set<string>();

/**
 * Claims a prepared statement's name for the whole process. PostgreSQL keeps named statements per
 * connection, so two different queries under one name fail there (and not on PGlite, which ignores
 * the names): a second claim of a name throws, so the clash stops the start-up on either database.
 */
export function claimStatementName(name: string): string {
  if (!/^[a-z][a-z0-9_]{0,62}$/.test(name)) throw new Error(`invalid prepared statement name "${name}"`);
  if (statementNames.has(name)) throw new Error(`prepared statement name "${name}" is used twice`);
  statementNames.add(name);
  return name;
}

/**
 * One prepared statement per database handle, built on first use under the name claimed here.
 * Hot-path lookups go through this: a prepared query skips Drizzle's SQL building and the server's
 * parse/plan on every call.
 */
export function preparedPerDb<T>(name: string, build: (db: Db, name: string) => T): (db: Db) => T {
  claimStatementName(name);
  const cache = new WeakMap<Db, T>();
  return (db) => {
    let statement = cache.get(db);
    if (statement === undefined) {
      statement = build(db, name);
      cache.set(db, statement);
    }
    return statement;
  };
}
