/**
 * Credit windows (src/services/credit-window.ts): billed calls held from a block of credit in
 * memory. The invariants stay those of per-call holds: never more held than the balance covers,
 * the balance equal to the ledger's sum, nothing held once the calls have settled, and a crashed
 * process's block released by the expiry sweep without anything released twice.
 */
import { type SQL, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { beforeEach, describe, expect, it } from 'vitest';

import { PaymentRequiredError } from '../../src/core/errors.js';

import { changeBalance, getBalance, ledgerSum, STRIPPED_USAGE_NOTE } from '../../src/crud/billing.js';
import { buildTestApp, useTestApp } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import type { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey } from '../helpers/http.js';
import { captureLogs, LEVEL } from '../helpers/logs.js';
import { chatRequest, useFakeModels } from '../helpers/metered-models.js';
import { intercepting } from '../helpers/statements.js';

// Blocks of 8 calls: with `fake-billed` (1 credit per output token) and 10 output tokens at most, a block is 80 credits.
const SETTINGS = { BILLING_ENABLED: 'true', BILLING_CREDIT_WINDOW_CALLS: '8', USAGE_FLUSH_INTERVAL_MS: '20', MODEL_MAX_RETRIES: '0' };
const logs = captureLogs('info');
const ctx = useTestApp(SETTINGS, { logger: logs.logger });
const api = apiOf(ctx);
let fake: FakeModelServer;
let admin: Record<string, string>;

useFakeModels(ctx, (server, headers) => {
  fake = server;
  admin = headers;
});
beforeEach(() => {
  fake.defaultReply = { text: 'four', usage: { prompt_tokens: 1, completion_tokens: 4 } };
});

const billed = (user: TestUser) => chatRequest('fake-billed', { user_id: user.user.id }, { maxOutputTokens: 10 });

async function grant(user: TestUser, amount: string) {
  const response = await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount, description: 'test credits' });
  expect(response.statusCode, response.body).toBe(200);
}

async function countOf(query: ReturnType<typeof sql>): Promise<number> {
  const result: unknown = await ctx.database.db.execute(query);
  return Number((result as { rows: { n: number }[] }).rows[0]!.n);
}

const reservationRows = (user: TestUser) => countOf(sql`select count(*)::int as n from credit_reservations where user_id = ${user.user.id}`);

const usageRows = (user: TestUser) => countOf(sql`select count(*)::int as n from usage_records where owner_id = ${user.user.id}`);

const usageEntries = (user: TestUser) => countOf(sql`select count(*)::int as n from credit_transactions where owner_id = ${user.user.id} and type = 'usage'`);

/** `intercepting` on the app's database. */
const intercept = (hook: Parameters<typeof intercepting>[1], work: () => Promise<unknown>, afterwards = false) => intercepting(ctx.database.db, hook, work, afterwards);

/** The statements the app's database ran during `work` that `match` picks (their SQL text). */
async function statementsDuring(match: (text: string, params: unknown[]) => boolean, work: () => Promise<unknown>): Promise<string[]> {
  const seen: string[] = [];
  await intercept((text, params) => {
    if (match(text, params)) seen.push(text);
  }, work);
  return seen;
}

/**
 * What a statement writes to reservation `id`: a call's part of it (a window call's settlement) or
 * its release, one entry per item (settlements go as one JSON parameter, or one by one as `settle`'s).
 */
function reservationWrites(id: string, text: string, params: unknown[]): ('part' | 'release')[] {
  const writes: ('part' | 'release')[] = [];
  for (const param of params) {
    if (typeof param !== 'string' || !param.startsWith('[{')) continue;
    for (const item of JSON.parse(param) as { rid?: string; part?: string | null }[]) if (item.rid === id) writes.push(item.part === null ? 'release' : 'part');
  }
  // `settle`'s own statement: the reservation's id, then the part released of it.
  const at = params.indexOf(id);
  if (/rd as \(delete from credit_reservations/.test(text) && at >= 0) writes.push(params[at + 1] === null ? 'release' : 'part');
  return writes;
}

/** The one reservation row the user has (a block). */
async function onlyReservation(user: TestUser): Promise<string> {
  const result: unknown = await ctx.database.db.execute(sql`select id from credit_reservations where user_id = ${user.user.id}`);
  const { rows } = result as { rows: { id: string }[] };
  expect(rows).toHaveLength(1);
  return rows[0]!.id;
}

/** How many credit blocks (reservation rows) the user's calls took during `work`. */
const blockHolds = async (user: TestUser, work: () => Promise<unknown>) =>
  (await statementsDuring((text, params) => /insert into credit_reservations/.test(text) && params.includes(user.user.id), work)).length;

/** Everything settled and given back: nothing held, and the balance is the ledger's sum. */
/**
 * `work` on a second app over the same database (what another API node holds in memory: its own
 * credit windows over the one account row), its meter idle after it; the app closed either way.
 */
async function onAnotherNode(work: (other: FastifyInstance) => Promise<void>, settings: Record<string, string> = SETTINGS): Promise<void> {
  const other = await buildTestApp(ctx.database, settings);
  try {
    await work(other);
    await other.meter.idle();
  } finally {
    await other.close();
  }
}

async function expectSettled(user: TestUser, balance: number) {
  await ctx.app.meter.idle();
  const account = await getBalance(ctx.database.db, user.user.id);
  expect([Number(account.balance), Number(account.reserved)]).toEqual([balance, 0]);
  expect(Number(await ledgerSum(ctx.database.db, user.user.id))).toBe(balance);
  expect(await reservationRows(user)).toBe(0);
}

describe('credit windows', () => {
  it('holds many calls from one block in memory; each call is charged exactly, with its own ledger entry', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    for (let i = 0; i < 5; i++) await ctx.app.models.chat(billed(user));
    // One block of 80 served all five (each used 4 of its 10 and gave 6 back): one row, held until the block goes back.
    expect(await reservationRows(user)).toBe(1);
    const { reserved } = await getBalance(ctx.database.db, user.user.id);
    expect(Number(reserved)).toBeGreaterThan(0);
    await Promise.all(Array.from({ length: 20 }, () => ctx.app.models.chat(billed(user))));
    await expectSettled(user, 1000 - 25 * 4);
    expect(await usageEntries(user)).toBe(25);
  });

  it("a call larger than what is left of the user's block is not refused for the credit that block still holds (nor for its calls' charges not yet written)", async () => {
    const user = await createUser(ctx.app);
    await grant(user, '200');
    await ctx.app.models.chat(billed(user)); // takes a block of 80, uses 4
    // Needs 150: the block (76 left) cannot serve it, a block of 8 such calls is out of reach, and
    // the account, 196 with nothing in progress, covers it: held per call once the block is back.
    const large = await ctx.app.models.chat(chatRequest('fake-billed', { user_id: user.user.id }, { maxOutputTokens: 150 }));
    expect(large.cost).toBe('4');
    await expectSettled(user, 200 - 2 * 4);
    // What the account cannot cover is still refused, with the figures as they are.
    await expect(ctx.app.models.chat(chatRequest('fake-billed', { user_id: user.user.id }, { maxOutputTokens: 193 }))).rejects.toThrow(
      'Not enough credits: balance 192, available 192; this call to fake-billed needs up to 193',
    );
  });

  it("a call through a key with a budget (held per call) is not refused for the block the user's other calls took, idle now", async () => {
    const user = await createUser(ctx.app);
    await grant(user, '200');
    await ctx.app.models.chat(billed(user)); // takes a block of 80, uses 4
    const budgeted = await createKey(ctx.app, user, { name: 'budgeted', max_budget: '1000' });
    // Needs 150 from the account and the key's budget: the account, 196 with nothing in progress, covers it.
    const large = await ctx.app.models.chat(chatRequest('fake-billed', { user_id: user.user.id, api_key_id: budgeted.id }, { maxOutputTokens: 150 }));
    expect(large.cost).toBe('4');
    await expectSettled(user, 200 - 2 * 4);
  });

  it("takes the next block ahead, off the calls' path: sequential calls past several blocks never wait for one that was not already being taken", async () => {
    const user = await createUser(ctx.app);
    // Enough that a block grown for this pace (see blockCallsFor) is never refused: a refused
    // block is tried again at the usual size, a second hold that may go out during a later call.
    await grant(user, '100000');
    // Calls that take a few milliseconds, as a model's do (far more): the next block is taken while
    // the last quarter of the current one serves calls.
    fake.defaultReply = { text: 'four', usage: { prompt_tokens: 1, completion_tokens: 4 }, chunkDelayMs: 20 };
    // A hold that waits for the database (taking a block) comes back as a promise; one from memory does not.
    const { meter } = ctx.app;
    const reserve = meter.reserve.bind(meter);
    let call = 0;
    const waits: number[] = [];
    meter.reserve = (estimate) => {
      const reservation = reserve(estimate);
      if (reservation instanceof Promise) waits.push(call);
      return reservation;
    };
    // The call during which each block's hold statement went to the database.
    const holds: number[] = [];
    try {
      await intercept(
        (text, params) => {
          if (/insert into credit_reservations/.test(text) && params.includes(user.user.id)) holds.push(call);
        },
        async () => {
          // A block of 80 serves ~18 calls of 4 (each held 10): 40 calls run through two blocks or more.
          for (call = 0; call < 40; call++) await ctx.app.models.chat(billed(user));
        },
      );
    } finally {
      meter.reserve = reserve;
    }
    // The first call waited (there was no block yet). A later call may wait only for a block that
    // an earlier call, served from memory, had already started taking (a database slower than the
    // calls, as CI's loaded PGlite can be); taken on the call's own path, its hold would be
    // issued during the call that waits.
    expect(waits[0]).toBe(0);
    expect(holds.length).toBeGreaterThanOrEqual(2);
    expect(holds[0]).toBe(0);
    for (const waited of waits.slice(1)) expect(holds.some((held) => held < waited && held > 0)).toBe(true);
    for (const held of holds.slice(1)) expect(waits).not.toContain(held);
    await expectSettled(user, 100000 - 40 * 4);
    expect(await usageEntries(user)).toBe(40);
  });

  it('a flush writes the usage records and the ledger entries of its calls in one statement', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    const writes = await statementsDuring(
      (text) => /insert into (usage_records|credit_transactions)/.test(text),
      async () => {
        for (let i = 0; i < 5; i++) await ctx.app.models.chat(billed(user));
        await ctx.app.meter.flush();
      },
    );
    expect(writes.length).toBeGreaterThan(0);
    for (const text of writes) expect(text).toMatch(/insert into usage_records[\s\S]*insert into credit_transactions/);
    await expectSettled(user, 1000 - 5 * 4);
    expect(await usageEntries(user)).toBe(5);
  });

  it('the blocks retired together go back in one statement, each to its own account', async () => {
    const users = [await createUser(ctx.app), await createUser(ctx.app), await createUser(ctx.app)];
    for (const user of users) await grant(user, '1000');
    for (const user of users) for (let i = 0; i < 3; i++) await ctx.app.models.chat(billed(user));
    await ctx.app.meter.flush();
    for (const user of users) expect(await reservationRows(user)).toBe(1);
    // Shutting down retires every block: the three (one per user) are released by one statement.
    const releases = await statementsDuring(
      (text) => /delete from credit_reservations/.test(text) && !/insert into usage_records/.test(text),
      () => ctx.app.meter.idle(),
    );
    expect(releases).toHaveLength(1);
    for (const user of users) await expectSettled(user, 1000 - 3 * 4);
  });

  it('a busy user\'s block grows with the calls in flight: concurrent waves take few blocks, each call charged exactly', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100000');
    fake.defaultReply = { text: 'four', usage: { prompt_tokens: 1, completion_tokens: 4 }, chunkDelayMs: 5 };
    // 32 calls at a time, 4 waves: blocks of 8 worst cases took 35 blocks (measured without the growth).
    const holds = await blockHolds(user, async () => {
      for (let wave = 0; wave < 4; wave++) await Promise.all(Array.from({ length: 32 }, () => ctx.app.models.chat(billed(user))));
    });
    expect(holds).toBeGreaterThan(0);
    expect(holds).toBeLessThan(8);
    // The grown blocks are real reservations: what they held came back, and every call paid 4.
    await expectSettled(user, 100000 - 128 * 4);
    expect(await usageEntries(user)).toBe(128);
  });

  it('a block used up within a second makes the next one a second\'s worth at that pace: sequential calls take few blocks', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100000');
    // Blocks of 8 worst cases serve ~18 of these calls each: 100 calls took 8 (measured without the pace rule).
    const holds = await blockHolds(user, async () => {
      for (let i = 0; i < 100; i++) await ctx.app.models.chat(billed(user));
    });
    expect(holds).toBeGreaterThan(0);
    expect(holds).toBeLessThan(4);
    await expectSettled(user, 100000 - 100 * 4);
    expect(await usageEntries(user)).toBe(100);
  });

  it('50 concurrent calls against a balance that covers 30: blocks, then single holds, never more', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '300');
    fake.defaultReply = { text: 'ten', usage: { prompt_tokens: 1, completion_tokens: 10 }, chunkDelayMs: 5 };
    const outcomes = await Promise.allSettled(Array.from({ length: 50 }, () => ctx.app.models.chat(billed(user))));
    const ok = outcomes.filter((o) => o.status === 'fulfilled');
    const refused = outcomes.filter((o): o is PromiseRejectedResult => o.status === 'rejected');
    expect(ok).toHaveLength(30);
    expect(refused.every((o) => o.reason instanceof PaymentRequiredError)).toBe(true);
    expect(fake.log).toHaveLength(30);
    await expectSettled(user, 0);
    expect(await usageEntries(user)).toBe(30);
  });

  // A block's release hands back what its row still holds. Written before a call's settlement (its
  // part of the row and its charge), the account shows that call's credit as available although it
  // was spent: other calls may hold it (CI saw 32 of 50 calls pass against a balance covering 30).
  const blockCall = { text: 'ten', usage: { prompt_tokens: 1, completion_tokens: 10 } };

  /** One call takes a block of 80 and uses 10; then six calls of 10 (the last `lastCallMs` slow) use it up, retiring it. */
  async function usingUpABlock(user: TestUser, lastCallMs: number) {
    await grant(user, '1000');
    fake.defaultReply = blockCall;
    await ctx.app.models.chat(billed(user));
    await new Promise(setImmediate); // the call settles in the check phase after it returns
    await ctx.app.meter.flush();
    const block = await onlyReservation(user);
    fake.script('fake-billed', ...Array.from({ length: 5 }, () => ({ ...blockCall, chunkDelayMs: 30 })), { ...blockCall, chunkDelayMs: lastCallMs });
    return { block, calls: () => Promise.all(Array.from({ length: 6 }, () => ctx.app.models.chat(billed(user)))) };
  }

  it('a block goes back after every call it served is charged, when its last call ends while a flush is being written', async () => {
    const user = await createUser(ctx.app);
    const { block, calls } = await usingUpABlock(user, 200);
    const writes: string[] = [];
    let ended: Promise<unknown> | undefined;
    await intercept(
      async (text, params) => {
        const mine = reservationWrites(block, text, params);
        if (mine.includes('part') && !writes.length) {
          // The first flush of the block's calls is in flight while the slow call ends and settles.
          await ended;
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
        writes.push(...mine);
      },
      async () => {
        ended = calls();
        await ended;
        await ctx.app.meter.idle();
      },
    );
    expect(writes).toEqual([...Array.from({ length: 6 }, () => 'part'), 'release']);
    await expectSettled(user, 1000 - 7 * 10);
  });

  it('a block goes back after every call it served is charged, when their settlements failed once and are retried', async () => {
    const user = await createUser(ctx.app);
    const { block, calls } = await usingUpABlock(user, 30);
    const writes: string[] = [];
    let failed = false;
    await intercept(
      (text, params) => {
        const mine = reservationWrites(block, text, params);
        if (mine.includes('part') && !failed) {
          failed = true;
          throw new Error('connection lost'); // as a dropped connection does: the statement never ran
        }
        writes.push(...mine);
      },
      async () => {
        await calls();
        await ctx.app.meter.idle(); // its flush fails
        await ctx.app.meter.idle(); // the next writes what it kept
      },
    );
    expect(failed).toBe(true);
    expect(writes.filter((w) => w === 'part')).toHaveLength(6);
    expect(writes.at(-1)).toBe('release');
    expect(writes.filter((w) => w === 'release')).toHaveLength(1);
    await expectSettled(user, 1000 - 7 * 10);
  });

  it('an upstream error whose text PostgreSQL cannot take (a NUL, a surrogate pair cut at the length limit) is recorded, and billing goes on', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    // Its own app: with the bug, the row that cannot be written jams its meter (every later flush retries it first).
    const messages = ['bad: \u0000 byte', 'x' + '😀'.repeat(1_500), '😀'.repeat(1_500)];
    await onAnotherNode(async (other) => {
      for (const message of messages) {
        fake.script('fake-billed', { status: 400, body: { error: { message, type: 'invalid_request_error', param: null, code: null } } });
        await expect(other.models.chat(billed(user))).rejects.toThrow();
      }
      for (let i = 0; i < 5; i++) await other.models.chat(billed(user));
    });
    await expectSettled(user, 1000 - 5 * 4);
    expect(await usageEntries(user)).toBe(5);
    const errors = await ctx.database.db.execute(sql`select error from usage_records where owner_id = ${user.user.id} and error is not null`);
    const texts = (errors as { rows: { error: string }[] }).rows.map((r) => r.error);
    expect(texts).toHaveLength(3);
    for (const text of texts) expect(text.length).toBeLessThanOrEqual(2_000);
    expect(texts.some((text) => text.includes('bad:  byte'))).toBe(true);
  });

  it('a usage row the database refuses goes in stripped, and the rows and charges around it are written', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    // As a value PostgreSQL refuses would (22P02): every statement carrying the marked row fails.
    const refused = Object.assign(new Error('invalid input syntax for type json'), { code: '22P02' });
    let refusals = 0;
    await intercept(
      (_text, params) => {
        if (params.some((p) => typeof p === 'string' && p.includes('MARKED-ROW'))) {
          refusals += 1;
          throw refused;
        }
      },
      async () => {
        for (let i = 0; i < 2; i++) await ctx.app.models.chat(billed(user));
        fake.script('fake-billed', { status: 400, body: { error: { message: 'MARKED-ROW', type: 'invalid_request_error', param: null, code: null } } });
        await expect(ctx.app.models.chat(billed(user))).rejects.toThrow();
        for (let i = 0; i < 3; i++) await ctx.app.models.chat(billed(user));
        await ctx.app.meter.idle();
        // Later calls are written too, while the row is still refused: nothing waits behind it.
        await ctx.app.models.chat(billed(user));
        await ctx.app.meter.idle();
        expect(await usageEntries(user)).toBe(6);
      },
    );
    expect(refusals).toBeGreaterThanOrEqual(2); // its batch, then the row alone
    await expectSettled(user, 1000 - 6 * 4);
    expect(await usageEntries(user)).toBe(6);
    // The refused row too, stripped (its error, where the refused value was, replaced by the note).
    expect(await usageRows(user)).toBe(7);
    expect(await countOf(sql`select count(*)::int as n from usage_records where owner_id = ${user.user.id} and error = ${STRIPPED_USAGE_NOTE}`)).toBe(1);
  });

  it('usage a provider reports in counts that are not token counts is charged as whole tokens (a fraction) or from an estimate (a negative: no count)', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    fake.script('fake-billed', { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 2.5 } }, { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: -1 } });
    await ctx.app.models.chat(billed(user));
    await ctx.app.models.chat(billed(user));
    // 2.5 output tokens count as 3; −1 is no count, so the answer's estimate (1 token for "ok"); each call settled (nothing left held).
    await expectSettled(user, 1000 - 3 - 1);
    expect(await usageEntries(user)).toBe(2);
    expect(await usageRows(user)).toBe(2);
  });

  it('usage past what a count can hold (a broken provider reporting billions of tokens) is recorded and charged at the largest count, not lost', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    fake.script('fake-billed', { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 9e15 } });
    await ctx.app.models.chat(billed(user));
    await ctx.app.meter.idle();
    const result: unknown = await ctx.database.db.execute(sql`select output_tokens, cost::text as cost from usage_records where owner_id = ${user.user.id}`);
    expect((result as { rows: unknown[] }).rows).toEqual([{ output_tokens: 2_147_483_647, cost: '2147483647.000000000000' }]);
    expect(await usageEntries(user)).toBe(1);
    // Charged as far as the free balance goes: not into the 70 its block still held for other calls
    // (80, less the call's own 10), which is free again once the block goes back. The usage record keeps the whole cost.
    await expectSettled(user, 70);
  });

  it('a flush that committed but whose reply was lost is retried without charging anything twice', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    let lost = 0;
    await intercept(
      (text) => {
        if (!lost && /insert into usage_records[\s\S]*insert into credit_transactions/.test(text)) {
          lost += 1;
          throw new Error('connection lost after the commit');
        }
      },
      async () => {
        for (let i = 0; i < 5; i++) await ctx.app.models.chat(billed(user));
        await ctx.app.meter.idle(); // its flush "fails"
        await ctx.app.meter.idle(); // the next retries the settlements
      },
      true,
    );
    expect(lost).toBe(1);
    await expectSettled(user, 1000 - 5 * 4);
    expect(await usageEntries(user)).toBe(5);
    expect(await usageRows(user)).toBe(5);
  });

  it("a hold that committed but whose reply was lost (a block's, or a call's own) is given back, not held until it expires", async () => {
    // As under a database outage: the statement reached the server and committed, its answer never
    // came back. `windowed` takes blocks; `single` (100 covers a block of 80, not twice) holds per call.
    const windowed = await createUser(ctx.app);
    const single = await createUser(ctx.app);
    await grant(windowed, '1000');
    await grant(single, '100');
    let lost = 0;
    await intercept(
      (text, params) => {
        // `single`'s block is refused (its statement commits nothing): its call's own hold (asynchronous commit) is the one lost.
        const holds = params.includes(windowed.user.id) || (params.includes(single.user.id) && /'synchronous_commit', 'off'/.test(text));
        if (/insert into credit_reservations/.test(text) && holds) {
          lost += 1;
          throw new Error('connection lost after the commit');
        }
      },
      async () => {
        await expect(ctx.app.models.chat(billed(windowed))).rejects.toThrow();
        await expect(ctx.app.models.chat(billed(single))).rejects.toThrow();
      },
      true,
    );
    expect(lost).toBe(2);
    await ctx.app.models.chat(billed(windowed));
    await ctx.app.models.chat(billed(single));
    await expectSettled(windowed, 1000 - 4);
    await expectSettled(single, 100 - 4);
  });

  it('a flush the client gave up on that reaches the server after its retry (a stalled network) charges nothing twice', async () => {
    // The client times out and retries on a new connection; the first attempt's bytes, held by the
    // network, reach the server afterwards and run: without a unique ledger entry per call the
    // retry's "already charged?" look-up cannot see a statement that has not run yet.
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    let stalled: { text: string; params: unknown[] } | undefined;
    await intercept(
      (text, params) => {
        if (!stalled && /insert into credit_transactions/.test(text)) {
          stalled = { text, params };
          throw new Error('Query read timeout');
        }
      },
      async () => {
        for (let i = 0; i < 5; i++) await ctx.app.models.chat(billed(user));
        await ctx.app.meter.idle(); // its flush "times out"
        await ctx.app.meter.idle(); // the next retries the settlements
      },
    );
    expect(stalled).toBeDefined();
    await expectSettled(user, 1000 - 5 * 4);
    const late = ctx.database.withSession((session) => session.query(stalled!.text, stalled!.params));
    await expect(late).rejects.toMatchObject({ code: '23505' });
    await expectSettled(user, 1000 - 5 * 4);
    expect(await usageEntries(user)).toBe(5);
    expect(await usageRows(user)).toBe(5);
  });

  it.skipIf(!process.env.DATABASE_URL)('a retry that runs while its first attempt is still committing is refused whole, and the meter counts the call as charged', async () => {
    // The first attempt holds the account's row in an open transaction when the retry (the kept
    // settlements' batch) looks for their ledger entries: the retry finds none, waits for the row,
    // then charges again — unless the ledger's one usage entry per call refuses it, undoing its
    // balance change with it (then one by one, each finds its entry).
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    let stalled: { text: string; params: unknown[] } | undefined;
    let original: Promise<unknown> | undefined;
    const retryWaiting = async () =>
      (await countOf(sql`select count(*)::int as n from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock' and query like '%not exists (select 1 from credit_transactions t where%'`)) > 0;
    logs.clear();
    await intercept(
      async (text, params) => {
        if (!stalled && /insert into credit_transactions/.test(text)) {
          stalled = { text, params };
          throw new Error('Query read timeout');
        }
        if (stalled && !original && /not exists \(select 1 from credit_transactions t where/.test(text)) {
          // The first attempt reaches the server now, just before the retry, and commits once the retry waits for it.
          let ran!: () => void;
          const running = new Promise<void>((resolve) => (ran = resolve));
          original = ctx.database.withSession(async (session) => {
            await session.exec('begin');
            await session.query(stalled!.text, stalled!.params);
            ran();
            // Commits once the retry waits for the account's row it holds (the retry has looked and found nothing).
            for (let waited = 0; !(await retryWaiting()) && waited < 10_000; waited += 20) await new Promise((resolve) => setTimeout(resolve, 20));
            await session.exec('commit');
          });
          await running;
        }
      },
      async () => {
        for (let i = 0; i < 5; i++) await ctx.app.models.chat(billed(user));
        await ctx.app.meter.idle(); // its flush "times out"
        await ctx.app.meter.idle(); // the next retries the settlements
      },
    );
    expect(original).toBeDefined();
    await original;
    await expectSettled(user, 1000 - 5 * 4);
    expect(await usageEntries(user)).toBe(5);
    expect(await usageRows(user)).toBe(5);
    expect(logs.lines().filter((line) => (line.level as number) >= LEVEL.error)).toEqual([expect.objectContaining({ msg: 'usage records not written; kept for a retry' })]);
    expect(logs.lines().filter((line) => /charged once/.test(String(line.msg)))).toHaveLength(1);
  });

  it('a block\'s hold commits only once it is durable (synchronous_commit on); per-call holds keep the asynchronous commit', async () => {
    // A process serves calls from its block in memory for up to ~30 s: a block's hold lost in a
    // database crash would let another process take the same credit again. A deferred trigger runs
    // at COMMIT, in the hold's own transaction: it records the synchronous_commit that commit runs with.
    const { db } = ctx.database;
    await db.execute(sql`create table commit_modes (reservation_id uuid primary key, user_id uuid, api_key_id uuid, mode text not null)`);
    await db.execute(sql.raw(`create function record_commit_mode() returns trigger language plpgsql as $$
      begin insert into commit_modes values (new.id, new.user_id, new.api_key_id, current_setting('synchronous_commit')); return null; end $$`));
    await db.execute(sql`create constraint trigger record_commit_mode after insert on credit_reservations deferrable initially deferred for each row execute function record_commit_mode()`);
    const modes = async (where: SQL) => {
      const result: unknown = await db.execute(sql`select mode from commit_modes where ${where}`);
      return (result as { rows: { mode: string }[] }).rows.map((r) => r.mode);
    };
    try {
      const rich = await createUser(ctx.app);
      await grant(rich, '1000');
      await ctx.app.models.chat(billed(rich)); // takes a block
      const block = await onlyReservation(rich);
      expect(await modes(sql`reservation_id = ${block}`)).toEqual(['on']);
      // A call on a key with a budget holds per call (account and key in one transaction).
      const key = await createKey(ctx.app, rich, { name: 'budget', max_budget: '100' });
      await ctx.app.models.chat(chatRequest('fake-billed', { user_id: rich.user.id, api_key_id: key.id }, { maxOutputTokens: 10 }));
      expect(await modes(sql`api_key_id = ${key.id}`)).toEqual(['off']);
      // A balance that cannot cover a block: the call holds its own amount (one statement).
      const poor = await createUser(ctx.app);
      await grant(poor, '15');
      await ctx.app.models.chat(billed(poor));
      expect(await modes(sql`user_id = ${poor.user.id}`)).toEqual(['off']);
      await expectSettled(poor, 11);
    } finally {
      await db.execute(sql`drop trigger record_commit_mode on credit_reservations`);
      await db.execute(sql`drop function record_commit_mode()`);
      await db.execute(sql`drop table commit_modes`);
    }
  });

  it('a block left by a crashed process is released by the sweep; the settlements that come later release nothing twice', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    for (let i = 0; i < 3; i++) await ctx.app.models.chat(billed(user));
    // As if the process had died: its block outlives the TTL and the sweep (any process's) releases it.
    await ctx.database.db.execute(sql`update credit_reservations set expires_at = now() - interval '1 second' where user_id = ${user.user.id}`);
    expect(await ctx.app.meter.sweep()).toBe(1);
    expect(Number((await getBalance(ctx.database.db, user.user.id)).reserved)).toBe(0);
    await ctx.app.models.chat(billed(user)); // takes a new block
    await expectSettled(user, 1000 - 4 * 4);
  });

  it('two processes on one database each take their own blocks; the account stays exact', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    await onAnotherNode(async (other) => {
      await Promise.all([
        ...Array.from({ length: 12 }, () => ctx.app.models.chat(billed(user))),
        ...Array.from({ length: 12 }, () => other.models.chat(billed(user))),
      ]);
      expect(await reservationRows(user)).toBeGreaterThanOrEqual(2);
    });
    await expectSettled(user, 1000 - 24 * 4);
  });

  it('50 concurrent calls through two API nodes (each its own credit windows) against a balance that covers 10: never more', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100');
    fake.defaultReply = { text: 'ten', usage: { prompt_tokens: 1, completion_tokens: 10 }, chunkDelayMs: 5 };
    await onAnotherNode(async (other) => {
      const outcomes = await Promise.allSettled(Array.from({ length: 50 }, (_, i) => (i % 2 ? other : ctx.app).models.chat(billed(user))));
      const refused = outcomes.filter((o): o is PromiseRejectedResult => o.status === 'rejected');
      expect(outcomes.filter((o) => o.status === 'fulfilled')).toHaveLength(10);
      expect(refused.every((o) => o.reason instanceof PaymentRequiredError)).toBe(true);
      expect(fake.log).toHaveLength(10);
    });
    await expectSettled(user, 0);
    expect(await usageEntries(user)).toBe(10);
  });

  it("another process's idle block leaves the account as much free as it holds: that process's calls are not refused meanwhile", async () => {
    const user = await createUser(ctx.app);
    // A block is 80 (8 calls' worst case): taking one would leave 70, less than the other process's 8 calls need.
    await grant(user, '150');
    await onAnotherNode(async (other) => {
      await ctx.app.models.chat(billed(user));
      // The other process's 8 calls at once, while this one would still keep a block (not idle long enough to give it back).
      const outcomes = await Promise.allSettled(Array.from({ length: 8 }, () => other.models.chat(billed(user))));
      expect(outcomes.map((o) => (o.status === 'rejected' ? String(o.reason) : 'ok'))).toEqual(Array(8).fill('ok'));
    });
    await expectSettled(user, 150 - 9 * 4);
  });

  it("calls refused while the user's retired block is being given back wait for it, and are held from the credit it gives back", async () => {
    const user = await createUser(ctx.app);
    await grant(user, '160');
    await ctx.app.models.chat(billed(user)); // takes a block of 80 (the account covers twice it), uses 4
    await new Promise(setImmediate); // the call settles in the check phase after it returns
    await ctx.app.meter.flush();
    const block = await onlyReservation(user);
    // The rest of the account is spent elsewhere (another process: POST /billing/credits would give this one's block back first): what the block holds (76) is all that is left.
    const adjusted = await changeBalance(ctx.database.db, { userId: user.user.id, type: 'adjustment', amount: '-80', description: 'spent elsewhere', createdBy: user.user.id });
    expect(adjusted).not.toBeNull();
    let openGate!: () => void;
    const gate = new Promise<void>((resolve) => (openGate = resolve));
    let releasing!: () => void;
    const released = new Promise<void>((resolve) => (releasing = resolve));
    await intercept(
      async (text, params) => {
        if (!reservationWrites(block, text, params).includes('release')) return;
        releasing();
        await gate;
      },
      async () => {
        // A read of the balance gives the unused block back: its release is being written (held at the gate)…
        const read = api('GET', '/billing/balance', user.headers);
        await released;
        // …when calls arrive that the account covers only with the block's credit back.
        const calls = Promise.allSettled(Array.from({ length: 5 }, () => ctx.app.models.chat(billed(user))));
        await new Promise((resolve) => setTimeout(resolve, 100));
        openGate();
        const outcomes = await calls;
        expect(outcomes.map((outcome) => (outcome.status === 'rejected' ? String(outcome.reason) : 'answered'))).toEqual(Array.from({ length: 5 }, () => 'answered'));
        expect((await read).statusCode).toBe(200);
      },
    );
    await expectSettled(user, 76 - 5 * 4);
  });

  it('an account that covers a block but not twice holds per call, so no process takes all of it', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '150');
    await ctx.app.models.chat(billed(user));
    // What was held was the call's own worst case, not a block (which would stay until idle): nothing is held once it is written.
    await expect.poll(() => usageRows(user), { timeout: 2_000 }).toBe(1);
    expect(await reservationRows(user)).toBe(0);
    await expectSettled(user, 146);
  });

  it('a process that stops gives its blocks back', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    const other = await buildTestApp(ctx.database, SETTINGS);
    await other.models.chat(billed(user));
    expect(await reservationRows(user)).toBe(1);
    await other.close();
    await expectSettled(user, 996);
  });

  it('a call in flight when the meter closes is charged as it ends, and its block given back', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    const other = await buildTestApp(ctx.database, SETTINGS);
    try {
      fake.script('fake-billed', { text: 'four', usage: { prompt_tokens: 1, completion_tokens: 4 }, chunkDelayMs: 300 });
      const call = other.models.chat(billed(user));
      await fake.waitFor((log) => log.length === 1);
      await other.meter.close();
      await call;
      await expect.poll(async () => [await reservationRows(user), await usageEntries(user), await usageRows(user)], { timeout: 2_000 }).toEqual([0, 1, 1]);
    } finally {
      await other.close();
    }
    await expectSettled(user, 996);
  });

  it('a flush in statements of USAGE_FLUSH_MAX_ROWS rows writes every usage record and ledger entry, each call once', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    // Statements of 3 rows, and a flush interval long enough that only the row count and idle() start flushes.
    await onAnotherNode(async (other) => {
      await Promise.all(Array.from({ length: 17 }, () => other.models.chat(billed(user))));
      for (let i = 0; i < 6; i++) await other.models.chat(billed(user));
    }, { ...SETTINGS, USAGE_FLUSH_MAX_ROWS: '3', USAGE_FLUSH_INTERVAL_MS: '600000' });
    await expectSettled(user, 1000 - 23 * 4);
    expect(await usageEntries(user)).toBe(23);
    expect(await usageRows(user)).toBe(23);
    expect(await countOf(sql`select count(distinct usage_record_id)::int as n from credit_transactions where owner_id = ${user.user.id} and type = 'usage'`)).toBe(23);
  });
});
