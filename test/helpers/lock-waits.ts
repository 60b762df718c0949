/**
 * What the tests that play lock races need from the database and the app: rows of a raw query,
 * who waits for which lock (the server's view: PGlite runs one session at a time, so nothing
 * waits there), a bounded wait, and a user with credits. `ctx` is the file's `useTestApp`.
 */
import { type SQL, sql } from 'drizzle-orm';
import { expect } from 'vitest';

import type { SqlSession } from '../../src/core/db.js';

import type { TestContext } from './app.js';
import { createUser, type TestUser } from './factories.js';
import { apiOf } from './http.js';

/** Longer than a call to the fake model takes, shorter than a test's timeout. */
export const PATIENCE_MS = 3_000;

/** `work`'s outcome, or 'waited' if it is not done within PATIENCE_MS. */
export async function unlessItWaits<T>(work: Promise<T>): Promise<T | 'waited'> {
  let timer: NodeJS.Timeout | undefined;
  const waited = new Promise<'waited'>((resolve) => {
    timer = setTimeout(() => resolve('waited'), PATIENCE_MS);
  });
  try {
    return await Promise.race([work, waited]);
  } finally {
    clearTimeout(timer);
  }
}

export async function backendPid(session: SqlSession): Promise<number> {
  const [row] = await session.query<{ pid: number }>('select pg_backend_pid() as pid');
  return row!.pid;
}

export function lockWaits(ctx: TestContext) {
  async function rowsOf<T>(query: SQL): Promise<T[]> {
    return ctx.database.db.execute(query).then((result) => (result as { rows: T[] }).rows);
  }
  async function count(where: SQL): Promise<number> {
    const [row] = await rowsOf<{ n: number }>(sql`select count(*)::int as n from pg_stat_activity where ${where}`);
    return row?.n ?? 0;
  }
  return {
    rowsOf,
    /** Backends of this database waiting for a lock, whichever. */
    waitingForLocks: () => count(sql`datname = current_database() and wait_event_type = 'Lock'`),
    /** Backends waiting for a lock that backend `pid` holds. */
    blockedBy: (pid: number) => count(sql`${pid}::int = any(pg_blocking_pids(pid))`),
    /** Whether backend `pid` waits for a lock. */
    waitingForLock: async (pid: number) => (await count(sql`pid = ${pid}::int and wait_event_type = 'Lock'`)) > 0,
    /** Backends waiting for an advisory lock (the superuser changes' one: crud/user.ts lockSuperusers). */
    waitingForAdvisoryLock: () => count(sql`datname = current_database() and wait_event_type = 'Lock' and wait_event = 'advisory'`),
  };
}

/** A user (a superuser with `superuser`) granted 100 credits by `admin`. */
export async function creditedUser(ctx: TestContext, admin: Record<string, string>, options: { superuser?: boolean } = {}): Promise<TestUser> {
  const user = await createUser(ctx.app, options);
  const granted = await apiOf(ctx)('POST', '/billing/credits', admin, { user_id: user.user.id, amount: '100', description: 'test credits' });
  expect(granted.statusCode, granted.body).toBe(200);
  return user;
}
