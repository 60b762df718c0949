import { type Db, rootOf } from '../core/db.js';

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

/**
 * A prepared query that also runs inside a transaction. Drizzle binds a prepared query to the
 * handle it was built on, and a transaction is a new handle each time: built per transaction, a
 * hot query in one (a run's start, step and end) would pay Drizzle's SQL building on every call.
 * This builds it once on the root handle and, inside a transaction (opened with `transaction()`),
 * runs the same query on the transaction's connection.
 */
export function preparedAnywhere<T extends object>(name: string, build: (db: Db, name: string) => T): (db: Db) => T {
  const perRoot = preparedPerDb(name, build);
  return (db) => {
    const root = rootOf(db);
    const statement = perRoot(root);
    if (root === db) return statement;
    // Drizzle's prepared queries (PGlite's and node-postgres') send through `client`; the session of a transaction holds its connection.
    return Object.create(statement, { client: { value: (db as unknown as { session: { client: unknown } }).session.client } }) as T;
  };
}
