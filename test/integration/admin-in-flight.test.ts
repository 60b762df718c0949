/**
 * What an operator or a superuser changes while metered calls are in flight (between a call's hold
 * and its settlement): prices, models and providers, API keys, users, credits. Each call goes
 * through the real `/v1` gateway to the fake model server, kept in flight with `chunkDelayMs`.
 */
import { sql } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';

import { getBalance, ledgerSum } from '../../src/crud/billing.js';
import { useTestApp } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import type { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey, xApiKey } from '../helpers/http.js';
import { useFakeModels } from '../helpers/metered-models.js';

const ctx = useTestApp({ BILLING_ENABLED: 'true', USAGE_FLUSH_INTERVAL_MS: '20', MODEL_MAX_RETRIES: '0' });
const api = apiOf(ctx);

let fake: FakeModelServer;
let admin: Record<string, string>;

useFakeModels(ctx, (server, headers) => {
  fake = server;
  admin = headers;
});

interface LedgerEntry {
  type: string;
  amount: string;
  balance_after: string;
  usage_record_id: string | null;
}

interface UsageRecordRow {
  id: string;
  model: string;
  cost: string;
  output_tokens: number;
  status: string;
  api_key_id: string | null;
}

const chat = (headers: Record<string, string>, model: string, extra: Record<string, unknown> = {}) =>
  ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers, payload: { model, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 10, ...extra } });

async function grant(user: TestUser, amount: string): Promise<void> {
  const response = await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount, description: 'test credits' });
  expect(response.statusCode, response.body).toBe(200);
}

async function rowsOf<T>(query: ReturnType<typeof sql>): Promise<T[]> {
  return ctx.database.db.execute(query).then((result) => (result as { rows: T[] }).rows);
}

/** The user's ledger oldest first, as its `balance_after` chain goes. */
async function ledgerOf(userId: string): Promise<LedgerEntry[]> {
  return rowsOf<LedgerEntry>(
    sql`select created_at::text as at, type, trim_scale(amount)::text as amount, trim_scale(balance_after)::text as balance_after, usage_record_id from credit_transactions where owner_id = ${userId} order by created_at, id`,
  );
}

async function recordsOf(userId: string): Promise<UsageRecordRow[]> {
  return rowsOf<UsageRecordRow>(
    sql`select id, model, trim_scale(cost)::text as cost, output_tokens, status, api_key_id from usage_records where owner_id = ${userId} order by created_at`,
  );
}

/** Balance = the ledger's sum, each entry's balance_after = the one before + its amount, nothing held, nothing left unwritten. */
async function expectConsistent(userId: string): Promise<void> {
  await ctx.app.meter.idle();
  const account = await getBalance(ctx.database.db, userId);
  expect(Number(account.reserved)).toBe(0);
  expect(await ledgerSum(ctx.database.db, userId)).toBe(account.balance);
  let running = 0;
  const ledger = await ledgerOf(userId);
  for (const entry of ledger) {
    running += Number(entry.amount);
    expect(Number(entry.balance_after)).toBeCloseTo(running, 9);
  }
}

describe('a price changed while a call is in flight', () => {
  it('charges the price in force when the call began, its record saying that cost; later calls pay the new one', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100');
    // fake-billed: 1 credit per output token. The call holds 10, answers 4 tokens.
    // Long enough that the change lands first on a loaded machine too (asserted below).
    fake.script('fake-billed', { text: 'slow', chunkDelayMs: 1_000, usage: { prompt_tokens: 1, completion_tokens: 4 } }, { text: 'after', usage: { prompt_tokens: 1, completion_tokens: 4 } });
    const call = chat(user.headers, 'fake-billed');
    await fake.waitFor((log) => log.length === 1);
    const patch = await api('PATCH', '/models/fake-billed', admin, { pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '3000000' } });
    expect(patch.statusCode, patch.body).toBe(200);
    expect(fake.log[0]!.completed, 'the price changed while the call was in flight').toBe(false);
    expect((await call).statusCode).toBe(200);
    expect((await chat(user.headers, 'fake-billed')).statusCode).toBe(200);
    await ctx.app.meter.idle();
    expect((await recordsOf(user.user.id)).map((r) => r.cost)).toEqual(['4', '12']);
    expect((await ledgerOf(user.user.id)).map((e) => e.amount)).toEqual(['100', '-4', '-12']);
    await expectConsistent(user.user.id);
    const reset = await api('PATCH', '/models/fake-billed', admin, { pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '1000000' } });
    expect(reset.statusCode, reset.body).toBe(200);
  });
});

describe('a model or its provider changed while a call on it is in flight', () => {
  async function customModel(id: string, provider = 'fake'): Promise<void> {
    const response = await api('POST', '/models', admin, { id, provider, pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '1000000' } });
    expect(response.statusCode, response.body).toBe(200);
  }

  for (const stream of [false, true]) {
    it(`disabled or deleted mid-call (${stream ? 'streamed' : 'not streamed'}): the call ends as it began, recorded and charged, nothing left held`, async () => {
      const user = await createUser(ctx.app);
      await grant(user, '100');
      const disabled = `fake-disabled-${stream}`;
      const deleted = `fake-deleted-${stream}`;
      await customModel(disabled);
      await customModel(deleted);
      const reply = { chunks: ['a ', 'b ', 'c '], chunkDelayMs: 150, usage: { prompt_tokens: 1, completion_tokens: 3 } };
      fake.script(disabled, reply);
      fake.script(deleted, reply);
      const calls = [chat(user.headers, disabled, { stream }), chat(user.headers, deleted, { stream })];
      await fake.waitFor((log) => log.length === 2);
      expect((await api('PATCH', `/models/${disabled}`, admin, { enabled: false })).statusCode).toBe(200);
      expect((await api('DELETE', `/models/${deleted}`, admin)).statusCode).toBe(200);
      for (const response of await Promise.all(calls)) {
        expect(response.statusCode, response.body).toBe(200);
        if (stream) expect(response.body).toContain('data: [DONE]');
      }
      await ctx.app.meter.idle();
      const records = await recordsOf(user.user.id);
      expect(records.map((r) => [r.model, r.status, r.cost]).sort()).toEqual([
        [deleted, 'success', '3'],
        [disabled, 'success', '3'],
      ]);
      expect(Number(await ledgerSum(ctx.database.db, user.user.id))).toBe(94);
      await expectConsistent(user.user.id);
      // Called after the change: refused, nothing held.
      expect((await chat(user.headers, disabled)).statusCode).toBe(404);
      expect((await chat(user.headers, deleted)).statusCode).toBe(404);
      await expectConsistent(user.user.id);
    });
  }

  it('its provider deleted mid-call (its models first): the call ends, recorded and charged', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100');
    const created = await api('POST', '/providers', admin, { name: 'fake-gone', kind: 'openai-compatible', base_url: fake.url, api_key: 'sk-gone-0123456789' });
    expect(created.statusCode, created.body).toBe(200);
    await customModel('fake-gone-model', 'fake-gone');
    fake.script('fake-gone-model', { text: 'slow', chunkDelayMs: 300, usage: { prompt_tokens: 1, completion_tokens: 2 } });
    const call = chat(user.headers, 'fake-gone-model');
    await fake.waitFor((log) => log.length === 1);
    expect((await api('DELETE', '/models/fake-gone-model', admin)).statusCode).toBe(200);
    expect((await api('DELETE', `/providers/${created.json<{ id: string }>().id}`, admin)).statusCode).toBe(200);
    expect((await call).statusCode).toBe(200);
    await ctx.app.meter.idle();
    expect((await recordsOf(user.user.id)).map((r) => [r.model, r.cost])).toEqual([['fake-gone-model', '2']]);
    await expectConsistent(user.user.id);
  });

  it("its provider's API key changed mid-call: an upstream error that echoes the key it was sent with does not carry that key to the client or the record", async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100');
    const sentKeys = ['sk-rotated-away-0123456789', 'sk-rotated-next-0123456789'];
    const created = await api('POST', '/providers', admin, { name: 'fake-rotating', kind: 'openai-compatible', base_url: fake.url, api_key: sentKeys[0] });
    expect(created.statusCode, created.body).toBe(200);
    await customModel('fake-rotating-model', 'fake-rotating');
    for (const [i, stream] of [false, true].entries()) {
      const sent = sentKeys[i]!;
      fake.reset();
      // Long enough that the rotation lands first on a loaded machine too (asserted below: else this tests nothing).
      fake.script('fake-rotating-model', { status: 400, chunkDelayMs: 1_000, body: { error: { message: `Bad request from Authorization: Bearer ${sent}` } } });
      const call = chat(user.headers, 'fake-rotating-model', { stream });
      await fake.waitFor((log) => log.length === 1);
      expect(fake.log[0]!.headers.authorization).toBe(`Bearer ${sent}`);
      const rotated = await api('PATCH', `/providers/${created.json<{ id: string }>().id}`, admin, { api_key: sentKeys[i + 1] ?? 'sk-rotated-last-0123456789' });
      expect(rotated.statusCode, rotated.body).toBe(200);
      expect(fake.log[0]!.completed, 'the key rotated while the call was in flight').toBe(false);
      const response = await call;
      expect(response.statusCode).toBe(400);
      expect(response.body).not.toContain(sent);
      expect(response.body).toContain('Bearer [redacted]');
    }
    await ctx.app.meter.idle();
    const errors = (await rowsOf<{ error: string }>(sql`select error from usage_records where owner_id = ${user.user.id}`)).map((r) => r.error);
    expect(errors).toHaveLength(2);
    for (const error of errors) for (const key of sentKeys) expect(error).not.toContain(key);
    await expectConsistent(user.user.id);
  });
});

describe('an API key or its user changed while calls are in flight', () => {
  it('a key revoked, deleted, or its max_budget and rpm lowered mid-call: its calls end, recorded, charged to the key and the account', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100');
    const revoked = await createKey(ctx.app, user, { name: 'revoked', max_budget: '50' });
    const deleted = await createKey(ctx.app, user, { name: 'deleted', max_budget: '50' });
    const lowered = await createKey(ctx.app, user, { name: 'lowered', max_budget: '50', rpm: 100 });
    fake.defaultReply = { text: 'slow', chunkDelayMs: 300, usage: { prompt_tokens: 1, completion_tokens: 4 } };
    try {
      const calls = [chat(xApiKey(revoked.key), 'fake-billed'), chat(xApiKey(deleted.key), 'fake-billed'), chat(xApiKey(lowered.key), 'fake-billed')];
      await fake.waitFor((log) => log.length === 3);
      expect((await api('PATCH', `/api-keys/${revoked.id}`, user.headers, { status: 'revoked' })).statusCode).toBe(200);
      expect((await api('DELETE', `/api-keys/${deleted.id}`, user.headers)).statusCode).toBe(200);
      expect((await api('PATCH', `/api-keys/${lowered.id}`, user.headers, { max_budget: '1', rpm: 1 })).statusCode).toBe(200);
      for (const response of await Promise.all(calls)) expect(response.statusCode, response.body).toBe(200);
    } finally {
      fake.defaultReply = { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 1 } };
    }
    await ctx.app.meter.idle();
    const records = await recordsOf(user.user.id);
    expect(records.map((r) => r.api_key_id).sort()).toEqual([revoked.id, deleted.id, lowered.id].sort());
    expect(records.every((r) => r.cost === '4')).toBe(true);
    expect(Number(await ledgerSum(ctx.database.db, user.user.id))).toBe(88);
    const keys = await rowsOf(sql`select id, trim_scale(spent)::text as spent, trim_scale(budget_reserved)::text as reserved from api_keys where owner_id = ${user.user.id} order by name`);
    expect(keys).toEqual(
      expect.arrayContaining([
        { id: lowered.id, spent: '4', reserved: '0' },
        { id: revoked.id, spent: '4', reserved: '0' },
      ]),
    );
    // The lowered limits hold from now on: the call in flight counted against rpm 1, and 4 spent of a budget of 1.
    expect((await chat(xApiKey(lowered.key), 'fake-billed')).statusCode).toBe(429);
    expect((await api('PATCH', `/api-keys/${lowered.id}`, user.headers, { rpm: null })).statusCode).toBe(200);
    expect((await chat(xApiKey(lowered.key), 'fake-billed')).statusCode).toBe(402);
    await expectConsistent(user.user.id);
  });

  it("a user deleted or deactivated mid-call: the deleted user's record is dropped, the others' in the same batch written; no hold left", async () => {
    const gone = await createUser(ctx.app);
    const paused = await createUser(ctx.app);
    const bystander = await createUser(ctx.app);
    for (const user of [gone, paused, bystander]) await grant(user, '100');
    fake.defaultReply = { text: 'slow', chunkDelayMs: 300, usage: { prompt_tokens: 1, completion_tokens: 4 } };
    try {
      const keyed = await createKey(ctx.app, gone, { name: 'budgeted', max_budget: '50' });
      const calls = [chat(gone.headers, 'fake-billed'), chat(xApiKey(keyed.key), 'fake-billed'), chat(paused.headers, 'fake-billed'), chat(bystander.headers, 'fake-billed')];
      await fake.waitFor((log) => log.length === 4);
      expect((await api('DELETE', `/users/${gone.user.id}`, admin)).statusCode).toBe(200);
      expect((await api('PATCH', `/users/${paused.user.id}`, admin, { is_active: false })).statusCode).toBe(200);
      for (const response of await Promise.all(calls)) expect(response.statusCode, response.body).toBe(200);
    } finally {
      fake.defaultReply = { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 1 } };
    }
    await ctx.app.meter.idle();
    expect(await recordsOf(gone.user.id)).toEqual([]);
    expect((await recordsOf(paused.user.id)).map((r) => r.cost)).toEqual(['4']);
    expect((await recordsOf(bystander.user.id)).map((r) => r.cost)).toEqual(['4']);
    await expectConsistent(paused.user.id);
    await expectConsistent(bystander.user.id);
    expect(await rowsOf(sql`select count(*)::int as n from credit_reservations where user_id = ${gone.user.id}`)).toEqual([{ n: 0 }]);
  });
});

describe('credits granted while calls settle', () => {
  it("keeps each entry's balance_after the one before plus its amount, and the balance the ledger's sum", async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    fake.defaultReply = { text: 'ok', chunkDelayMs: 5, usage: { prompt_tokens: 1, completion_tokens: 3 } };
    try {
      const work: Promise<unknown>[] = [];
      for (let i = 0; i < 60; i++) {
        work.push(chat(user.headers, 'fake-billed'));
        if (i % 6 === 0) work.push(api('POST', '/billing/credits', admin, { user_id: user.user.id, amount: i % 12 === 0 ? '7' : '-2', type: i % 12 === 0 ? 'grant' : 'adjustment', description: 'concurrent' }));
      }
      await Promise.all(work);
    } finally {
      fake.defaultReply = { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 1 } };
    }
    await expectConsistent(user.user.id);
    const ledger = await ledgerOf(user.user.id);
    expect(ledger.filter((e) => e.type === 'usage')).toHaveLength(60);
  });
});
