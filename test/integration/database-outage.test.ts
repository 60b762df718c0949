import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { sql } from 'drizzle-orm';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import pg from 'pg';
import { describe, expect, it } from 'vitest';

import { type Database, openDatabase, transaction } from '../../src/core/db.js';
import { DATABASE_RETRY_AFTER_SECONDS } from '../../src/core/db-errors.js';

import { getBalance, ledgerSum } from '../../src/crud/billing.js';
import { UNWRITTEN_DIR } from '../../src/services/unwritten-usage.js';
import { buildTestApp, openTestDatabase, testSettings } from '../helpers/app.js';
import { createUser, loginRequest, superuserHeaders } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { call } from '../helpers/http.js';
import { captureLogs, LEVEL } from '../helpers/logs.js';
import { addFakeModels, chatRequest } from '../helpers/metered-models.js';
import { adminQuery } from '../helpers/postgres.js';
import { SilentProxy } from '../helpers/silent-proxy.js';

const adminUrl = process.env.DATABASE_URL;

function expectUnavailable(response: LightMyRequestResponse, label: string): void {
  expect(response.statusCode, `${label}: ${response.body}`).toBe(503);
  expect(response.headers['retry-after'], label).toBe(String(DATABASE_RETRY_AFTER_SECONDS));
  expect(response.json(), label).toEqual({ detail: 'Service unavailable' });
}

// Server mode only: an embedded database cannot be dropped from under the app.
describe.skipIf(!adminUrl)('a database dropped while the app runs', () => {
  it('answers 503 with Retry-After on every route that needs it, as /ready does', async () => {
    const opened = await openTestDatabase();
    let app: FastifyInstance | null = null;
    try {
      const logs = captureLogs('error');
      app = await buildTestApp(opened.database, {}, { logger: logs.logger });
      const alice = await createUser(app);
      const admin = await superuserHeaders(app);
      const name = new URL(opened.url!).pathname.slice(1);
      await adminQuery(adminUrl!, `drop database "${name}" with (force)`);

      // Twice: first the pool's connections were terminated (57P01), then reconnecting finds no database (3D000).
      for (let round = 1; round <= 2; round++) {
        expectUnavailable(await loginRequest(app, alice.email, alice.password), `login, round ${round}`);
        expectUnavailable(await app.inject({ method: 'GET', url: '/api/v1/projects/', headers: admin }), `projects, round ${round}`);
        expectUnavailable(
          await app.inject({ method: 'POST', url: '/api/v1/users/signup', payload: { email: `new-${round}@keel.test`, password: 'long-enough-password' } }),
          `signup, round ${round}`,
        );
      }
      expect((await app.inject({ method: 'GET', url: '/ready' })).statusCode).toBe(503);
      // Six requests refused within seconds: one line says so, not one each (an outage under load
      // wrote tens of thousands). The file's first outage: nothing before it was left out.
      const written = logs.lines().filter((line) => line.msg === 'database unavailable');
      expect(written).toHaveLength(1);
      expect(written[0]!.err).toBeDefined();
    } finally {
      await app?.close();
      await opened.destroy();
    }
  });
});

describe.skipIf(!adminUrl)('a database that fails one statement while the app runs', () => {
  it('a connection lost in the middle of a transaction fails that transaction, and the process goes on', async () => {
    const opened = await openTestDatabase();
    let app: FastifyInstance | null = null;
    try {
      app = await buildTestApp(opened.database);
      const admin = await superuserHeaders(app);
      const name = new URL(opened.url!).pathname.slice(1);
      // A checked-out client (a transaction's) whose server goes away: its 'error' event had no listener and crashed the process.
      const sleeping = opened.database.db.transaction(async (tx) => {
        await tx.execute(sql`select 1`);
        await tx.execute(sql`select pg_sleep(30)`);
      });
      const failed = sleeping.then(
        () => 'committed',
        (error: Error) => error.message,
      );
      await expect
        .poll(async () => (await adminQuery<{ n: number }>(adminUrl!, `select count(*)::int as n from pg_stat_activity where datname = $1 and query like 'select pg_sleep%'`, [name]))[0]!.n)
        .toBe(1);
      await adminQuery(adminUrl!, `select pg_terminate_backend(pid) from pg_stat_activity where datname = $1 and query like 'select pg_sleep%'`, [name]);
      expect(await failed).not.toBe('committed');
      // The pool dropped that connection: the next requests are served.
      expect((await app.inject({ method: 'GET', url: '/api/v1/projects/', headers: admin })).statusCode).toBe(200);
    } finally {
      await app?.close();
      await opened.destroy();
    }
  });

  it('a statement past DATABASE_STATEMENT_TIMEOUT_MS (a table locked elsewhere) answers 503 with Retry-After, not 500', async () => {
    const opened = await openTestDatabase({ DATABASE_STATEMENT_TIMEOUT_MS: '300' });
    let app: FastifyInstance | null = null;
    const locker = new pg.Client({ connectionString: opened.url! });
    try {
      app = await buildTestApp(opened.database);
      const admin = await superuserHeaders(app);
      await locker.connect();
      await locker.query('begin');
      await locker.query('lock table projects in access exclusive mode');
      expectUnavailable(await app.inject({ method: 'GET', url: '/api/v1/projects/', headers: admin }), 'projects while locked');
      await locker.query('rollback');
      expect((await app.inject({ method: 'GET', url: '/api/v1/projects/', headers: admin })).statusCode).toBe(200);
    } finally {
      await locker.end().catch(() => undefined);
      await app?.close();
      await opened.destroy();
    }
  });
});

describe.skipIf(!adminUrl)('a database server gone silent (a network black hole, a paused proxy)', () => {
  // The server's limit 300 ms: the app waits 2.3 s for an answer before it gives up on the server.
  // One client; a request that would wait for it behind a background statement gives up within a second.
  const SILENT_SETTINGS = { DATABASE_STATEMENT_TIMEOUT_MS: '300', DATABASE_POOL_SIZE: '1', DATABASE_CONNECT_TIMEOUT_MS: '1000' };
  const GIVES_UP_WITHIN_MS = 300 + 2_000 + 1_500;

  interface Silent {
    opened: Awaited<ReturnType<typeof openTestDatabase>>;
    proxy: SilentProxy;
    database: Database;
  }

  /** A database of its own reached through a SilentProxy; all of it closed after `work`. */
  async function throughProxy(work: (silent: Silent) => Promise<void>): Promise<void> {
    const opened = await openTestDatabase();
    const target = new URL(opened.url!);
    const proxy = await SilentProxy.start({ host: target.hostname, port: Number(target.port || 5432) });
    const database = await openDatabase(testSettings({ ...SILENT_SETTINGS, DATABASE_URL: proxy.url(opened.url!) }));
    try {
      await work({ opened, proxy, database });
    } finally {
      proxy.speak();
      await database.close();
      await proxy.close();
      await opened.destroy();
    }
  }

  it('a transaction waiting on it fails in bounded time, and its connection is not handed to the next caller', async () => {
    await throughProxy(async ({ opened, proxy, database }) => {
      await adminQuery(opened.url!, 'create table silent_probe (label text)');
      const started = Date.now();
      const failure = await transaction(database.db, async (tx) => {
        await tx.execute(sql`insert into silent_probe values ('in the transaction')`);
        proxy.fallSilent();
        await tx.execute(sql`select 1`);
      }).then(
        () => null,
        (error: Error) => error,
      );
      expect(failure, 'the transaction failed').not.toBeNull();
      expect(Date.now() - started).toBeLessThan(GIVES_UP_WITHIN_MS);

      // The server speaks again. With the pool's one connection kept, it would have answered the
      // statement that timed out and left that transaction open: this insert would run inside it, never committed.
      proxy.speak();
      await database.db.execute(sql`insert into silent_probe values ('after')`);
      expect(await adminQuery(opened.url!, 'select label from silent_probe')).toEqual([{ label: 'after' }]);
    });
  });

  it("a transaction whose BEGIN gets no answer gives its connection back: the pool's one client is not lost for good", async () => {
    await throughProxy(async ({ proxy, database }) => {
      await database.db.execute(sql`select 1`);
      proxy.fallSilent();
      const failure = await transaction(database.db, async (tx) => {
        await tx.execute(sql`select 1`);
      }).then(
        () => null,
        (error: Error) => error,
      );
      expect(failure, 'the transaction failed').not.toBeNull();
      proxy.speak();
      // Drizzle's own transaction never gave back a client whose BEGIN failed: the pool stayed full,
      // and this waited for a client until DATABASE_CONNECT_TIMEOUT_MS, as every later request would.
      await database.db.execute(sql`select 1`);
      await transaction(database.db, async (tx) => {
        await tx.execute(sql`select 1`);
      });
    });
  });

  it('a request answers 503 with Retry-After in bounded time, and requests are served once the server speaks again', async () => {
    await throughProxy(async ({ proxy, database }) => {
      let app: FastifyInstance | null = null;
      try {
      app = await buildTestApp(database, SILENT_SETTINGS);
      const admin = await superuserHeaders(app);
      proxy.fallSilent();
      const started = Date.now();
      expectUnavailable(await app.inject({ method: 'GET', url: '/api/v1/projects/', headers: admin }), 'projects while silent');
      expect(Date.now() - started).toBeLessThan(GIVES_UP_WITHIN_MS);
      proxy.speak();
      expect((await app.inject({ method: 'GET', url: '/api/v1/projects/', headers: admin })).statusCode).toBe(200);
      } finally {
        await app?.close();
      }
    });
  });

  it("a session's statements (migrations) are not cut by that limit: they wait as long as they take", async () => {
    await throughProxy(async ({ database }) => {
      // As migrations do: the server's limit lifted for the session, then a statement longer than the app's wait (2.3 s).
      const [row] = await database.withSession(async (session) => {
        await session.exec('set statement_timeout = 0');
        return session.query<{ slept: boolean }>('select pg_sleep(2.6) is not null as slept');
      });
      expect(row).toEqual({ slept: true });
    });
  });
});

describe.skipIf(!adminUrl)('the database down when the app stops', () => {
  it('usage it would not take is saved under DATA_DIR and written by the next start: every call charged once, the blocks given back', async () => {
    const opened = await openTestDatabase();
    const fake = await FakeModelServer.start();
    fake.defaultReply = { text: 'four', usage: { prompt_tokens: 1, completion_tokens: 4 } };
    const name = new URL(opened.url!).pathname.slice(1);
    // One DATA_DIR (and SECRET_KEY, which opens the provider's key) for every process; the flush
    // timer far away, so the calls' usage is still in memory at the stop.
    const settings = { BILLING_ENABLED: 'true', DATA_DIR: mkdtempSync(join(tmpdir(), 'keel-unwritten-')), USAGE_FLUSH_INTERVAL_MS: '600000', MODEL_MAX_RETRIES: '0', SECRET_KEY: randomBytes(32).toString('hex') };
    const saved = join(settings.DATA_DIR, UNWRITTEN_DIR);
    let first: FastifyInstance | null = null;
    let next: FastifyInstance | null = null;
    try {
      first = await buildTestApp(opened.database, settings);
      const admin = await superuserHeaders(first);
      await addFakeModels(first, admin, fake.url);
      const user = await createUser(first);
      expect((await call(first, 'POST', '/billing/credits', admin, { user_id: user.user.id, amount: '1000', description: 'test credits' })).statusCode).toBe(200);
      for (let i = 0; i < 5; i++) await first.models.chat(chatRequest('fake-billed', { user_id: user.user.id }, { maxOutputTokens: 10 }));

      await adminQuery(adminUrl!, `alter database "${name}" allow_connections false`);
      await adminQuery(adminUrl!, 'select pg_terminate_backend(pid) from pg_stat_activity where datname = $1', [name]);
      await first.close();
      first = null;
      // The usage rows, the charges and the blocks' releases, in files that sort in that order.
      const [file, ...rest] = readdirSync(saved).sort();
      expect([file, ...rest]).toEqual([expect.stringMatching(/-000000\.json$/), expect.stringMatching(/-000001\.json$/), expect.stringMatching(/-000002\.json$/)]);
      // As a process killed after it took the file left it (its id no longer runs), beside a file no one can read.
      const gone = spawnSync(process.execPath, ['-e', '']).pid;
      renameSync(join(saved, file!), join(saved, `${file}.${gone}.taken`));
      writeFileSync(join(saved, '0-1-broken.json'), '{"usage": [');

      const copies = join(settings.DATA_DIR, 'copies');
      mkdirSync(copies);
      for (const saving of readdirSync(saved)) copyFileSync(join(saved, saving), join(copies, saving));

      await adminQuery(adminUrl!, `alter database "${name}" allow_connections true`);
      next = await buildTestApp(opened.database, settings);
      await next.meter.idle();
      const expectChargedOnce = async () => {
        const counts = await opened.database.db.execute(
          sql`select (select count(*)::int from usage_records where owner_id = ${user.user.id}) as usage,
                     (select count(*)::int from credit_transactions where owner_id = ${user.user.id} and type = 'usage') as charges,
                     (select count(*)::int from credit_reservations where user_id = ${user.user.id}) as holds`,
        );
        expect((counts as { rows: unknown[] }).rows[0]).toEqual({ usage: 5, charges: 5, holds: 0 });
        const account = await getBalance(opened.database.db, user.user.id);
        expect([Number(account.balance), Number(account.reserved)]).toEqual([1000 - 5 * 4, 0]);
        expect(Number(await ledgerSum(opened.database.db, user.user.id))).toBe(1000 - 5 * 4);
      };
      await expectChargedOnce();
      expect(readdirSync(saved)).toEqual(['0-1-broken.json.unreadable']);
      await next.close();
      next = null;

      // As a process killed after writing them but before deleting their files leaves them: the
      // same files again. The next start writes nothing twice (every write in them is idempotent by
      // usage record and ledger entry id), and finds nothing to warn of.
      rmSync(join(saved, '0-1-broken.json.unreadable'));
      for (const copy of readdirSync(copies)) if (!copy.includes('broken')) copyFileSync(join(copies, copy), join(saved, copy));
      const logs = captureLogs('info');
      next = await buildTestApp(opened.database, settings, { logger: logs.logger });
      await next.meter.idle();
      await expectChargedOnce();
      expect(readdirSync(saved)).toEqual([]);
      expect(logs.lines().filter((line) => (line.level as number) >= LEVEL.warn)).toEqual([]);
    } finally {
      await adminQuery(adminUrl!, `alter database "${name}" allow_connections true`).catch(() => undefined);
      await first?.close().catch(() => undefined);
      await next?.close();
      await fake.close();
      await opened.destroy();
      rmSync(settings.DATA_DIR, { recursive: true, force: true });
    }
  });
});
