/**
 * Embedded maintenance (core/maintenance.ts): PGlite has no autovacuum, so a round VACUUMs and
 * ANALYZEs the tables past autovacuum's thresholds itself, and does nothing on a PostgreSQL server.
 */
import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { Database } from '../../src/core/db.js';
import { EmbeddedMaintenance, startEmbeddedMaintenance } from '../../src/core/maintenance.js';

import { buildTestApp, openTestDatabase, testSettings } from '../helpers/app.js';
import { captureLogs, LEVEL } from '../helpers/logs.js';

const embedded = !process.env.DATABASE_URL;

interface SharedDatabase {
  database: Database;
  destroy: () => Promise<void>;
}

/**
 * One database for the blocks that need none of their own (each makes what its round needs, and
 * asserts nothing of what it did not make), opened once: a PGlite directory's copy, open and close
 * are most of such a block's time.
 */
function useSharedDatabase(): SharedDatabase {
  const shared = {} as SharedDatabase;
  beforeAll(async () => {
    Object.assign(shared, await openTestDatabase());
  });
  afterAll(async () => {
    await shared.destroy?.();
  });
  return shared;
}

/**
 * An app of its own with these settings (rounds run when a test asks: the interval is an hour), on
 * `shared`'s database (its close leaves it open), or on a database of its own: a fresh data
 * directory, no table vacuumed or analyzed yet.
 */
function useApp(overrides: Record<string, string> = {}, shared?: SharedDatabase) {
  const logs = captureLogs('info');
  const ctx = { logs } as { app: FastifyInstance; database: Database; logs: typeof logs; destroy?: () => Promise<void> };
  beforeAll(async () => {
    if (shared) {
      ctx.database = shared.database;
    } else {
      const opened = await openTestDatabase();
      ctx.database = opened.database;
      ctx.destroy = opened.destroy;
    }
    ctx.app = await buildTestApp(ctx.database, { PGLITE_MAINTENANCE_INTERVAL_SECONDS: '3600', PGLITE_MAINTENANCE_IDLE_MS: '0', ...overrides }, { logger: logs.logger });
  });
  afterAll(async () => {
    await ctx.app?.close();
    await ctx.destroy?.();
  });
  return ctx;
}

const query = <T extends Record<string, unknown>>(database: Database, text: string, params: unknown[] = []) => database.withSession((s) => s.query<T>(text, params));

interface TableStats extends Record<string, unknown> {
  dead: number;
  vacuums: number;
  analyzes: number;
  last_vacuum: Date | null;
}
/** The table's counters, this session's own sent first (it sends them at most once a second). */
async function statsOf(database: Database, table: string): Promise<TableStats> {
  await query(database, 'select pg_stat_force_next_flush()');
  const [stats] = await query<TableStats>(
    database,
    `select n_dead_tup::int as dead, vacuum_count::int as vacuums, analyze_count::int as analyzes, last_vacuum from pg_stat_user_tables where relname = $1`,
    [table],
  );
  return stats!;
}
const statisticRows = async (database: Database, table: string) =>
  (await query<{ n: number }>(database, `select count(*)::int as n from pg_stats where schemaname = current_schema() and tablename = $1`, [table]))[0]!.n;

/** What billing does all day: reservations inserted and deleted one at a time, the accounts updated with each. */
async function churn(database: Database, holds: number): Promise<void> {
  const users = await query<{ id: string }>(database, `insert into users (email, hashed_password) select 'churn-' || i || '-' || gen_random_uuid() || '@keel.test', 'x' from generate_series(1, 5) i returning id`);
  for (const { id } of users) await query(database, `insert into credit_accounts (user_id, balance) values ($1, 1000)`, [id]);
  for (let i = 0; i < holds; i++) {
    const user = users[i % users.length]!.id;
    const [held] = await query<{ id: string }>(
      database,
      `insert into credit_reservations (expires_at, user_id, account_amount, key_amount) values (now() + interval '10 minutes', $1, 0.01, 0) returning id`,
      [user],
    );
    await query(database, `update credit_accounts set reserved = reserved + 0.01 where user_id = $1`, [user]);
    await query(database, `delete from credit_reservations where id = $1`, [held!.id]);
    await query(database, `update credit_accounts set reserved = reserved - 0.01, balance = balance - 0.01 where user_id = $1`, [user]);
  }
}

describe.runIf(embedded)('embedded maintenance on PGlite', () => {
  const shared = useSharedDatabase();

  describe('a round after churn', () => {
    // A database of its own: its tables must never have been vacuumed or analyzed.
    const ctx = useApp();

    it('vacuums and analyzes the tables past the thresholds, logs each at info, and leaves the others alone', async () => {
      const { database, app, logs } = ctx;
      expect(app.maintenance).toBeInstanceOf(EmbeddedMaintenance);
      // A table with rows, maintained already and unchanged since: nothing to do there.
      const [owner] = await query<{ id: string }>(database, `select id from users limit 1`);
      await query(database, `insert into projects (owner_id, name) select $1, 'p' || i from generate_series(1, 200) i`, [owner!.id]);
      await query(database, 'select pg_stat_force_next_flush()');
      await database.withSession((s) => s.exec('vacuum (analyze) projects'));
      const projectsBefore = await statsOf(database, 'projects');
      await churn(database, 400);
      const before = await statsOf(database, 'credit_reservations');
      expect(before.dead).toBeGreaterThan(50);
      expect(before.last_vacuum).toBeNull();
      expect(await statisticRows(database, 'credit_accounts')).toBe(0);

      const report = await app.maintenance!.round();

      expect(report.vacuumed).toContain('credit_reservations');
      expect(report.analyzed).toContain('credit_accounts');
      expect(report.failed).toEqual([]);
      expect(report.vacuumed).not.toContain('projects');
      expect(report.analyzed).not.toContain('projects');
      const after = await statsOf(database, 'credit_reservations');
      expect(after.dead).toBe(0);
      expect(after.last_vacuum).not.toBeNull();
      expect(await statisticRows(database, 'credit_accounts')).toBeGreaterThan(0);
      expect(await statsOf(database, 'projects')).toMatchObject({ vacuums: projectsBefore.vacuums, analyzes: projectsBefore.analyzes });
      const line = logs.lines().find((l) => l.msg === 'embedded maintenance: table maintained' && l.table === 'credit_reservations');
      expect(line).toMatchObject({ level: LEVEL.info, component: 'embedded-maintenance', reasons: expect.arrayContaining(['dead tuples']) as unknown });
      expect(line!.deadTuples).toBeGreaterThan(50);

      // Done: the next round finds nothing past the thresholds in what it just maintained.
      const next = await app.maintenance!.round();
      expect(next.vacuumed).not.toContain('credit_reservations');
      expect(next.analyzed).not.toContain('credit_accounts');
    });
  });

  describe('transaction age', () => {
    const ctx = useApp({ PGLITE_MAINTENANCE_FREEZE_AGE: '1000' }, shared);

    it('freezes the tables whose oldest transaction is older than the freeze age, and the database age drops', async () => {
      const { database, app } = ctx;
      await query(database, `insert into projects (owner_id, name) select id, 'old' from users limit 1`);
      // Every write transaction takes a transaction id.
      for (let i = 0; i < 1_100; i++) await query(database, 'select txid_current()');
      const age = async () =>
        (await query<{ table: number; database: number }>(
          database,
          `select age(relfrozenxid)::int as table, (select age(datfrozenxid)::int from pg_database where datname = current_database()) as database from pg_class where relname = 'projects'`,
        ))[0]!;
      expect((await age()).table).toBeGreaterThan(1_000);

      const report = await app.maintenance!.round();

      expect(report.vacuumed).toContain('projects');
      expect(report.failed).toEqual([]);
      const after = await age();
      expect(after.table).toBeLessThan(1_000);
      // Every table was frozen (the catalogs too), so the database's own age moved with them.
      expect(after.database).toBeLessThan(1_000);
    });
  });

  describe('failures and idleness', () => {
    const ctx = useApp({}, shared);

    it('logs a failed statement at error and goes on with the other tables; the next round tries again', async () => {
      const { database, app, logs } = ctx;
      await churn(database, 200);
      // The database as the maintenance sees it, refusing to VACUUM one table (as a full disk would).
      let refuse = true;
      const failing: Database = {
        ...database,
        withSession: (work) =>
          database.withSession((session) =>
            work({
              ...session,
              exec: async (text) => {
                if (refuse && text.includes('credit_reservations')) throw new Error('could not extend file: No space left on device');
                return session.exec(text);
              },
            }),
          ),
      };
      const maintenance = new EmbeddedMaintenance(failing, app.settings, logs.logger);
      const report = await maintenance.round();
      expect(report.failed).toEqual(['credit_reservations']);
      expect(report.analyzed).toContain('credit_accounts');
      expect(logs.lines().find((l) => l.level === LEVEL.error && l.table === 'credit_reservations')).toMatchObject({ msg: expect.stringContaining('will try again') as unknown });

      refuse = false;
      const again = await maintenance.round();
      expect(again.vacuumed).toContain('credit_reservations');
      expect((await statsOf(database, 'credit_reservations')).dead).toBe(0);
      await maintenance.stop();
    });

    it('waits for the database to be idle: one never idle long enough before the next round leaves the work for that round', async () => {
      const { database, app } = ctx;
      await churn(database, 200);
      const maintenance = new EmbeddedMaintenance(database, { ...app.settings, PGLITE_MAINTENANCE_IDLE_MS: 600_000, PGLITE_MAINTENANCE_INTERVAL_SECONDS: 1 }, app.log);
      const report = await maintenance.round();
      expect(report.vacuumed).toEqual([]);
      expect(report.deferred).toContain('credit_reservations');
      expect((await statsOf(database, 'credit_reservations')).dead).toBeGreaterThan(50);
      await maintenance.stop();
    });

    it('a transaction open between its statements is no idle time (its VACUUM would hold up what follows its commit)', async () => {
      const { database } = ctx;
      let idleInside = -1;
      await database.db.transaction(async (tx) => {
        await tx.execute(sql`select 1`);
        await new Promise((resolve) => setTimeout(resolve, 150));
        idleInside = database.idleMs!();
      });
      expect(idleInside).toBe(0);
    });
  });

  describe('at close', () => {
    const ctx = useApp({ PGLITE_MAINTENANCE_IDLE_MS: '600000' }, shared);

    it('a round waiting for idleness ends when the app closes, and no statement follows', async () => {
      const { database, app } = ctx;
      await churn(database, 200);
      const waiting = app.maintenance!.round();
      await app.close();
      const report = await waiting;
      expect(report.vacuumed).toEqual([]);
      expect(report.deferred).toContain('credit_reservations');
    });
  });

  describe('at close, a statement in flight', () => {
    // A database of its own: the app's close closes it.
    it('the close waits for the VACUUM or ANALYZE in flight, sends no other, then closes the database', async () => {
      const opened = await openTestDatabase();
      const events: string[] = [];
      let sent!: () => void;
      const statementSent = new Promise<void>((resolve) => (sent = resolve));
      // The database as the app sees it: its maintenance statements and its close, in order.
      const watched: Database = {
        ...opened.database,
        withSession: (work) =>
          opened.database.withSession((session) =>
            work({
              ...session,
              exec: async (text) => {
                if (!/^(vacuum|analyze)\b/i.test(text)) return session.exec(text);
                events.push('sent');
                sent();
                const result = await session.exec(text);
                events.push('done');
                return result;
              },
            }),
          ),
        close: async () => {
          events.push('close');
          await opened.database.close();
        },
      };
      try {
        await churn(opened.database, 200);
        const app = await buildTestApp(watched, { PGLITE_MAINTENANCE_INTERVAL_SECONDS: '3600', PGLITE_MAINTENANCE_IDLE_MS: '0' }, { closeDatabase: true });
        const round = app.maintenance!.round();
        await statementSent;
        await app.close();
        const report = await round;
        expect(events).toEqual(['sent', 'done', 'close']);
        expect(report.failed).toEqual([]);
        expect(report.deferred.length).toBeGreaterThan(0);
      } finally {
        await opened.destroy();
      }
    });
  });

  describe('turned off', () => {
    const ctx = useApp({ PGLITE_MAINTENANCE: 'false' }, shared);

    it('PGLITE_MAINTENANCE=false starts nothing', () => {
      expect(ctx.app.maintenance).toBeNull();
    });
  });
});

describe.runIf(!embedded)('embedded maintenance on PostgreSQL', () => {
  const ctx = useApp();

  it('does nothing: autovacuum does it there', () => {
    expect(ctx.app.maintenance).toBeNull();
    expect(startEmbeddedMaintenance(ctx.database, testSettings({ PGLITE_MAINTENANCE: 'true' }), ctx.app.log)).toBeNull();
  });
});
