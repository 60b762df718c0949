import { spawn, spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { UsageBacklogError } from '../../src/core/errors.js';

import * as billingCrud from '../../src/crud/billing.js';
import { saveUnwritten, UNWRITTEN_DIR, type UnwrittenUsage } from '../../src/services/unwritten-usage.js';
import { buildTestApp, useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { createKey, eventually, sleep } from '../helpers/http.js';
import { captureLogs } from '../helpers/logs.js';
import { addFakeModels, chatRequest, usageRowOf } from '../helpers/metered-models.js';
import { intercepting } from '../helpers/statements.js';

// A limit of 100 unwritten records; a flush every 10 rows (none on a timer), so each try to write
// is one the test sees fail.
const LIMIT = 100;
const settings = { USAGE_MAX_PENDING_ROWS: String(LIMIT), USAGE_FLUSH_MAX_ROWS: '10', USAGE_FLUSH_INTERVAL_MS: '600000', MODEL_MAX_RETRIES: '0' };
const logs = captureLogs('info');
const ctx = useTestApp(settings, { logger: logs.logger });

let fake: FakeModelServer;
let admin: Record<string, string>;

beforeAll(async () => {
  fake = await FakeModelServer.start();
  admin = await superuserHeaders(ctx.app);
  await addFakeModels(ctx.app, admin, fake.url);
});
afterAll(async () => {
  await fake.close();
});
beforeEach(() => {
  fake.reset();
  logs.clear();
});

async function usageCount(db: typeof ctx.database.db, userId: string): Promise<number> {
  const result = await db.execute(sql`select count(*)::int as n from usage_records where owner_id = ${userId}`);
  return (result as { rows: { n: number }[] }).rows[0]!.n;
}

/** Whether the key's spend is what its usage records add up to (and some), and what it still holds of its budget. */
async function keyFigures(keyId: string): Promise<{ charged: boolean; spentAsRecorded: boolean; reserved: string }> {
  const result = await ctx.database.db.execute(
    sql`select k.spent > 0 as charged, k.spent = (select sum(cost) from usage_records where api_key_id = k.id) as "spentAsRecorded", trim_scale(k.budget_reserved)::text as reserved
        from api_keys k where k.id = ${keyId}`,
  );
  return (result as { rows: { charged: boolean; spentAsRecorded: boolean; reserved: string }[] }).rows[0]!;
}

/** A maker of usage rows of `ownerId` as the meter queues them (JSON). */
const usageRow = (ownerId: string) => (): string => JSON.stringify(usageRowOf(ownerId, new Date().toISOString()));

const saved = (usage: string[]) => ({ usage, settlements: [], windowSettlements: [], blockReleases: [] });

/** The usage rows in the files of `dir`: saved, or taken by a process. */
const rowsOnDisk = (dir: string): string[] =>
  readdirSync(dir)
    .filter((name) => /\.json(\.\d+(_[0-9a-f-]+_\d+_\d+)?\.taken)?$/.test(name))
    .flatMap((name) => (JSON.parse(readFileSync(join(dir, name), 'utf8')) as { usage: string[] }).usage);

const idOf = (row: string): string => (JSON.parse(row) as { id: string }).id;

async function usageIds(db: typeof ctx.database.db, userId: string): Promise<Set<string>> {
  const result = await db.execute(sql`select id::text as id from usage_records where owner_id = ${userId}`);
  return new Set((result as { rows: { id: string }[] }).rows.map((row) => row.id));
}

/** The database "loses its connection" on every usage write (every charge too, with `charges`) while `work` runs. */
const usageWritesFail = (work: () => Promise<unknown>, charges = false) =>
  intercepting(
    ctx.database.db,
    (text) => {
      if ((charges ? /insert into (usage_records|credit_transactions)/i : /insert into usage_records/i).test(text)) throw new Error('Connection terminated unexpectedly');
    },
    work,
  );

/**
 * The database stops answering usage writes while `work` runs (they hang), and then fails them:
 * the flush that hung keeps what it held for a retry.
 */
async function hangingUsageWrites(work: () => Promise<unknown>): Promise<void> {
  let fail!: (error: Error) => void;
  const hanging = new Promise<never>((_, reject) => (fail = reject));
  hanging.catch(() => undefined); // when no statement waited on it
  await intercepting(
    ctx.database.db,
    async (text) => {
      if (/insert into usage_records/i.test(text)) await hanging;
    },
    async () => {
      try {
        await work();
      } finally {
        fail(new Error('Connection terminated unexpectedly'));
      }
    },
  );
}

describe('usage the database does not take', () => {
  it(`past USAGE_MAX_PENDING_ROWS unwritten records model calls are refused with 503 (nothing dropped), and resume once the database takes them`, async () => {
    const alice: TestUser = await createUser(ctx.app);
    const key = await createKey(ctx.app, alice, { name: 'backlog' });
    const context = { user_id: alice.user.id };
    await usageWritesFail(async () => {
      for (let i = 0; i < LIMIT; i++) await ctx.app.models.chat(chatRequest('fake-precise', context));
      await ctx.app.meter.idle(); // every call's record queued; the flushes failed
      await expect(ctx.app.models.chat(chatRequest('fake-precise', context))).rejects.toBeInstanceOf(UsageBacklogError);
      const refused = await ctx.app.inject({
        method: 'POST',
        url: '/v1/chat/completions',
        headers: { authorization: `Bearer ${key.key}` },
        payload: { model: 'fake-precise', messages: [{ role: 'user', content: 'Hello' }] },
      });
      expect(refused.statusCode, refused.body).toBe(503);
      expect(refused.headers['retry-after']).toBe('5');
      expect(refused.json<{ error: { message: string } }>().error.message).toMatch(/usage records cannot be written/);
    });
    // The refused calls never reached the model.
    expect(fake.log).toHaveLength(LIMIT);
    const refusals = logs.lines().filter((line) => line.msg === 'model calls refused: usage records are not being written to the database');
    expect(refusals).toHaveLength(1);

    await ctx.app.meter.idle();
    expect(await usageCount(ctx.database.db, alice.user.id)).toBe(LIMIT);
    expect(logs.lines().filter((line) => line.msg === 'usage records are being written again: model calls resume')).toHaveLength(1);
    await ctx.app.models.chat(chatRequest('fake-precise', context));
    await ctx.app.meter.idle();
    expect(await usageCount(ctx.database.db, alice.user.id)).toBe(LIMIT + 1);
  });

  it("the limit counts the records in the flush's statement in flight too: a statement that hangs lets no more calls through", async () => {
    const bob = await createUser(ctx.app);
    const context = { user_id: bob.user.id };
    await hangingUsageWrites(async () => {
      for (let i = 0; i < LIMIT; i++) await ctx.app.models.chat(chatRequest('fake-precise', context));
      await sleep(100); // every call's record queued: 10 in the flush's statement (USAGE_FLUSH_MAX_ROWS), which hangs, 90 in the buffer
      await expect(ctx.app.models.chat(chatRequest('fake-precise', context))).rejects.toBeInstanceOf(UsageBacklogError);
    });
    expect(fake.log).toHaveLength(LIMIT);
    await ctx.app.meter.idle();
    expect(await usageCount(ctx.database.db, bob.user.id)).toBe(LIMIT);
    // Under the limit again (none in flight): calls go.
    await ctx.app.models.chat(chatRequest('fake-precise', context));
  });

  it('calls that leave only a settlement (billing off, a key with a max_budget: it carries the usage row) count toward it too, and are written once after the outage', async () => {
    const carol = await createUser(ctx.app);
    const key = await createKey(ctx.app, carol, { name: 'budgeted', max_budget: '1000' });
    const context = { user_id: carol.user.id, api_key_id: key.id };
    const outage = usageOutageAfter(0);
    await intercepting(ctx.database.db, outage.intercept, async () => {
      for (let i = 0; i < LIMIT; i++) await ctx.app.models.chat(chatRequest('fake-precise', context));
      await ctx.app.meter.idle(); // every call's settlement tried and kept
      await expect(ctx.app.models.chat(chatRequest('fake-precise', context))).rejects.toBeInstanceOf(UsageBacklogError);
      outage.down = false;
      await ctx.app.meter.idle();
      expect(logs.lines().filter((line) => line.msg === 'usage records are being written again: model calls resume')).toHaveLength(1);
      await ctx.app.models.chat(chatRequest('fake-precise', context));
      await ctx.app.meter.idle();
    });
    expect(fake.log).toHaveLength(LIMIT + 1);
    expect(await usageCount(ctx.database.db, carol.user.id)).toBe(LIMIT + 1);
    // Each call's spend moved once: the key's spend is what its records add up to.
    expect(await keyFigures(key.id)).toEqual({ charged: true, spentAsRecorded: true, reserved: '0' });
  });

  it('a billed call counts once toward it, its usage row and its settlement together: calls are refused past USAGE_MAX_PENDING_ROWS calls, not half of them', async () => {
    // Per-call holds: each call leaves its usage row (the batch's) and its settlement (a statement of its own).
    const app = await buildTestApp(ctx.database, { ...settings, BILLING_ENABLED: 'true', BILLING_CREDIT_WINDOW_CALLS: '0' });
    try {
      const dana = await createUser(app);
      await billingCrud.changeBalance(ctx.database.db, { userId: dana.user.id, type: 'grant', amount: '100000', description: 'test credits', createdBy: dana.user.id });
      const call = () => app.models.chat(chatRequest('fake-billed', { user_id: dana.user.id }, { maxOutputTokens: 10 }));
      const outage = { down: true };
      const writesFail = (text: string) => {
        if (outage.down && /insert into (usage_records|credit_transactions)/i.test(text)) throw new Error('Connection terminated unexpectedly');
      };
      await intercepting(ctx.database.db, writesFail, async () => {
        for (let i = 0; i < LIMIT; i++) await call();
        await app.meter.idle(); // every call's row and settlement tried and kept
        await expect(call()).rejects.toBeInstanceOf(UsageBacklogError);
        outage.down = false;
        await app.meter.idle();
        await call();
        await app.meter.idle();
      });
      expect(fake.log).toHaveLength(LIMIT + 1);
      expect(await usageCount(ctx.database.db, dana.user.id)).toBe(LIMIT + 1);
      const entries = await ctx.database.db.execute(sql`select count(*)::int as n from credit_transactions where owner_id = ${dana.user.id} and type = 'usage'`);
      expect((entries as { rows: { n: number }[] }).rows[0]!.n).toBe(LIMIT + 1);
      expect(await billingCrud.getBalance(ctx.database.db, dana.user.id)).toMatchObject({ reserved: '0.000000000000' });
    } finally {
      await app.close();
    }
  });
  it('the credit releases of holds that failed (the database down) do not count toward it: they carry no usage, so calls are refused at USAGE_MAX_PENDING_ROWS records, not that many releases sooner', async () => {
    const app = await buildTestApp(ctx.database, { ...settings, BILLING_ENABLED: 'true', BILLING_CREDIT_WINDOW_CALLS: '0' });
    try {
      const erin = await createUser(app);
      await billingCrud.changeBalance(ctx.database.db, { userId: erin.user.id, type: 'grant', amount: '100000', description: 'test credits', createdBy: erin.user.id });
      const since = new Date();
      // Without a user nothing is held: each call leaves its usage row only.
      const unbilled = () => app.models.chat(chatRequest('fake-precise', {}));
      const billed = () => app.models.chat(chatRequest('fake-billed', { user_id: erin.user.id }, { maxOutputTokens: 10 }));
      const outage = { down: true };
      const writesFail = (text: string) => {
        if (outage.down && /insert into (usage_records|credit_transactions|credit_reservations)/i.test(text)) throw new Error('Connection terminated unexpectedly');
      };
      const failedHolds = 5;
      await intercepting(ctx.database.db, writesFail, async () => {
        for (let i = 0; i < LIMIT - 1; i++) await unbilled();
        await app.meter.idle();
        // Each hold's statement fails: the call fails, and its release (the hold may have committed) is queued.
        for (let i = 0; i < failedHolds; i++) {
          const failure = await billed().then(
            () => 'served',
            (error: unknown) => error,
          );
          expect(failure).toBeInstanceOf(Error);
          expect(failure).not.toBeInstanceOf(UsageBacklogError);
        }
        await app.meter.idle();
        // 99 usage records and 5 releases: the 100th record's call is served, the next one refused.
        await unbilled();
        await app.meter.idle();
        await expect(unbilled()).rejects.toBeInstanceOf(UsageBacklogError);
        outage.down = false;
        await app.meter.idle();
      });
      // The billed calls never went upstream.
      expect(fake.log).toHaveLength(LIMIT);
      const written = await ctx.database.db.execute(sql`select count(*)::int as n from usage_records where owner_id is null and model = 'fake-precise' and created_at >= ${since.toISOString()}`);
      expect((written as { rows: { n: number }[] }).rows[0]!.n).toBe(LIMIT);
      // The releases were written too: nothing held, nothing charged.
      expect(await billingCrud.getBalance(ctx.database.db, erin.user.id)).toMatchObject({ balance: '100000.000000000000', reserved: '0.000000000000' });
    } finally {
      await app.close();
    }
  });
  it('bounds the credit releases of failed holds apart, at as many: an outage under load no longer grows them without end', async () => {
    const app = await buildTestApp(ctx.database, { ...settings, BILLING_ENABLED: 'true', BILLING_CREDIT_WINDOW_CALLS: '0' });
    try {
      const erin = await createUser(app);
      await billingCrud.changeBalance(ctx.database.db, { userId: erin.user.id, type: 'grant', amount: '100000', description: 'test credits', createdBy: erin.user.id });
      const billed = () => app.models.chat(chatRequest('fake-billed', { user_id: erin.user.id }, { maxOutputTokens: 10 }));
      const outage = { down: true };
      const writesFail = (text: string) => {
        if (outage.down && /insert into (usage_records|credit_transactions|credit_reservations)/i.test(text)) throw new Error('Connection terminated unexpectedly');
      };
      await intercepting(ctx.database.db, writesFail, async () => {
        // Each hold's statement fails and queues its release, up to as many as the records' limit.
        for (let i = 0; i < LIMIT; i++) {
          const failure = await billed().then(
            () => 'served',
            (error: unknown) => error,
          );
          expect(failure).not.toBeInstanceOf(UsageBacklogError);
        }
        await app.meter.idle();
        await expect(billed()).rejects.toBeInstanceOf(UsageBacklogError);
        outage.down = false;
        await app.meter.idle();
      });
      // Written once the database takes them: calls resume, nothing held.
      expect(await billingCrud.getBalance(ctx.database.db, erin.user.id)).toMatchObject({ balance: '100000.000000000000', reserved: '0.000000000000' });
      await billed();
    } finally {
      await app.close();
    }
  });
});

describe('usage saved at the shutdown deadline', () => {
  it("holds what the flush's statement in flight holds: that statement may never commit before the process exits", async () => {
    const user = await createUser(ctx.app);
    const dataDir = mkdtempSync(join(tmpdir(), 'keel-backlog-deadline-'));
    const app = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
    try {
      await hangingUsageWrites(async () => {
        for (let i = 0; i < 10; i++) await app.models.chat(chatRequest('fake-precise', { user_id: user.user.id }));
        await sleep(100); // the flush of 10 rows (USAGE_FLUSH_MAX_ROWS) hangs in its statement
        app.meter.saveUnwritten(); // as the deadline does
        expect(rowsOnDisk(join(dataDir, UNWRITTEN_DIR))).toHaveLength(10);
      });
    } finally {
      await app.close();
      rmSync(dataDir, { recursive: true, force: true });
    }
  });

  it("window settlements kept while their batch's rows go one by one (refused for one row's data) are saved once by a shutdown then, not twice", async () => {
    await withSavedUsage([], async ({ user, dataDir, dir }) => {
      const userId = user.user.id;
      const now = new Date().toISOString();
      const good = usageRowOf(userId, now);
      const bad = usageRowOf(userId, now, { cost: 'not a number' });
      const block = await creditBlock(userId, 1);
      saveUnwritten(dir, { usage: [JSON.stringify(good), JSON.stringify(bad)], settlements: [], ...block });
      const charge = block.windowSettlements[0]!.usageRecordId;
      await savedWhileHeld(
        dataDir,
        dir,
        // The good row's own statement (the batch refused, rows one by one) hangs.
        (_text, params) => (params.some((p) => typeof p === 'string' && p.includes(good.id) && !p.includes(bad.id)) ? 'hang' : undefined),
        (files) => {
          const charges = files.flatMap((file) => [...file.settlements, ...file.windowSettlements]).filter((s) => s.usageRecordId === charge);
          expect(charges).toHaveLength(1);
        },
      );
      await takeBackAll(dataDir, dir);
      expect(await account(userId)).toEqual({ balance: 92, reserved: 0 });
      expect(await usageIds(ctx.database.db, userId)).toEqual(new Set([good.id]));
    });
  });
});

/** Of the saved records `ids` of `userId`, those in neither the database nor a file of `dir`: what a kill -9 now would lose. */
async function lostNow(dir: string, userId: string, ids: string[]): Promise<string[]> {
  const written = await usageIds(ctx.database.db, userId);
  const onDisk = new Set(rowsOnDisk(dir).map(idOf));
  return ids.filter((id) => !written.has(id) && !onDisk.has(id));
}

/**
 * A process started on `dataDir` takes back every saved file in `dir` (up to `rounds` flushes) and
 * stops; the files are gone.
 */
async function takeBackAll(dataDir: string, dir: string, rounds = 5, options: Parameters<typeof buildTestApp>[2] = {}): Promise<void> {
  const up = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir }, options);
  try {
    for (let i = 0; i < rounds && readdirSync(dir).length; i++) await up.meter.idle();
  } finally {
    await up.close();
  }
  expect(readdirSync(dir)).toEqual([]);
}

/** What the saved files in `dir` hold, each file's records apart. */
const savedFilesIn = (dir: string): UnwrittenUsage[] =>
  readdirSync(dir)
    .filter((name) => name.endsWith('.json'))
    .map((name) => JSON.parse(readFileSync(join(dir, name), 'utf8')) as UnwrittenUsage);

/**
 * A process on `dataDir` whose statements `statement` picks fail at once ('fail') or are held
 * ('hang'); once one is held, the shutdown deadline's save runs and `check` reads what it saved.
 * Then the held statement fails, the database is back, and the process stops.
 */
async function savedWhileHeld(dataDir: string, dir: string, statement: (text: string, params: unknown[]) => 'fail' | 'hang' | undefined, check: (saved: UnwrittenUsage[]) => void): Promise<void> {
  let held!: () => void;
  const holding = new Promise<void>((resolve) => (held = resolve));
  let fail!: (error: Error) => void;
  const hanging = new Promise<never>((_, reject) => (fail = reject));
  hanging.catch(() => undefined);
  let down = true;
  await intercepting(
    ctx.database.db,
    async (text, params) => {
      if (!down) return;
      const what = statement(text, params);
      if (what === 'fail') throw new Error('Connection terminated unexpectedly');
      if (what === 'hang') {
        held();
        await hanging;
      }
    },
    async () => {
      const app = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
      try {
        await holding;
        app.meter.saveUnwritten(); // as the shutdown deadline does
        check(savedFilesIn(dir));
      } finally {
        fail(new Error('Connection terminated unexpectedly'));
        down = false;
        await app.close();
      }
    },
  );
}

/**
 * Saved files of usage (one per entry of `files`, that many records each, as stopped processes
 * left them) of a new user, in a DATA_DIR of its own, for `work`; the DATA_DIR goes after.
 */
async function withSavedUsage(files: number[], work: (saved: { user: TestUser; dataDir: string; dir: string }) => Promise<void>): Promise<void> {
  const user = await createUser(ctx.app);
  const dataDir = mkdtempSync(join(tmpdir(), 'keel-backlog-'));
  const dir = join(dataDir, UNWRITTEN_DIR);
  try {
    for (const rows of files) saveUnwritten(dir, saved(Array.from({ length: rows }, usageRow(user.user.id))));
    await work({ user, dataDir, dir });
  } finally {
    rmSync(dataDir, { recursive: true, force: true });
  }
}

/**
 * The database "loses its connection" on every usage write after the first `written` while
 * `down` (for `intercepting`); `inserts` counts the writes tried meanwhile.
 */
function usageOutageAfter(written: number) {
  const outage = {
    down: true,
    inserts: 0,
    intercept: (text: string) => {
      if (outage.down && /insert into usage_records/i.test(text) && ++outage.inserts > written) throw new Error('Connection terminated unexpectedly');
    },
  };
  return outage;
}

/** A call of `userId` through `app`: 'served', 'refused (503)' for the backlog, or the error it failed with. */
const servedOrRefused = (app: FastifyInstance, userId: string): Promise<unknown> =>
  app.models.chat(chatRequest('fake-precise', { user_id: userId })).then(
    () => 'served',
    (error: unknown) => (error instanceof UsageBacklogError ? 'refused (503)' : error),
  );

/** A settlement as a meter queues one: `fields` over a call of `userId` charged 1 to the account, with nothing held. */
const settlementOf = (userId: string, fields: Partial<billingCrud.Settlement> = {}): billingCrud.Settlement => ({
  reservationId: null,
  userId,
  apiKeyId: null,
  projectId: null,
  cost: '1',
  chargeAccount: true,
  chargeKey: false,
  usageRecordId: randomUUID(),
  description: 'chat fake-precise',
  ...fields,
});

/**
 * A credit window's block of `userId` (10 of a grant of 100 held), the settlements of its `calls`
 * calls (8 credits in all, each releasing its cost from the block) and the block's release, as a
 * process keeps them: once all are written the account has 92, none of it held.
 */
async function creditBlock(userId: string, calls: number): Promise<Pick<UnwrittenUsage, 'windowSettlements' | 'blockReleases'>> {
  await billingCrud.changeBalance(ctx.database.db, { userId, type: 'grant', amount: '100', description: null, createdBy: userId });
  const block = randomUUID();
  expect(await billingCrud.hold(ctx.database.db, { id: block, userId, apiKeyId: null, accountAmount: '10', keyAmount: null, ttlSeconds: 900 })).toBe('held');
  const each = String(8 / calls);
  return {
    windowSettlements: Array.from({ length: calls }, () => settlementOf(userId, { reservationId: block, release: each, cost: each })),
    blockReleases: [settlementOf(userId, { reservationId: block, cost: '0', description: 'credit window released' })],
  };
}

/** The account's balance and what is held of it, as numbers. */
async function account(userId: string): Promise<{ balance: number; reserved: number }> {
  const { balance, reserved } = await billingCrud.getBalance(ctx.database.db, userId);
  return { balance: Number(balance), reserved: Number(reserved) };
}

describe('usage saved by earlier processes', () => {
  let app: FastifyInstance | null = null;
  let dataDir = '';
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  it('is taken back as the queue has room (up to half of USAGE_MAX_PENDING_ROWS), all of it written', async () => {
    const user = await createUser(ctx.app);
    const row = usageRow(user.user.id);
    dataDir = mkdtempSync(join(tmpdir(), 'keel-backlog-'));
    const dir = join(dataDir, UNWRITTEN_DIR);
    // Three files of 40 records, as three stopped processes left them; room for 50.
    for (let i = 0; i < 3; i++) saveUnwritten(dir, saved(Array.from({ length: 40 }, row)));
    expect(readdirSync(dir)).toHaveLength(3);

    const taking = captureLogs('info');
    app = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir }, { logger: taking.logger });
    try {
      await app.meter.idle();
      await app.meter.idle();
      const takes = taking.lines().filter((line) => line.msg === 'writing the usage earlier processes left unwritten');
      // At most the half (50) of the limit a take: 40 and 10 of the next file (its other 30 saved
      // back), then as flushes make room.
      expect(takes.map((line) => line.usageRecords as number)).toEqual([50, 50, 20]);
      expect(await usageCount(ctx.database.db, user.user.id)).toBe(120);
      expect(readdirSync(dir)).toEqual([]);
    } finally {
      await app.close();
    }
  });

  it('a file larger than the room (saved under a larger limit) is taken in parts: with the database down, calls are not refused for it, and nothing is lost', async () => {
    await withSavedUsage([500], async ({ user, dataDir, dir }) => {
      await usageWritesFail(async () => {
        const down = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
        try {
          await down.meter.idle();
          // 50 of the 500 taken (half the limit): this process's own calls still go.
          await down.models.chat(chatRequest('fake-precise', { user_id: user.user.id }));
        } finally {
          await down.close(); // what it holds is saved again
        }
      });
      await takeBackAll(dataDir, dir, 20);
      expect(await usageCount(ctx.database.db, user.user.id)).toBe(501);
    });
  });

  it('a file taken back is deleted once what it held is written, though calls keep the queue from emptying; at every write, what is not in the database is on disk', async () => {
    const load = await createUser(ctx.app);
    // 120 records in three files, taken as the room allows (the load's queued records count), written in statements of 10.
    await withSavedUsage([40, 40, 40], async ({ user, dataDir, dir }) => {
      const savedIds = rowsOnDisk(dir).map(idOf);
      // The app the load's calls go through: the start's flush writes before buildTestApp returns.
      let built!: (app: FastifyInstance) => void;
      const building = new Promise<FastifyInstance>((resolve) => (built = resolve));
      let loading = true;
      let calls = 0;
      const lost: string[] = [];
      await intercepting(
        ctx.database.db,
        async (text) => {
          if (!/insert into usage_records/i.test(text) || !loading) return;
          // What a kill -9 now would leave: every saved record not in the database is in a file still.
          lost.push(...(await lostNow(dir, user.user.id, savedIds)));
          // Steady load: a call ends while each write is in flight, so no flush ends with nothing queued.
          await (await building).models.chat(chatRequest('fake-precise', { user_id: load.user.id }));
          calls += 1;
          await sleep(5); // its record queued (its settlement waits for the next check phase)
        },
        async () => {
          const started = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
          built(started);
          try {
            await eventually(async () => !readdirSync(dir).length && (await usageCount(ctx.database.db, user.user.id)) === 120);
            expect(lost).toEqual([]);
            loading = false;
            await started.meter.idle();
            expect(await usageCount(ctx.database.db, load.user.id)).toBe(calls);
          } finally {
            await started.close();
          }
        },
      );
    });
  });

  it('a file is kept while part of what it held is not in the database (its flush failed midway), and deleted once the rest is written', async () => {
    await withSavedUsage([20], async ({ user, dataDir, dir }) => {
      // The database goes away after the first of the flush's two statements (10 records each).
      const outage = usageOutageAfter(1);
      await intercepting(
        ctx.database.db,
        outage.intercept,
        async () => {
          const started = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
          try {
            await started.meter.idle(); // the start's flush, and one more: both failed
            expect(await usageCount(ctx.database.db, user.user.id)).toBe(10);
            expect(rowsOnDisk(dir)).toHaveLength(20); // the file taken, which holds the 10 not written
            outage.down = false;
            await started.meter.idle();
            expect(await usageCount(ctx.database.db, user.user.id)).toBe(20);
            expect(readdirSync(dir)).toEqual([]);
          } finally {
            await started.close();
          }
        },
      );
    });
  });

  it('after a failed flush, saved files wait for its retry (USAGE_FLUSH_INTERVAL_MS): an outage does not read them file after file', async () => {
    // Two files of 50 records, the room: the start takes the first.
    await withSavedUsage([50, 50], async ({ user, dataDir, dir }) => {
      const taking = captureLogs('info');
      const takes = () => taking.lines().filter((line) => line.msg === 'writing the usage earlier processes left unwritten').map((line) => line.usageRecords as number);
      // The database goes away after two of the start's flush's statements: room for 20 records again.
      const outage = usageOutageAfter(2);
      await intercepting(
        ctx.database.db,
        outage.intercept,
        async () => {
          const started = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir, USAGE_FLUSH_INTERVAL_MS: '100' }, { logger: taking.logger });
          try {
            await eventually(async () => outage.inserts >= 5); // the failed flush, then two of its retries, all failed
            expect(takes()).toEqual([50]);
            expect(await usageCount(ctx.database.db, user.user.id)).toBe(20);
            // The database answers again: the next retry writes what it kept, then takes the next file.
            outage.down = false;
            await eventually(async () => !readdirSync(dir).length && (await usageCount(ctx.database.db, user.user.id)) === 100);
            expect(takes()).toEqual([50, 50]);
          } finally {
            await started.close();
          }
        },
      );
    });
  });

  it("a flush's wait (flushQueued: the one running and one more) does not run on through every saved file the flushes take back", async () => {
    await withSavedUsage(Array.from({ length: 10 }, () => 50), async ({ user, dataDir }) => {
      // Usage statements answered so far, read the moment the wait ends: the next take's flush goes
      // on writing after it, so a count of the table then would race it.
      let written = 0;
      const countWritten = (text: string) => {
        if (/insert into usage_records/i.test(text)) written += 1;
      };
      await intercepting(
        ctx.database.db,
        countWritten,
        async () => {
          const started = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
          try {
            // start() took the first file (50 rows, the room) and began writing it; the flushes that
            // end meanwhile take more, so how far they got before the wait begins depends on the
            // machine (CI on PostgreSQL counted 20 statements by the wait's end). The wait a refused
            // credit hold (and a balance read) makes is for the flush running and one more, each of
            // which may hold two files: at most 20 statements of 10 rows (USAGE_FLUSH_MAX_ROWS)
            // during it; all 50 if it ran on through every file.
            const beforeWait = written;
            const writtenWhenWaitEnded = await (started.meter as unknown as { flushQueued(): Promise<void> }).flushQueued().then(() => written);
            expect(writtenWhenWaitEnded).toBeGreaterThanOrEqual(5);
            expect(writtenWhenWaitEnded - beforeWait).toBeLessThanOrEqual(20);
            expect(writtenWhenWaitEnded).toBeLessThan(50);
            await started.meter.idle();
            expect(await usageCount(ctx.database.db, user.user.id)).toBe(500);
          } finally {
            await started.close();
          }
        },
        true,
      );
    });
  });

  /** The meter's sweep of saved files (its timer's, every minute at most), run now. */
  const sweep = (running: FastifyInstance) => (running.meter as unknown as { recoverUnwritten(): void }).recoverUnwritten();

  /**
   * One saved file of 80 records (`rows`, their `ids`) in a DATA_DIR of its own, for `work`; then a
   * process on it writes what is left, and all 80 must be in the database, no file left.
   * `lostNow`: the saved records in neither the database nor a file, what a kill -9 now would lose.
   */
  async function withSplitFile(work: (file: { dataDir: string; dir: string; rows: string[]; lostNow: () => Promise<string[]> }) => Promise<void>): Promise<void> {
    await withSavedUsage([80], async ({ user, dataDir, dir }) => {
      const rows = rowsOnDisk(dir);
      await work({ dataDir, dir, rows, lostNow: () => lostNow(dir, user.user.id, rows.map(idOf)) });
      await takeBackAll(dataDir, dir, 10);
      expect(await usageIds(ctx.database.db, user.user.id)).toEqual(new Set(rows.map(idOf)));
    });
  }

  it("the rest of a file split by a take is not taken while the first part's file is held: taken again, it went onto that file, whose rows were not yet written", async () => {
    // Room for 50 of the file's 80 records: 50 taken, 30 saved back under its name.
    await withSplitFile(async ({ dataDir, lostNow }) => {
      // The database goes after two statements: 20 of the 50 written, 30 queued.
      await intercepting(
        ctx.database.db,
        usageOutageAfter(2).intercept,
        async () => {
          const down = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
          try {
            await down.meter.idle();
            expect(await lostNow()).toEqual([]);
            sweep(down); // room for 20 more: the rest is the next file in order, and waits
            expect(await lostNow()).toEqual([]);
          } finally {
            await down.close();
          }
        },
      );
    });
  });

  it("a file taken during a flush is not deleted by that flush's end, though it has the name of one taken before it", async () => {
    await withSplitFile(async ({ dataDir, lostNow }) => {
      let inserts = 0;
      let failing = true;
      let open!: () => void;
      const gate = new Promise<void>((resolve) => (open = resolve));
      let release!: () => void;
      const later = new Promise<void>((resolve) => (release = resolve));
      await intercepting(
        ctx.database.db,
        async (text) => {
          if (!/insert into usage_records/i.test(text)) return;
          inserts += 1;
          if (failing && inserts > 2) throw new Error('Connection terminated unexpectedly');
          // The retry writes its 30 records in statements 3-5, the first held until the sweep has
          // run; the flushes after it wait until the files are looked at.
          if (!failing && inserts === 3) await gate;
          if (!failing && inserts >= 6) await later;
        },
        async () => {
          const running = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
          try {
            await running.meter.idle(); // 20 written, 30 queued
            failing = false;
            inserts = 2;
            const retry = (running.meter as unknown as { flush(): Promise<void> }).flush();
            await eventually(async () => inserts === 3);
            sweep(running); // during the retry
            open();
            await retry;
            expect(await lostNow()).toEqual([]);
          } finally {
            release();
            await running.close();
          }
        },
      );
    });
  });

  it('a process that died holding the first part of a split file: that part is taken back beside the rest saved under its name, not onto it', async () => {
    await withSplitFile(async ({ dir, rows }) => {
      // As a process leaves them that took 50 of a file's 80 records and died: its part renamed
      // `.<pid>.taken`, the other 30 saved back under the file's name.
      const [name] = readdirSync(dir);
      const dead = spawnSync(process.execPath, ['-e', '']).pid;
      writeFileSync(join(dir, `${name}.${dead}.taken`), JSON.stringify(saved(rows.slice(0, 50))));
      writeFileSync(join(dir, name!), JSON.stringify(saved(rows.slice(50))));
    });
  });
  it('settlements taken back are written in statements of USAGE_FLUSH_MAX_ROWS, each once: those that had committed move nothing again', async () => {
    await withSavedUsage([], async ({ user, dataDir, dir }) => {
      const userId = user.user.id;
      const key = await createKey(ctx.app, user, { name: 'budgeted', max_budget: '1000' });
      await billingCrud.changeBalance(ctx.database.db, { userId, type: 'grant', amount: '1000', description: null, createdBy: userId });
      const now = new Date().toISOString();
      // 200 calls charged to the account (billing on), 200 to the key alone (billing off: each carries its usage row).
      const settlements = Array.from({ length: 400 }, (_, i) => {
        if (i % 2) return settlementOf(userId, { cost: '0.5' });
        const row = usageRowOf(userId, now, { api_key_id: key.id, cost: '0.25', charge_key: false });
        return settlementOf(userId, { apiKeyId: key.id, cost: '0.25', chargeAccount: false, chargeKey: true, usageRecordId: row.id, usage: JSON.stringify(row) });
      });
      // The first 100 had committed before their process stopped (their reply lost): saved all the same.
      await billingCrud.settleMany(ctx.database.db, settlements.slice(0, 100));
      saveUnwritten(dir, { usage: [], settlements, windowSettlements: [], blockReleases: [] });
      let statements = 0;
      await intercepting(
        ctx.database.db,
        (text) => {
          if (/insert into credit_transactions/i.test(text)) statements += 1;
        },
        async () => {
          const up = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
          try {
            await up.meter.idle();
          } finally {
            await up.close();
          }
        },
      );
      expect(statements).toBe(40); // 400 in statements of 10, not one each
      expect(readdirSync(dir)).toEqual([]);
      expect(await account(userId)).toEqual({ balance: 900, reserved: 0 });
      const ledger = await ctx.database.db.execute(sql`select count(*)::int as n from credit_transactions where owner_id = ${userId} and type = 'usage'`);
      expect((ledger as { rows: { n: number }[] }).rows[0]!.n).toBe(200);
      expect(await usageCount(ctx.database.db, userId)).toBe(200);
      expect(await keyFigures(key.id)).toEqual({ charged: true, spentAsRecorded: true, reserved: '0' });
    });
  });

  it("a save's settlements and the block releases after them go in one take, whole, past the room", async () => {
    await withSavedUsage([], async ({ user, dataDir, dir }) => {
      // 50 usage rows (the room), then 80 settlements of a block and its release.
      saveUnwritten(dir, { usage: Array.from({ length: 50 }, usageRow(user.user.id)), settlements: [], ...(await creditBlock(user.user.id, 80)) });
      const taking = captureLogs('info');
      await takeBackAll(dataDir, dir, 5, { logger: taking.logger });
      const takes = taking.lines().filter((line) => line.msg === 'writing the usage earlier processes left unwritten');
      expect(takes.map(({ usageRecords, settlements, blockReleases }) => ({ usageRecords, settlements, blockReleases }))).toEqual([
        { usageRecords: 50, settlements: 0, blockReleases: 0 },
        { usageRecords: 0, settlements: 80, blockReleases: 1 },
      ]);
      expect(readdirSync(dir)).toEqual([]);
      expect(await account(user.user.id)).toEqual({ balance: 92, reserved: 0 });
    });
  });

  it("a block release put back (its block's settlement unwritten) while the flush writes another is saved once by a shutdown then, not twice", async () => {
    await withSavedUsage([], async ({ user, dataDir, dir }) => {
      const userId = user.user.id;
      const { windowSettlements, blockReleases } = await creditBlock(userId, 1);
      const other = randomUUID();
      expect(await billingCrud.hold(ctx.database.db, { id: other, userId, apiKeyId: null, accountAmount: '10', keyAmount: null, ttlSeconds: 900 })).toBe('held');
      const otherRelease = settlementOf(userId, { reservationId: other, cost: '0', description: 'credit window released' });
      // The block's settlement kept after a failure, then its release and another block's.
      saveUnwritten(dir, { usage: [], settlements: windowSettlements, windowSettlements: [], blockReleases: [...blockReleases, otherRelease] });
      const [charge] = windowSettlements;
      await savedWhileHeld(
        dataDir,
        dir,
        // The settlement's retry fails (so the block's release is put back); the other release hangs.
        (text, params) => (params.includes(charge!.usageRecordId) || text.includes(charge!.usageRecordId) ? 'fail' : params.includes(other) ? 'hang' : undefined),
        (files) => {
          const releases = files.flatMap((file) => file.blockReleases.map((r) => r.usageRecordId));
          expect(releases.sort()).toEqual([blockReleases[0]!.usageRecordId, otherRelease.usageRecordId].sort());
        },
      );
      await takeBackAll(dataDir, dir);
      expect(await account(userId)).toEqual({ balance: 92, reserved: 0 });
    });
  });

  it('a save of USAGE_MAX_PENDING_ROWS settlements taken back whole does not refuse calls (the database up) while it is written, each written once', async () => {
    await withSavedUsage([], async ({ user, dataDir, dir }) => {
      const userId = user.user.id;
      await billingCrud.changeBalance(ctx.database.db, { userId, type: 'grant', amount: '100', description: null, createdBy: userId });
      // A process stopped during an outage with the limit's worth of settlements unwritten.
      saveUnwritten(dir, { usage: [], settlements: Array.from({ length: LIMIT }, () => settlementOf(userId, { cost: '0.5' })), windowSettlements: [], blockReleases: [] });
      let writing!: () => void;
      const retrying = new Promise<void>((resolve) => (writing = resolve));
      let go!: () => void;
      const going = new Promise<void>((resolve) => (go = resolve));
      await intercepting(
        ctx.database.db,
        async (text) => {
          // The first statement of the retried settlements waits until a call has been made.
          if (/not exists \(select 1 from credit_transactions t where/.test(text)) {
            writing();
            await going;
          }
        },
        async () => {
          const up = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
          try {
            await retrying;
            expect(await servedOrRefused(up, userId)).toBe('served');
            go();
            for (let i = 0; i < 5 && readdirSync(dir).length; i++) await up.meter.idle();
          } finally {
            go();
            await up.close();
          }
        },
      );
      expect(readdirSync(dir)).toEqual([]);
      const ledger = await ctx.database.db.execute(sql`select count(*)::int as n from credit_transactions where owner_id = ${userId} and type = 'usage'`);
      expect((ledger as { rows: { n: number }[] }).rows[0]!.n).toBe(LIMIT);
      expect(await account(userId)).toEqual({ balance: 50, reserved: 0 });
      expect(await usageCount(ctx.database.db, userId)).toBe(1);
    });
  });

  it('a save of settlements taken back while the database is down counts toward refusing calls once a write has failed: a process does not serve its limit on top of it, to save both', async () => {
    await withSavedUsage([], async ({ user, dataDir, dir }) => {
      const userId = user.user.id;
      await billingCrud.changeBalance(ctx.database.db, { userId, type: 'grant', amount: '100', description: null, createdBy: userId });
      saveUnwritten(dir, { usage: [], settlements: Array.from({ length: LIMIT }, () => settlementOf(userId, { cost: '0.5' })), windowSettlements: [], blockReleases: [] });
      const call = (app: FastifyInstance) => servedOrRefused(app, userId);
      await intercepting(
        ctx.database.db,
        (text) => {
          if (/insert into (usage_records|credit_transactions)/i.test(text)) throw new Error('Connection terminated unexpectedly');
        },
        async () => {
          const down = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
          try {
            await down.meter.idle();
            expect(await call(down)).toBe('refused (503)');
          } finally {
            await down.close();
          }
        },
      );
      // Saved again whole, nothing added: the next process takes the same save back.
      expect(savedFilesIn(dir).flatMap((file) => file.settlements)).toHaveLength(LIMIT);
      // The database back, the save written, calls are served again.
      const up = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
      try {
        for (let i = 0; i < 5 && readdirSync(dir).length; i++) await up.meter.idle();
        expect(await call(up)).toBe('served');
      } finally {
        await up.close();
      }
      expect(readdirSync(dir)).toEqual([]);
      expect(await account(userId)).toEqual({ balance: 50, reserved: 0 });
    });
  });

  it("a save's billed calls, each a usage row and a settlement, count once each toward refusing calls while writes fail, as before they were saved", async () => {
    await withSavedUsage([], async ({ user, dataDir, dir }) => {
      const userId = user.user.id;
      await billingCrud.changeBalance(ctx.database.db, { userId, type: 'grant', amount: '100', description: null, createdBy: userId });
      // 40 billed calls, as a process with per-call holds saved them: each call's row, and its settlement apart.
      const saves = 40;
      const rows = Array.from({ length: saves }, usageRow(userId));
      saveUnwritten(dir, { usage: rows, settlements: rows.map((row) => settlementOf(userId, { usageRecordId: idOf(row) })), windowSettlements: [], blockReleases: [] });
      const served: unknown[] = [];
      await usageWritesFail(async () => {
        const down = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
        try {
          await down.meter.idle(); // the save taken back (40 calls: under half the limit), its flush failed
          for (let i = 0; i <= LIMIT - saves; i++) {
            served.push(await servedOrRefused(down, userId));
            await down.meter.idle();
          }
        } finally {
          await down.close(); // saved again
        }
      }, true);
      // The limit's 100 calls held: the save's 40 and 60 of this process's; the next refused.
      expect(served).toEqual([...Array.from({ length: LIMIT - saves }, () => 'served'), 'refused (503)']);
      await takeBackAll(dataDir, dir);
      expect(await usageCount(ctx.database.db, userId)).toBe(LIMIT);
      expect(await account(userId)).toEqual({ balance: 100 - saves, reserved: 0 });
    });
  });

  it("a save's billed calls whose settlements come a take after their rows (the rows filled the room) count once each too, as when taken together", async () => {
    await withSavedUsage([], async ({ user, dataDir, dir }) => {
      const userId = user.user.id;
      await billingCrud.changeBalance(ctx.database.db, { userId, type: 'grant', amount: '100', description: null, createdBy: userId });
      // 50 billed calls, as a process with per-call holds saved them: their rows (a file: the room), and their settlements apart (the next file).
      const billed = 50;
      const rows = Array.from({ length: billed }, usageRow(userId));
      saveUnwritten(dir, { usage: rows, settlements: rows.map((row) => settlementOf(userId, { usageRecordId: idOf(row) })), windowSettlements: [], blockReleases: [] });
      // Two statements of rows are written (20 rows), then no write is.
      let rowWrites = 0;
      const writesFail = (text: string) => {
        if (/insert into credit_transactions/i.test(text) || (/insert into usage_records/i.test(text) && ++rowWrites > 2)) throw new Error('Connection terminated unexpectedly');
      };
      const served: unknown[] = [];
      await intercepting(ctx.database.db, writesFail, async () => {
        const down = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
        try {
          await down.meter.idle(); // the first take: the 50 rows, 20 of them written
          expect(await usageCount(ctx.database.db, userId)).toBe(20);
          // The next take (room for 20): the 50 settlements, 30 of them of rows the first took, still unwritten.
          sweep(down);
          await down.meter.idle();
          expect(savedFilesIn(dir)).toEqual([]);
          // 50 calls unwritten (20 settlements alone, 30 rows with their settlements): 50 of this process's own are served, the next refused.
          for (let i = 0; i <= LIMIT - billed; i++) {
            served.push(await servedOrRefused(down, userId));
            await down.meter.idle();
          }
        } finally {
          await down.close(); // saved again
        }
      });
      expect(served).toEqual([...Array.from({ length: LIMIT - billed }, () => 'served'), 'refused (503)']);
      await takeBackAll(dataDir, dir);
      expect(await usageCount(ctx.database.db, userId)).toBe(LIMIT);
      expect(await account(userId)).toEqual({ balance: 100 - billed, reserved: 0 });
    });
  });

  it("a save's block releases are not taken while another live process holds its settlements: written first, they showed the credit those still charge as free", async () => {
    await withSavedUsage([], async ({ user, dataDir, dir }) => {
      saveUnwritten(dir, { usage: [], settlements: [], ...(await creditBlock(user.user.id, 8)) });
      const [settlementsFile, releasesFile] = readdirSync(dir).sort();
      // A live process took the settlements' file, and has not written them yet.
      const holder = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60_000)']);
      try {
        renameSync(join(dir, settlementsFile!), join(dir, `${settlementsFile}.${holder.pid}.taken`));
        const other = await buildTestApp(ctx.database, { ...settings, DATA_DIR: dataDir });
        try {
          await other.meter.idle();
          expect(readdirSync(dir)).toContain(releasesFile);
          expect(await account(user.user.id)).toEqual({ balance: 100, reserved: 10 });
          // The holder goes without writing them: its file is taken back, and the releases with it.
          const exited = once(holder, 'exit');
          holder.kill('SIGKILL');
          await exited;
          sweep(other);
          await other.meter.idle();
          expect(readdirSync(dir)).toEqual([]);
        } finally {
          await other.close();
        }
      } finally {
        holder.kill('SIGKILL');
      }
      expect(await account(user.user.id)).toEqual({ balance: 92, reserved: 0 });
    });
  });
});

describe('settleMany', () => {
  it('releases a reservation once, though two items of the batch release it (a release kept or saved twice): the holds beside it stay held', async () => {
    const user = await createUser(ctx.app);
    const userId = user.user.id;
    const key = await createKey(ctx.app, user, { name: 'budgeted', max_budget: '100' });
    await billingCrud.changeBalance(ctx.database.db, { userId, type: 'grant', amount: '100', description: null, createdBy: userId });
    const held = async (accountAmount: string, keyAmount: string) => {
      const id = randomUUID();
      expect(await billingCrud.hold(ctx.database.db, { id, userId, apiKeyId: key.id, accountAmount, keyAmount, ttlSeconds: 900 })).toBe('held');
      return id;
    };
    for (const retried of [false, true]) {
      const released = await held('50', '20');
      const beside = await held('30', '10');
      const release = settlementOf(userId, { reservationId: released, apiKeyId: key.id, chargeKey: true, cost: '0', description: 'credit window released' });
      await billingCrud.settleMany(ctx.database.db, [release, { ...release, usageRecordId: randomUUID() }], retried);
      expect(await account(userId)).toEqual({ balance: 100, reserved: 30 });
      expect(Number((await billingCrud.keySpend(ctx.database.db, key.id)).reserved)).toBe(10);
      await billingCrud.settleMany(ctx.database.db, [settlementOf(userId, { reservationId: beside, apiKeyId: key.id, chargeKey: true, cost: '0' })]);
      expect(await account(userId)).toEqual({ balance: 100, reserved: 0 });
    }
  });
});
