import { randomUUID } from 'node:crypto';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';

import { jsonSchema, tool } from 'ai';
import { and, eq, sql } from 'drizzle-orm';
import { describe, expect, it, vi } from 'vitest';

import { transaction } from '../../src/core/db.js';
import { PaymentRequiredError, TooManyRequestsError } from '../../src/core/errors.js';

import { creditReservations, usageRecords } from '../../src/models/index.js';

import { changeBalance, getBalance, hold, keySpend, ledgerSum, settleMany } from '../../src/crud/billing.js';
import { queryRows } from '../../src/crud/owned.js';
import { ModelCallAbortedError } from '../../src/modules/ai-models/errors.js';
import { addCosts, type ChatRequest, type CostEstimate, MEDIA_PART_TOKENS, type UsageRecord } from '../../src/modules/ai-models/index.js';
import { estimateTextTokens } from '../../src/modules/ai-models/token-estimate.js';
import { releaseHoldsLeftBehind } from '../../src/services/usage-meter.js';
import { buildTestApp, useTestApp } from '../helpers/app.js';
import { createProject, createUser, type TestUser } from '../helpers/factories.js';
import { fakeEmbedding, type FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey, eventually, expectValidationError, type ListBody, sleep, UUID, xApiKey } from '../helpers/http.js';
import { createFolder, type EntryBody, ingested, multipartBody, settled, upload, uploaded } from '../helpers/knowledge.js';
import { captureLogs, LEVEL } from '../helpers/logs.js';
import { chatRequest, usageRecordOf, useFakeModels } from '../helpers/metered-models.js';
import { intercepting } from '../helpers/statements.js';

// Knowledge-base ingestion embeds with `fake-embed`, 2 chunks a call (where pgvector exists: PGlite).
const ctx = useTestApp({
  BILLING_ENABLED: 'true',
  USAGE_FLUSH_INTERVAL_MS: '20',
  MODEL_MAX_RETRIES: '0',
  EMBEDDING_MODEL: 'fake-embed',
  KB_EMBED_BATCH: '2',
  KB_CHUNK_TOKENS: '32',
  KB_CHUNK_OVERLAP_TOKENS: '0',
  JOB_BACKOFF_MS: '10',
});
const api = apiOf(ctx);

let fake: FakeModelServer;
let admin: Record<string, string>;

interface TransactionBody {
  id: string;
  type: string;
  amount: string;
  balance_after: string;
  description: string | null;
  usage_record_id: string | null;
}

useFakeModels(ctx, (server, headers) => {
  fake = server;
  admin = headers;
});

async function grant(user: TestUser, amount: string, extra: Record<string, unknown> = {}) {
  const response = await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount, description: 'test credits', ...extra });
  expect(response.statusCode, response.body).toBe(200);
  return response.json<TransactionBody>();
}

async function balanceOf(user: TestUser) {
  await ctx.app.meter.idle();
  return (await api('GET', '/billing/balance', user.headers)).json<{ balance: string; reserved: string; available: string }>();
}

/** The invariants: the balance equals the sum of the ledger, the account's entry count (the ledger list's total) its length, and nothing stays held. */
async function expectConsistent(user: TestUser) {
  await ctx.app.meter.idle();
  const account = await getBalance(ctx.database.db, user.user.id);
  expect(Number(account.reserved)).toBe(0);
  expect(await ledgerSum(ctx.database.db, user.user.id)).toBe(account.balance);
  const [counts] = await queryRows<{ kept: number; entries: number }>(
    ctx.database.db,
    sql`select coalesce((select entries from credit_accounts where user_id = ${user.user.id}), 0)::int as kept,
          (select count(*) from credit_transactions where owner_id = ${user.user.id})::int as entries`,
  );
  expect(counts!.kept).toBe(counts!.entries);
}

// `fake-billed`: 1 credit per output token, input free. maxOutputTokens 10 → reserves 10 credits.
const billed = (user: TestUser, extra = {}) => chatRequest('fake-billed', { user_id: user.user.id }, { maxOutputTokens: 10, ...extra });

describe('POST /billing/credits', () => {
  it('a superuser grants credits: balance and ledger change together', async () => {
    const user = await createUser(ctx.app);
    const response = await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount: '12.5', description: 'welcome' });
    expect(response.statusCode, response.body).toBe(200);
    const created = response.json<TransactionBody>();
    expect(created.id).toMatch(UUID);
    expect(created).toMatchObject({ type: 'grant', amount: '12.5', balance_after: '12.5', description: 'welcome' });
    expect(response.headers.location).toBe(`/api/v1/billing/transactions/${created.id}`);
    await grant(user, '0.000000000001', { type: 'refund' });
    const adjusted = await grant(user, '-2.5', { type: 'adjustment' });
    expect(adjusted.balance_after).toBe('10.000000000001');
    expect(await balanceOf(user)).toEqual({ balance: '10.000000000001', reserved: '0', available: '10.000000000001', billing_enabled: true });
    const list = (await api('GET', '/billing/transactions?limit=2', user.headers)).json<ListBody<TransactionBody>>();
    expect(list.count).toBe(3);
    expect(list.data.map((t) => t.type)).toEqual(['adjustment', 'refund']);
    expect((await api('GET', `/billing/transactions/${created.id}`, user.headers)).json()).toMatchObject({ id: created.id, amount: '12.5' });
    await expectConsistent(user);
  });

  it('is for superusers only: 401, 403 for users and for a superuser’s scoped key', async () => {
    const user = await createUser(ctx.app);
    const body = { user_id: user.user.id, amount: '5', description: 'x' };
    expect((await api('POST', '/billing/credits', {}, body)).statusCode).toBe(401);
    expect((await api('POST', '/billing/credits', user.headers, body)).statusCode).toBe(403);
    const project = await createProject(ctx.app, admin);
    const scoped = await createKey(ctx.app, { headers: admin }, { name: 'scoped', project_id: project.id });
    expect((await api('POST', '/billing/credits', xApiKey(scoped.key), body)).statusCode).toBe(403);
    // Refused before the body is read: not 422 for what it lacks, nor for a number where a decimal string goes.
    expect((await api('POST', '/billing/credits', user.headers, {})).statusCode).toBe(403);
    expect((await balanceOf(user)).balance).toBe('0');
  });

  it('404 for an unknown user, 422 for a bad amount, 409 for an adjustment beyond the balance', async () => {
    const user = await createUser(ctx.app);
    const missing = await api('POST', '/billing/credits', admin, { user_id: randomUUID(), amount: '5', description: 'x' });
    expect(missing.statusCode).toBe(404);
    expect(missing.json()).toEqual({ detail: 'User not found' });
    for (const amount of ['abc', '0', '0.000', '1.0000000000001', '-5', '1e3', 12.5]) {
      expectValidationError(await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount, description: 'x' }), ['body', 'amount']);
    }
    expectValidationError(await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount: '1', description: 'x', owner_id: randomUUID() }), ['body', 'owner_id'], 'extra_forbidden');
    await grant(user, '3');
    const over = await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount: '-3.5', type: 'adjustment', description: 'too much' });
    expect(over.statusCode).toBe(409);
    // Nothing is in progress: the answer says nothing is held.
    expect(over.json()).toEqual({ detail: 'The adjustment would leave less than nothing: balance 3' });
    await expectConsistent(user);
  });

  it('409 naming the limit for a grant past the largest balance an account holds (numeric(30, 12)), not a 422 "Value out of range" on the body; nothing changes', async () => {
    const user = await createUser(ctx.app);
    // A balance of 999,999,999,999,999,000 (18 digits) from 1,000 of the largest grants one body takes.
    const biggest = '999999999999999';
    for (let i = 0; i < 1000; i++) {
      expect(await changeBalance(ctx.database.db, { userId: user.user.id, type: 'grant', amount: biggest, description: 'x', createdBy: user.user.id })).not.toBeNull();
    }
    const past = await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount: biggest, description: 'one more' });
    expect(past.statusCode, past.body).toBe(409);
    expect(past.json()).toEqual({
      detail: `The grant would take the balance past the most an account holds (999999999999999999.999999999999): balance 999999999999999000, amount ${biggest}`,
    });
    // What still fits is taken.
    expect((await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount: '999.999999999999', description: 'fits' })).statusCode).toBe(200);
    expect((await balanceOf(user)).balance).toBe('999999999999999999.999999999999');
    await expectConsistent(user);
  });

  it('another user’s ledger is never visible: 404 for their transaction, empty lists', async () => {
    const [owner, other] = [await createUser(ctx.app), await createUser(ctx.app)];
    const created = await grant(owner, '1');
    expect((await api('GET', `/billing/transactions/${created.id}`, other.headers)).statusCode).toBe(404);
    expect((await api('GET', '/billing/transactions', other.headers)).json()).toEqual({ data: [], count: 0 });
    expect((await balanceOf(other)).balance).toBe('0');
  });
});

describe('a superuser reading another user’s credits (user_id)', () => {
  it('reads their balance, ledger, entries and usage as they would, the charges of their last call included; without user_id, the superuser’s own', async () => {
    const user = await createUser(ctx.app);
    const created = await grant(user, '100');
    // What a grant's Location names is readable by whoever made it.
    const entry = await api('GET', `/billing/transactions/${created.id}`, admin);
    expect(entry.statusCode, entry.body).toBe(200);
    expect(entry.json()).toMatchObject({ id: created.id, type: 'grant', amount: '100', balance_after: '100' });
    const call = await ctx.app.models.chat(billed(user)); // read at once below
    const left = String(100 - Number(call.cost));
    const of = `user_id=${user.user.id}`;
    const balance = await api('GET', `/billing/balance?${of}`, admin);
    expect(balance.statusCode, balance.body).toBe(200);
    expect(balance.json()).toEqual({ balance: left, reserved: '0', available: left, billing_enabled: true });
    const ledger = (await api('GET', `/billing/transactions?${of}&limit=5`, admin)).json<ListBody<TransactionBody>>();
    expect(ledger.count).toBe(2);
    expect(ledger.data.map((t) => [t.type, t.amount, t.balance_after])).toEqual([
      ['usage', `-${call.cost}`, left],
      ['grant', '100', '100'],
    ]);
    const summary = (await api('GET', `/billing/summary?${of}&group_by=model`, admin)).json<{ total: { calls: number; cost: string } }>();
    expect(summary.total).toMatchObject({ calls: 1, cost: call.cost });
    // The superuser's own account, as before.
    const own = (await api('GET', '/billing/transactions', admin)).json<ListBody<TransactionBody>>();
    expect(own.data.some((t) => t.id === created.id)).toBe(false);
    expect((await api('GET', '/billing/summary?group_by=model', admin)).json<{ total: { calls: number } }>().total.calls).toBe(0);
  });

  it('is for superusers: 403 for a user naming another user (or a superuser’s scoped key); a user’s own id reads as without it; 404 for no such user, 422 for no id', async () => {
    const [user, other] = [await createUser(ctx.app), await createUser(ctx.app)];
    await grant(other, '5');
    const project = await createProject(ctx.app, admin);
    const scoped = xApiKey((await createKey(ctx.app, { headers: admin }, { name: 'scoped', project_id: project.id })).key);
    const userKey = xApiKey((await createKey(ctx.app, user, { name: 'own' })).key);
    const adminKey = xApiKey((await createKey(ctx.app, { headers: admin }, { name: 'operator' })).key);
    for (const path of ['/billing/balance', '/billing/transactions', '/billing/summary']) {
      for (const headers of [user.headers, userKey, scoped]) {
        const refused = await api('GET', `${path}?user_id=${other.user.id}`, headers);
        expect(refused.statusCode, `${path} ${refused.body}`).toBe(403);
      }
      // A superuser's key that is not scoped to a project acts as the superuser.
      expect((await api('GET', `${path}?user_id=${other.user.id}`, adminKey)).statusCode, path).toBe(200);
      // Their own id, in capitals too (a UUID is case-insensitive).
      const own = await api('GET', `${path}?user_id=${user.user.id.toUpperCase()}`, user.headers);
      expect(own.statusCode, path).toBe(200);
      // The same answer (a summary's default range ends now: not compared).
      const withoutRange = (body: Record<string, unknown>) => ({ ...body, from: undefined, to: undefined });
      expect(withoutRange(own.json())).toEqual(withoutRange((await api('GET', path, user.headers)).json()));
      const missing = await api('GET', `${path}?user_id=${randomUUID()}`, admin);
      expect(missing.statusCode, path).toBe(404);
      expect(missing.json()).toEqual({ detail: 'User not found' });
      expectValidationError(await api('GET', `${path}?user_id=nobody`, admin), ['query', 'user_id']);
    }
    // An entry by id: a superuser's scoped key reads its project's entries only, as any scoped key; a
    // route without user_id does not refuse its own caller for one.
    const [granted] = (await api('GET', `/billing/transactions?user_id=${other.user.id}`, admin)).json<ListBody<TransactionBody>>().data;
    expect((await api('GET', `/billing/transactions/${granted!.id}`, scoped)).statusCode).toBe(404);
    expect((await api('GET', `/billing/transactions/${granted!.id}?user_id=${user.user.id}`, other.headers)).statusCode).toBe(200);
  });
});

describe('metered calls with BILLING_ENABLED', () => {
  it('402 without credits, naming balance and needed amount; the upstream is not called and the balance is untouched', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '4');
    const refused = ctx.app.models.chat(billed(user));
    await expect(refused).rejects.toBeInstanceOf(PaymentRequiredError);
    await expect(refused).rejects.toThrow('Not enough credits: balance 4, available 4; this call to fake-billed needs up to 10');
    expect(fake.log).toHaveLength(0);
    expect(await balanceOf(user)).toMatchObject({ balance: '4', reserved: '0' });
    await expectConsistent(user);
  });

  it('a call without a maximum sends upstream the MODEL_DEFAULT_MAX_OUTPUT_TOKENS its hold assumed, so it cannot cost more than was held; one that holds nothing (no account to charge) sends none', async () => {
    const user = await createUser(ctx.app);
    const cap = ctx.app.settings.MODEL_DEFAULT_MAX_OUTPUT_TOKENS;
    // 1 credit an output token: the hold is the default maximum's.
    await grant(user, String(3 * cap));
    await ctx.app.models.chat(chatRequest('fake-billed', { user_id: user.user.id }));
    const stream = ctx.app.models.stream(chatRequest('fake-billed', { user_id: user.user.id }));
    for await (const _ of stream);
    await ctx.app.models.chat(chatRequest('fake-billed', {}));
    expect(fake.log.map((r) => r.body.max_tokens)).toEqual([cap, cap, undefined]);
    await ctx.app.meter.idle();
    await expectConsistent(user);
  });

  it('reserves for the whole prompt sent: tools (names, descriptions, schemas) and the response format count, not only the messages', async () => {
    const priced = await api('POST', '/models', admin, { id: 'fake-billed-input', provider: 'fake', pricing: { input_cost_per_million_tokens: '1000000', output_cost_per_million_tokens: '0' } });
    expect(priced.statusCode, priced.body).toBe(200);
    const user = await createUser(ctx.app);
    await grant(user, '100');
    const long = 'Look a word up in the dictionary. '.repeat(120); // ~4,000 characters: ~1,000 tokens
    const asks: Partial<ChatRequest>[] = [
      { tools: { lookup: tool({ description: long, inputSchema: jsonSchema({ type: 'object', properties: { q: { type: 'string' } } }) }) } },
      { tools: { lookup: tool({ inputSchema: jsonSchema({ type: 'object', properties: { q: { type: 'string', description: long } } }) }) } },
      { responseFormat: { type: 'json', name: 'answer', schema: { type: 'object', properties: { a: { type: 'string', description: long } } } } },
    ];
    for (const ask of asks) {
      const refused = ctx.app.models.chat(chatRequest('fake-billed-input', { user_id: user.user.id }, { maxOutputTokens: 10, ...ask }));
      await expect(refused).rejects.toBeInstanceOf(PaymentRequiredError);
      await expect(refused).rejects.toThrow(/^Not enough credits: balance 100, available 100; this call to fake-billed-input needs up to 1\d{3}$/);
    }
    expect(fake.log).toHaveLength(0);
    await expectConsistent(user);
  });

  it('reserves for each image in a prompt what a large image is billed, not what its URL or data says', async () => {
    const priced = await api('POST', '/models', admin, { id: 'fake-billed-image', provider: 'fake', pricing: { input_cost_per_million_tokens: '1000000', output_cost_per_million_tokens: '0' } });
    expect(priced.statusCode, priced.body).toBe(200);
    const user = await createUser(ctx.app);
    await grant(user, '5000');
    const context = { user_id: user.user.id };
    const withImages = (...images: (URL | string)[]): Partial<ChatRequest> => ({
      maxOutputTokens: 1,
      messages: [{ role: 'user', content: [{ type: 'text', text: 'What is this?' }, ...images.map((image) => ({ type: 'image' as const, image }))] }],
    });
    // A URL of ~30 characters and a 1×1 PNG's base64: each held as MEDIA_PART_TOKENS (1 credit a token here), as much as a large image.
    const pixel = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==';
    // A large image sent inline: its base64 (400,000 characters, ~100,000 tokens as text) is no measure of it either.
    const large = `data:image/png;base64,${'A'.repeat(400_000)}`;
    for (const ask of [withImages(new URL('https://example.com/cat.png'), `data:image/png;base64,${pixel}`), withImages(new URL('https://example.com/a.png'), new URL('https://example.com/b.png')), withImages(large, new URL('https://example.com/c.png'))]) {
      const refused = ctx.app.models.chat(chatRequest('fake-billed-image', context, ask));
      await expect(refused).rejects.toBeInstanceOf(PaymentRequiredError);
      // Two images, the text and its message's JSON (some 30 tokens), one output token.
      const needs = Number(/needs up to (\d+)$/.exec(await refused.then(() => '', (e: Error) => e.message))?.[1]);
      expect(needs).toBeGreaterThan(2 * MEDIA_PART_TOKENS);
      expect(needs).toBeLessThan(2 * MEDIA_PART_TOKENS + 60);
    }
    expect(fake.log).toHaveLength(0);
    // One image fits in the balance (the fake answers without fetching it: its usage is what it reports).
    const one = await ctx.app.models.chat(chatRequest('fake-billed-image', context, withImages(`data:image/png;base64,${pixel}`)));
    expect(one.text).toBeTruthy();
    await expectConsistent(user);
  });

  it('reserves for a predicted output too (its rejected tokens are billed as output, beyond max_tokens), and charges them once: as the completion tokens that count them', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100');
    // 3,800 bytes of prediction (held as 3,800 tokens: see the next test), as a string or as text parts: with max_tokens' 10, more than the balance at 1 credit a token.
    const predicted = 'const answer = 42;\n'.repeat(200);
    for (const content of [predicted, [{ type: 'text', text: predicted.slice(0, 2000) }, { type: 'text', text: predicted.slice(2000) }]]) {
      const refused = ctx.app.models.chat(billed(user, { prediction: { type: 'content', content } }));
      await expect(refused).rejects.toBeInstanceOf(PaymentRequiredError);
      await expect(refused).rejects.toThrow('Not enough credits: balance 100, available 100; this call to fake-billed needs up to 3810');
    }
    // A provider that is not sent it (Anthropic's) does not bill it: the hold is max_tokens' alone.
    expect((await api('POST', '/providers', admin, { name: 'predicted-anthropic', kind: 'anthropic', base_url: fake.url, api_key: 'sk-predicted' })).statusCode).toBe(200);
    const claude = await api('POST', '/models', admin, { id: 'predicted-claude', provider: 'predicted-anthropic', pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '1000000' } });
    expect(claude.statusCode, claude.body).toBe(200);
    const poor = await createUser(ctx.app);
    await grant(poor, '5');
    const unheard = ctx.app.models.chat(chatRequest('predicted-claude', { user_id: poor.user.id }, { maxOutputTokens: 10, prediction: { type: 'content', content: predicted } }));
    await expect(unheard).rejects.toThrow('Not enough credits: balance 5, available 5; this call to predicted-claude needs up to 10');
    expect(fake.log).toHaveLength(0);
    // A prediction the balance covers: 3 tokens said, 20 of the prediction rejected, 23 completion tokens billed.
    fake.script('fake-billed', { text: 'ok', usage: { prompt_tokens: 7, completion_tokens: 23, rejected_prediction_tokens: 20 } });
    const result = await ctx.app.models.chat(billed(user, { prediction: { type: 'content', content: 'const answer = 42;\n'.repeat(4) } }));
    expect(fake.log[0]!.body.prediction).toEqual({ type: 'content', content: 'const answer = 42;\n'.repeat(4) });
    expect(result.cost).toBe('23');
    expect(await balanceOf(user)).toMatchObject({ balance: '77', reserved: '0' });
    await expectConsistent(user);
  });

  it('holds a predicted output at a token a byte: punctuation or random characters a client chooses tokenize at about one a character, billed at the output price', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    // 2,000 characters a tokenizer splits about one a character: the prompt's estimate (a quarter of a token each) held 510 of what could cost 2,010.
    const symbols = '!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~';
    const prediction = Array.from({ length: 2_000 }, (_, i) => symbols[(i * 7919) % symbols.length]).join('');
    const refused = ctx.app.models.chat(billed(user, { prediction: { type: 'content', content: prediction } }));
    await expect(refused).rejects.toThrow('Not enough credits: balance 1000, available 1000; this call to fake-billed needs up to 2010');
    expect(fake.log).toHaveLength(0);
    await expectConsistent(user);
  });

  it('reserves the worst case, settles to the exact cost: a usage entry in the ledger, the rest released', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '25');
    fake.script('fake-billed', { text: 'ok', usage: { prompt_tokens: 7, completion_tokens: 3 } });
    const result = await ctx.app.models.chat(billed(user));
    expect(result.cost).toBe('3');
    expect(await balanceOf(user)).toMatchObject({ balance: '22', reserved: '0', available: '22' });
    const list = (await api('GET', '/billing/transactions', user.headers)).json<ListBody<TransactionBody>>();
    expect(list.data[0]).toMatchObject({ type: 'usage', amount: '-3', balance_after: '22', description: 'chat fake-billed' });
    const [record] = await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, user.user.id));
    expect(list.data[0]!.usage_record_id).toBe(record!.id);
    expect(await ctx.database.db.select().from(creditReservations).where(eq(creditReservations.user_id, user.user.id))).toEqual([]);
    await expectConsistent(user);
  });

  it('lists the ledger in the order its balances were made: each entry\'s balance_after is the one before it plus its amount, also within one batch of charges', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    for (let i = 0; i < 12; i++) {
      fake.script('fake-billed', { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 1 + (i % 5) } });
      await ctx.app.models.chat(billed(user));
    }
    await grant(user, '5');
    await ctx.app.meter.idle();
    const { data } = (await api('GET', '/billing/transactions?limit=100', user.headers)).json<ListBody<TransactionBody>>();
    expect(data).toHaveLength(14);
    const oldestFirst = data.toReversed();
    for (let i = 1; i < oldestFirst.length; i++) {
      expect(Number(oldestFirst[i]!.balance_after), `entry ${i}`).toBe(Number(oldestFirst[i - 1]!.balance_after) + Number(oldestFirst[i]!.amount));
    }
    expect(oldestFirst.at(-1)!.balance_after).toBe((await balanceOf(user)).balance);
  });

  it('an upstream error releases the whole reservation and charges nothing', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '10');
    fake.script('fake-billed', { status: 500 });
    await expect(ctx.app.models.chat(billed(user))).rejects.toThrow('Upstream 500');
    expect(await balanceOf(user)).toMatchObject({ balance: '10', reserved: '0' });
    const list = (await api('GET', '/billing/transactions', user.headers)).json<ListBody<TransactionBody>>();
    expect(list.data.map((t) => t.type)).toEqual(['grant']);
    await expectConsistent(user);
  });

  it('a call that costs more than it held (a provider past the maximum) is charged as far as the free balance goes: never below zero, nor into what other calls hold', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '25');
    // Held 10 (its maximum), reported 50.
    const usual = fake.defaultReply;
    fake.defaultReply = { text: 'long', usage: { prompt_tokens: 1, completion_tokens: 50 } };
    try {
      await ctx.app.models.chat(billed(user));
      expect(await balanceOf(user)).toMatchObject({ balance: '0', reserved: '0' });
      // Three at once, each holding 5 of 15 before any answers: all three are served, whatever order they settle in.
      await grant(user, '15');
      fake.defaultReply = { text: 'long', chunkDelayMs: 200, usage: { prompt_tokens: 1, completion_tokens: 50 } };
      await Promise.all(Array.from({ length: 3 }, () => ctx.app.models.chat(billed(user, { maxOutputTokens: 5 }))));
    } finally {
      fake.defaultReply = usual;
    }
    expect(await balanceOf(user)).toMatchObject({ balance: '0', reserved: '0' });
    await expectConsistent(user);
    const ledger = (await api('GET', '/billing/transactions?limit=100', user.headers)).json<{ data: { type: string; amount: string; balance_after: string; description: string }[] }>().data;
    const usage = ledger.filter((entry) => entry.type === 'usage').reverse();
    expect(usage.map((entry) => entry.amount)[0]).toBe('-25');
    expect(usage[0]!.description).toMatch(/\(cost 50; the balance covered 25\)$/);
    const three = usage.slice(1);
    expect(three).toHaveLength(3);
    expect(three.reduce((sum, entry) => sum + Number(entry.amount), 0)).toBe(-15);
    for (const entry of three) {
      expect(Number(entry.balance_after)).toBeGreaterThanOrEqual(0);
      expect(entry.description).toMatch(/\(cost 50; the balance covered \d+\)$/);
    }
    // The usage records keep what each call cost.
    const costs = await ctx.database.db.select({ cost: usageRecords.cost }).from(usageRecords).where(eq(usageRecords.owner_id, user.user.id));
    expect(costs.map((row) => Number(row.cost))).toEqual([50, 50, 50, 50]);
  });

  it('an over-running call is not charged the credit a call still in flight holds, which stays covered', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '30');
    const usual = fake.defaultReply;
    try {
      // A slow call holds 10; a quick one that reports 50 against its hold of 10 settles first.
      fake.script('fake-billed', { text: 'slow', chunkDelayMs: 400, usage: { prompt_tokens: 1, completion_tokens: 4 } }, { text: 'long', usage: { prompt_tokens: 1, completion_tokens: 50 } });
      const slow = ctx.app.models.chat(billed(user));
      await fake.waitFor((log) => log.length === 1);
      await ctx.app.models.chat(billed(user));
      // Settled: 30 − 20 (what the slow call's hold leaves free) = 10, still covering the slow call.
      expect(await balanceOf(user)).toMatchObject({ balance: '10', reserved: '10' });
      await slow;
    } finally {
      fake.defaultReply = usual;
    }
    expect(await balanceOf(user)).toMatchObject({ balance: '6', reserved: '0' });
    await expectConsistent(user);
  });

  it('an aborted stream releases the reservation and pays only for what was streamed', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100');
    fake.script('fake-billed', { chunks: ['abcd', 'efgh', 'ijkl', 'mnop', 'qrst'], chunkDelayMs: 100, usage: { prompt_tokens: 1, completion_tokens: 50 } });
    const controller = new AbortController();
    const stream = ctx.app.models.stream(billed(user, { maxOutputTokens: 60, signal: controller.signal }));
    const seen: string[] = [];
    await expect(
      (async () => {
        for await (const event of stream) {
          if (event.type === 'text-delta') seen.push(event.text);
          if (seen.length === 1) controller.abort();
        }
      })(),
    ).rejects.toThrow();
    await fake.waitFor((log) => log[0]?.aborted === true);
    const account = await balanceOf(user);
    expect(account.reserved).toBe('0');
    // Estimated output: 4 characters seen = 1 token = 1 credit (not the 60 reserved).
    expect(account.balance).toBe('99');
    await expectConsistent(user);
  });

  it('a call aborted once its request went upstream pays for its prompt (estimated), streamed or not, before any output came', async () => {
    const priced = await api('POST', '/models', admin, { id: 'fake-billed-prompt', provider: 'fake', pricing: { input_cost_per_million_tokens: '1000000', output_cost_per_million_tokens: '1000000' } });
    expect(priced.statusCode, priced.body).toBe(200);
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    const prompt = 'word '.repeat(80); // 400 characters: ~100 tokens
    for (const streamed of [false, true]) {
      fake.reset();
      fake.script('fake-billed-prompt', { text: 'late', chunkDelayMs: 2_000 });
      const controller = new AbortController();
      const request = chatRequest('fake-billed-prompt', { user_id: user.user.id }, { messages: [{ role: 'user', content: prompt }], maxOutputTokens: 10, signal: controller.signal });
      const call = streamed ? (async () => { for await (const _ of ctx.app.models.stream(request)); })() : ctx.app.models.chat(request);
      await fake.waitFor((log) => log.length === 1);
      controller.abort();
      await expect(call).rejects.toThrow(ModelCallAbortedError);
    }
    await ctx.app.meter.idle();
    const rows = await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, user.user.id));
    expect(rows.map((r) => [r.status, r.estimated, r.output_tokens])).toEqual([['aborted', true, 0], ['aborted', true, 0]]);
    for (const row of rows) expect(row.input_tokens).toBeGreaterThanOrEqual(100);
    expect(Number((await balanceOf(user)).balance)).toBeLessThanOrEqual(1000 - 200);
    await expectConsistent(user);
  });

  it('a broken 200 (no JSON, or past MODEL_MAX_RESPONSE_BYTES) pays for its prompt (estimated): the provider billed it', async () => {
    const priced = await api('POST', '/models', admin, { id: 'fake-billed-broken', provider: 'fake', pricing: { input_cost_per_million_tokens: '1000000', output_cost_per_million_tokens: '1000000' } });
    expect(priced.statusCode, priced.body).toBe(200);
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    const prompt = 'word '.repeat(80); // 400 characters: ~100 tokens
    const request = chatRequest('fake-billed-broken', { user_id: user.user.id }, { messages: [{ role: 'user', content: prompt }], maxOutputTokens: 10 });
    fake.script('fake-billed-broken', { rawBody: '{"choices": [' }, { text: 'Hi', padBytes: ctx.app.settings.MODEL_MAX_RESPONSE_BYTES + 1024 });
    await expect(ctx.app.models.chat(request)).rejects.toMatchObject({ statusCode: 502 });
    await expect(ctx.app.models.chat(request)).rejects.toMatchObject({ statusCode: 502 });
    await ctx.app.meter.idle();
    const rows = await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, user.user.id));
    expect(rows.map((r) => [r.status, r.estimated, r.output_tokens])).toEqual([['error', true, 0], ['error', true, 0]]);
    for (const row of rows) expect(row.input_tokens).toBeGreaterThanOrEqual(100);
    const charged = rows.reduce((sum, row) => sum + Number(row.cost), 0);
    expect(1000 - Number((await balanceOf(user)).balance)).toBe(charged);
    const list = (await api('GET', '/billing/transactions', user.headers)).json<ListBody<TransactionBody>>();
    expect(list.data.map((t) => t.type).sort()).toEqual(['grant', 'usage', 'usage']);
    await expectConsistent(user);
  });

  it('a /v1 call whose provider answered 200 and dropped the connection before any output pays for its prompt (estimated), streamed or not', async () => {
    const priced = await api('POST', '/models', admin, { id: 'fake-billed-dropped', provider: 'fake', pricing: { input_cost_per_million_tokens: '1000000', output_cost_per_million_tokens: '1000000' } });
    expect(priced.statusCode, priced.body).toBe(200);
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    const key = await createKey(ctx.app, user);
    const prompt = 'word '.repeat(80); // 400 characters: ~100 tokens
    for (const stream of [true, false]) {
      // The 200's headers and a first chunk that says nothing (its role, empty content), then the drop.
      fake.script('fake-billed-dropped', { deltas: [{ content: '' }, { content: 'lost' }], drop: { afterChunks: 1 } });
      const response = await ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: xApiKey(key.key), payload: { model: 'fake-billed-dropped', messages: [{ role: 'user', content: prompt }], max_tokens: 10, stream } });
      expect(response.statusCode, response.body).toBe(502);
    }
    await ctx.app.meter.idle();
    const rows = await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, user.user.id));
    expect(rows.map((r) => [r.status, r.estimated, r.output_tokens]).sort()).toEqual([['error', true, 0], ['error', true, 0]]);
    for (const row of rows) expect(row.input_tokens).toBeGreaterThanOrEqual(100);
    const charged = rows.reduce((sum, row) => sum + Number(row.cost), 0);
    expect(charged).toBeGreaterThanOrEqual(200);
    expect(1000 - Number((await balanceOf(user)).balance)).toBe(charged);
    await expectConsistent(user);
  });

  it('an embeddings call sent in several requests whose connection drops midway pays for the requests the provider billed, not the estimate of every input', async () => {
    const priced = await api('POST', '/models', admin, { id: 'fake-embed-billed', provider: 'fake', capabilities: ['embedding'], pricing: { input_cost_per_million_tokens: '1000000', output_cost_per_million_tokens: '0' } });
    expect(priced.statusCode, priced.body).toBe(200);
    const user = await createUser(ctx.app);
    await grant(user, '100000');
    // Four requests (2,048 inputs at most each): the first answered, the second cut off after its 200's headers, the others never sent.
    const values = Array.from({ length: 3 * 2048 + 5 }, (_, i) => `input number ${i}`);
    const [first, second] = [values.slice(0, 2048), values.slice(2048, 4096)];
    fake.script('fake-embed-billed', {}, { drop: { afterChunks: 0 } });
    await expect(ctx.app.models.embed({ model: 'fake-embed-billed', values, context: { user_id: user.user.id } })).rejects.toThrow(/Upstream connection error/);
    expect(fake.log.map((r) => r.reply)).toEqual([200, 'drop']);
    await ctx.app.meter.idle();
    const [row, ...others] = await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, user.user.id));
    expect(others).toEqual([]);
    // The first as the fake server reported it (a token each 4 characters of an input), the second its prompt's estimate, as a call of its own cut off there.
    const billedTokens = first.reduce((n, v) => n + Math.ceil(v.length / 4), 0) + Math.ceil(estimateTextTokens(second.join('')));
    expect(row).toMatchObject({ operation: 'embed', status: 'error', estimated: true, input_tokens: billedTokens });
    expect(100000 - Number((await balanceOf(user)).balance)).toBe(billedTokens);
    await expectConsistent(user);
  });

  /** `units` ten-millionths of a credit (a price of 3.7 a million tokens is 37 a token) as a decimal: with a usage row's 12 places, or trimmed as the API gives it. */
  const tenMillionths = (units: number, places?: number) => {
    const text = `${Math.floor(units / 1e7)}.${String(units % 1e7).padStart(7, '0')}`;
    return places === undefined ? text.replace(/\.?0+$/, '') : text.padEnd(text.indexOf('.') + 1 + places, '0');
  };

  /** `user`'s one usage row, and the one usage entry of its ledger, each charging `units` ten-millionths; its balance 1 less that. */
  async function expectChargedOnce(user: TestUser, units: number) {
    await ctx.app.meter.idle();
    const [row, ...others] = await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, user.user.id));
    expect(others).toEqual([]);
    expect(row!.cost).toBe(tenMillionths(units, 12));
    const usage = (await api('GET', '/billing/transactions', user.headers)).json<ListBody<TransactionBody>>().data.filter((t) => t.type === 'usage');
    expect(usage.map((t) => [t.amount, t.usage_record_id])).toEqual([[`-${tenMillionths(units)}`, row!.id]]);
    expect((await balanceOf(user)).balance).toBe(tenMillionths(1e7 - units));
    await expectConsistent(user);
    return row!;
  }

  it("a Google embeddings call sent in several requests, one refused midway (a 500), pays for the others' inputs, estimated as Google reports no usage, not for every input", async () => {
    const provider = await api('POST', '/providers', admin, { name: 'gem-billed', kind: 'google', base_url: fake.url, api_key: 'g-key-billed' });
    expect(provider.statusCode, provider.body).toBe(200);
    const priced = await api('POST', '/models', admin, { id: 'gem-embed-billed', provider: 'gem-billed', capabilities: ['embedding'], pricing: { input_cost_per_million_tokens: '3.7', output_cost_per_million_tokens: '0' } });
    expect(priced.statusCode, priced.body).toBe(200);
    const user = await createUser(ctx.app);
    await grant(user, '1');
    // Three requests side by side (100, 100 and 50 inputs): the one the server takes second refused.
    const values = Array.from({ length: 250 }, (_, i) => `input number ${i}`);
    fake.script('gem-embed-billed', {}, { status: 500 }, {});
    await expect(ctx.app.models.embed({ model: 'gem-embed-billed', values, context: { user_id: user.user.id } })).rejects.toThrow(/Upstream 500 error/);
    expect(fake.log.map((r) => r.reply).sort()).toEqual([200, 200, 500]);
    const answeredTokens = fake.log
      .filter((r) => r.reply === 200)
      .reduce((n, r) => n + Math.ceil(estimateTextTokens((r.body.requests as { content: { parts: { text: string }[] } }[]).map((one) => one.content.parts[0]!.text).join(''))), 0);
    const row = await expectChargedOnce(user, answeredTokens * 37);
    expect(row).toMatchObject({ operation: 'embed', status: 'error', estimated: true, input_tokens: answeredTokens });
  });

  it('an embeddings call, in one request or several, one answering another number of vectors than its inputs, pays for the usage each request reported: a 502 naming its inputs', async () => {
    const priced = await api('POST', '/models', admin, { id: 'fake-embed-miscounted', provider: 'fake', capabilities: ['embedding'], pricing: { input_cost_per_million_tokens: '3.7', output_cost_per_million_tokens: '0' } });
    expect(priced.statusCode, priced.body).toBe(200);
    const answer = (count: number, tokens: number) => ({
      rawBody: JSON.stringify({ object: 'list', data: Array.from({ length: count }, (_, index) => ({ object: 'embedding', index, embedding: [index, 1] })), usage: { prompt_tokens: tokens } }),
    });
    const calls = [
      // One request of its own (3 inputs) answered with two vectors: charged what it reported, as one answered in full is.
      { inputs: 3, replies: [answer(2, 7)], tokens: 7, message: 'Model fake-embed-miscounted answered 2 vectors for 3 inputs' },
      // Two requests (2,048 inputs and 3): the second answered with two vectors.
      { inputs: 2051, replies: [answer(2048, 5), answer(2, 1)], tokens: 5 + 1, message: "Model fake-embed-miscounted answered 2 vectors for 3 inputs (inputs 2049 to 2051 of the call's 2051, sent in several requests)" },
    ];
    for (const { inputs, replies, tokens, message } of calls) {
      const user = await createUser(ctx.app);
      await grant(user, '1');
      fake.script('fake-embed-miscounted', ...replies);
      const values = Array.from({ length: inputs }, (_, i) => `t${i}`);
      const failure = ctx.app.models.embed({ model: 'fake-embed-miscounted', values, context: { user_id: user.user.id } });
      await expect(failure).rejects.toMatchObject({ statusCode: 502, message });
      const row = await expectChargedOnce(user, tokens * 37);
      expect(row).toMatchObject({ operation: 'embed', status: 'error', estimated: false, input_tokens: tokens });
    }
  });

  it('a call whose provider reports no usage is charged from an estimate, its usage record marked estimated', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100');
    // 4 characters a token: 3 output tokens = 3 credits (input is free on fake-billed).
    fake.script('fake-billed', { text: 'twelve chars', usage: null }, { chunks: ['twelve', ' chars'], usage: null });
    expect((await ctx.app.models.chat(billed(user))).cost).toBe('3');
    const stream = ctx.app.models.stream(billed(user));
    for await (const _ of stream);
    expect((await stream.result).cost).toBe('3');
    expect(await balanceOf(user)).toMatchObject({ balance: '94', reserved: '0' });
    const rows = await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, user.user.id));
    expect(rows.map((r) => [r.operation, r.output_tokens, r.estimated, Number(r.cost)]).sort()).toEqual([
      ['chat', 3, true, 3],
      ['stream', 3, true, 3],
    ]);
    await expectConsistent(user);
  });

  it('a caller gone while its call is being reserved: stopped before the upstream, settled as aborted, nothing held or charged', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100');
    const controller = new AbortController();
    let call: Promise<unknown> | undefined;
    // A busy database: the call's hold waits for this transaction's lock on the account's row.
    await transaction(ctx.database.db, async (tx) => {
      await tx.execute(sql`select 1 from credit_accounts where user_id = ${user.user.id} for update`);
      call = ctx.app.models.chat(billed(user, { signal: controller.signal })).catch((e: unknown) => e);
      await new Promise((r) => setTimeout(r, 100));
      controller.abort();
    });
    expect(await call).toBeInstanceOf(ModelCallAbortedError);
    expect(fake.log).toHaveLength(0);
    // The caller was answered at once; its hold, made once the lock went, is ended after it.
    const recorded = () => ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, user.user.id));
    await eventually(async () => (await ctx.app.meter.idle(), (await recorded()).length > 0));
    expect(await balanceOf(user)).toMatchObject({ balance: '100', reserved: '0' });
    expect((await recorded()).map((r) => [r.status, r.attempts, Number(r.cost)])).toEqual([['aborted', 0, 0]]);
    await expectConsistent(user);
  });

  it('a call sent as soon as the last one answered is not refused for the hold of that call, whose settlement was still to be written', async () => {
    // 15 credits: each call holds 10 and costs 5 (the fake's 5 completion tokens). The second
    // reaches its hold before the first's settlement has run (it waits for the next check phase).
    const user = await createUser(ctx.app);
    await grant(user, '15');
    await ctx.app.models.chat(billed(user));
    await ctx.app.models.chat(billed(user));
    expect(fake.log).toHaveLength(2);
    expect(await balanceOf(user)).toMatchObject({ balance: '5', reserved: '0' });
    await expectConsistent(user);
    // And the same through a key's budget, which holds per call (no credit window).
    const rich = await createUser(ctx.app);
    await grant(rich, '1000');
    const key = await createKey(ctx.app, rich, { name: 'budget', max_budget: '15' });
    const context = { user_id: rich.user.id, api_key_id: key.id };
    await ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 10 }));
    await ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 10 }));
    expect(fake.log).toHaveLength(4);
    await ctx.app.meter.idle();
    expect((await api('GET', `/api-keys/${key.id}`, rich.headers)).json()).toMatchObject({ spent: '10', max_budget: '15' });
    await expectConsistent(rich);
  });

  it("such a call waits only for the settlements it needs, not for other accounts' calls ending meanwhile", async () => {
    // Per-call holds (no credit windows); each settlement statement slowed to 20 ms; another
    // account's calls end without pause for 3 s. A's second call (sent as its first answered) must
    // not wait until they stop: it waits for the statement that settles A's first.
    const app = await buildTestApp(ctx.database, { BILLING_ENABLED: 'true', BILLING_CREDIT_WINDOW_CALLS: '0', USAGE_FLUSH_INTERVAL_MS: '20' });
    try {
      const [a, b] = [await createUser(app), await createUser(app)];
      await grant(a, '15');
      await grant(b, '1000000');
      const estimate = (user: TestUser): CostEstimate => ({ operation: 'chat', model: 'm', provider: 'p', input_tokens: 0, max_output_tokens: 10, cost: '10', context: { user_id: user.user.id } });
      const record = (user: TestUser, cost: string): UsageRecord => usageRecordOf(estimate(user), cost);
      let loadOver = false;
      let answeredUnderLoad: boolean | undefined;
      await intercepting(
        ctx.database.db,
        async (text) => {
          if (/delete from credit_reservations/i.test(text)) await sleep(20);
        },
        async () => {
          const others = Array.from({ length: 8 }, async () => {
            while (!loadOver) {
              void (await app.meter.reserve(estimate(b))).settle(record(b, '1'));
              await sleep(5);
            }
          });
          const over = sleep(3_000).then(() => (loadOver = true));
          await sleep(200);
          void (await app.meter.reserve(estimate(a))).settle(record(a, '5'));
          const second = await app.meter.reserve(estimate(a));
          answeredUnderLoad = !loadOver;
          void second.settle(record(a, '5'));
          await over;
          await Promise.all(others);
        },
      );
      expect(answeredUnderLoad).toBe(true);
      await app.meter.idle();
      await expectConsistent(a);
      expect(Number((await getBalance(ctx.database.db, a.user.id)).balance)).toBe(5);
    } finally {
      await app.close();
    }
  });

  it('50 concurrent calls against a balance that covers 10 never overdraw', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100');
    fake.defaultReply = { text: 'ten tokens', usage: { prompt_tokens: 1, completion_tokens: 10 }, chunkDelayMs: 5 };
    try {
      const outcomes = await Promise.allSettled(Array.from({ length: 50 }, () => ctx.app.models.chat(billed(user))));
      const ok = outcomes.filter((o) => o.status === 'fulfilled');
      const refused = outcomes.filter((o): o is PromiseRejectedResult => o.status === 'rejected');
      expect(ok).toHaveLength(10);
      expect(refused.every((o) => o.reason instanceof PaymentRequiredError)).toBe(true);
      expect(fake.log).toHaveLength(10);
    } finally {
      fake.defaultReply = { text: 'Hello from the fake model.', usage: { prompt_tokens: 10, completion_tokens: 5 } };
    }
    expect(await balanceOf(user)).toMatchObject({ balance: '0', reserved: '0' });
    const usage = (await api('GET', '/billing/transactions?limit=100', user.headers)).json<ListBody<TransactionBody>>();
    expect(usage.data.filter((t) => t.type === 'usage')).toHaveLength(10);
    expect(usage.data.every((t) => !t.balance_after.startsWith('-'))).toBe(true);
    await expectConsistent(user);
  });

  it('settles many calls in one statement: each reservation released, one ledger entry per call, balances chained', async () => {
    const [first, second] = [await createUser(ctx.app), await createUser(ctx.app)];
    await grant(first, '100');
    await grant(second, '50');
    const db = ctx.database.db;
    const held = async (user: TestUser, amount: string) => {
      const id = randomUUID();
      expect(await hold(db, { id, userId: user.user.id, apiKeyId: null, accountAmount: amount, keyAmount: null, ttlSeconds: 60 })).toBe('held');
      return id;
    };
    const settlement = (user: TestUser, reservationId: string | null, cost: string) => ({
      reservationId,
      userId: user.user.id,
      apiKeyId: null,
      projectId: null,
      cost,
      chargeAccount: true,
      chargeKey: false,
      usageRecordId: randomUUID(),
      description: `chat ${cost}`,
    });
    const batch = [
      settlement(first, await held(first, '30'), '10'),
      settlement(second, await held(second, '20'), '5'),
      settlement(first, await held(first, '30'), '0'), // free: released, no ledger entry
      settlement(first, await held(first, '30'), '25.5'),
      settlement(second, null, '1'), // nothing held: charged all the same
    ];
    const balance = async (user: TestUser) => {
      const { balance, reserved } = await getBalance(db, user.user.id);
      return [Number(balance), Number(reserved)];
    };
    expect(await balance(first)).toEqual([100, 90]);
    await settleMany(db, batch);
    expect(await balance(first)).toEqual([64.5, 0]);
    expect(await balance(second)).toEqual([44, 0]);
    const ledger = async (user: TestUser) => {
      const list = (await api('GET', '/billing/transactions?limit=100', user.headers)).json<ListBody<TransactionBody>>();
      return list.data.filter((t) => t.type === 'usage');
    };
    const byDescription = (list: TransactionBody[]): Record<string, string[]> => Object.fromEntries(list.map((t) => [t.description ?? '', [t.amount, t.balance_after]]));
    expect(byDescription(await ledger(first))).toEqual({ 'chat 10': ['-10', '90'], 'chat 25.5': ['-25.5', '64.5'] });
    expect(byDescription(await ledger(second))).toEqual({ 'chat 5': ['-5', '45'], 'chat 1': ['-1', '44'] });
    await expectConsistent(first);
    await expectConsistent(second);
  });

  it('calls ending together are settled correctly: every ledger entry one balance apart, nothing held', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '200');
    fake.defaultReply = { text: 'ten tokens', usage: { prompt_tokens: 1, completion_tokens: 10 } };
    try {
      await Promise.all(Array.from({ length: 20 }, () => ctx.app.models.chat(billed(user))));
    } finally {
      fake.defaultReply = { text: 'Hello from the fake model.', usage: { prompt_tokens: 10, completion_tokens: 5 } };
    }
    expect(await balanceOf(user)).toMatchObject({ balance: '0', reserved: '0' });
    const usage = (await api('GET', '/billing/transactions?limit=100', user.headers)).json<ListBody<TransactionBody>>().data.filter((t) => t.type === 'usage');
    expect(usage.map((t) => Number(t.balance_after)).sort((a, b) => b - a)).toEqual(Array.from({ length: 20 }, (_, i) => 190 - 10 * i));
    await expectConsistent(user);
  });

  it('a reservation left by a crashed process expires and is released (by the sweep, and at start)', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '10');
    const db = ctx.database.db;
    const hold = async (expires: string) => {
      await db.execute(sql`update credit_accounts set reserved = reserved + 4 where user_id = ${user.user.id}`);
      await db.insert(creditReservations).values({ user_id: user.user.id, account_amount: '4', key_amount: '0', expires_at: sql`now() + ${sql.raw(expires)}` });
    };
    await hold("interval '-1 second'");
    await hold("interval '1 hour'"); // a live call elsewhere: kept
    expect(await balanceOf(user)).toMatchObject({ reserved: '8', available: '2' });
    await expect(ctx.app.models.chat(billed(user))).rejects.toBeInstanceOf(PaymentRequiredError);
    expect(await ctx.app.meter.sweep()).toBe(1);
    expect(await balanceOf(user)).toMatchObject({ balance: '10', reserved: '4', available: '6' });

    // A process starting up sweeps too.
    await db.execute(sql`update credit_reservations set expires_at = now() - interval '1 second' where user_id = ${user.user.id}`);
    const restarted = await buildTestApp(ctx.database, { BILLING_ENABLED: 'true' });
    await restarted.meter.idle();
    await restarted.close();
    await expectConsistent(user);
    expect((await balanceOf(user)).balance).toBe('10');
  });

  it('at start, embedded, every reservation is a dead process\'s and is released at once; scaled, an unexpired one is another node\'s and kept', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '10');
    const db = ctx.database.db;
    // No hold of this process's own meter is left (other tests' blocks): what is released is the row below.
    await ctx.app.meter.idle();
    await db.execute(sql`update credit_accounts set reserved = reserved + 4 where user_id = ${user.user.id}`);
    await db.insert(creditReservations).values({ user_id: user.user.id, account_amount: '4', key_amount: '0', expires_at: sql`now() + interval '1 hour'` });
    const logs = captureLogs();
    const released = await releaseHoldsLeftBehind(ctx.database, logs.logger);
    if (ctx.database.kind === 'pglite') {
      expect(released).toBe(1);
      expect(await balanceOf(user)).toMatchObject({ balance: '10', reserved: '0', available: '10' });
      expect(logs.lines()).toContainEqual(expect.objectContaining({ level: LEVEL.warn, released: 1, msg: 'credit reservations of an earlier process released at start (embedded: it ended mid-call)' }));
    } else {
      expect(released).toBe(0);
      expect(await balanceOf(user)).toMatchObject({ balance: '10', reserved: '4', available: '6' });
      expect(await db.select().from(creditReservations).where(eq(creditReservations.user_id, user.user.id))).toHaveLength(1);
      await db.execute(sql`update credit_reservations set expires_at = now() - interval '1 second' where user_id = ${user.user.id}`);
      await ctx.app.meter.sweep();
    }
    await expectConsistent(user);
  });

  it('balances read together are one statement (every run start reads one), each user its own', async () => {
    const [rich, poor] = [await createUser(ctx.app), await createUser(ctx.app)];
    await grant(rich, '7');
    const query = vi.spyOn((ctx.database.db as unknown as { $client: { query: (...args: unknown[]) => unknown } }).$client, 'query');
    try {
      const read = await Promise.all([getBalance(ctx.database.db, rich.user.id), getBalance(ctx.database.db, poor.user.id)]);
      expect(read).toEqual([
        { balance: '7.000000000000', reserved: '0.000000000000' },
        { balance: '0', reserved: '0' },
      ]);
      expect(query.mock.calls.filter(([text]) => String((text as { text?: string }).text ?? text).includes('credit_accounts'))).toHaveLength(1);
    } finally {
      query.mockRestore();
    }
  });

  it('a user deleted with credits takes the account and ledger along', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1');
    expect((await api('DELETE', `/users/${user.user.id}`, admin)).statusCode).toBe(200);
    expect(await getBalance(ctx.database.db, user.user.id)).toEqual({ balance: '0', reserved: '0' });
  });
});

describe('per-API-key limits', () => {
  it('creates and updates keys with max_budget and rpm; 422 for bad values', async () => {
    const user = await createUser(ctx.app);
    const key = await createKey(ctx.app, user, { name: 'limited', max_budget: '12.50', rpm: 30 });
    expect(key).toMatchObject({ max_budget: '12.5', rpm: 30, spent: '0' });
    const updated = await api('PATCH', `/api-keys/${key.id}`, user.headers, { max_budget: null, rpm: 5 });
    expect(updated.json()).toMatchObject({ max_budget: null, rpm: 5 });
    expectValidationError(await api('POST', '/api-keys', user.headers, { name: 'x', max_budget: '-1' }), ['body', 'max_budget']);
    expectValidationError(await api('POST', '/api-keys', user.headers, { name: 'x', max_budget: '0' }), ['body', 'max_budget']);
    expectValidationError(await api('POST', '/api-keys', user.headers, { name: 'x', max_budget: 3 }), ['body', 'max_budget']);
    expectValidationError(await api('PATCH', `/api-keys/${key.id}`, user.headers, { rpm: 0 }), ['body', 'rpm']);
    expectValidationError(await api('PATCH', `/api-keys/${key.id}`, user.headers, { rpm: 1.5 }), ['body', 'rpm']);
    // The document says what a limit does, and shows a budget's pattern without the sign it refuses.
    type Property = { pattern?: string; description?: string; anyOf?: Property[] };
    const document = (await ctx.app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).json<{ components: { schemas: Record<string, { properties: Record<string, Property> }> } }>();
    for (const schema of ['ApiKeyCreate', 'ApiKeyUpdate']) {
      const { max_budget: budget, rpm } = document.components.schemas[schema]!.properties;
      expect(budget!.description).toMatch(/402/);
      expect(rpm!.description).toMatch(/429/);
      const pattern = budget!.pattern ?? budget!.anyOf?.find((p) => p.pattern)?.pattern;
      expect(pattern).toBeDefined();
      expect(new RegExp(pattern!).test('-1')).toBe(false);
    }
  });

  it('max_budget: a call the key’s remaining budget cannot cover answers 402 naming the limit', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    const key = await createKey(ctx.app, user, { name: 'budget', max_budget: '15' });
    const context = { user_id: user.user.id, api_key_id: key.id };
    fake.script('fake-billed', { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 10 } });
    await ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 10 }));
    await ctx.app.meter.idle();
    const refused = ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 10 }));
    await expect(refused).rejects.toBeInstanceOf(PaymentRequiredError);
    await expect(refused).rejects.toThrow('API key budget exceeded: max_budget 15, spent 10; this call to fake-billed needs up to 10');
    expect(fake.log).toHaveLength(1);
    expect((await api('GET', `/api-keys/${key.id}`, user.headers)).json()).toMatchObject({ spent: '10', max_budget: '15' });
    // The account paid for the one call; raising the cap lets the next through.
    expect((await balanceOf(user)).balance).toBe('990');
    await api('PATCH', `/api-keys/${key.id}`, user.headers, { max_budget: '25' });
    await ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 10 }));
    await expectConsistent(user);
    const [row] = await ctx.database.db.execute(sql`select budget_reserved::text as r from api_keys where id = ${key.id}`).then((r) => (r as { rows: { r: string }[] }).rows);
    expect(Number(row!.r)).toBe(0);
  });

  it('max_budget: waves of concurrent calls on one budgeted key all go through, and the key and account add up', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '100000');
    const key = await createKey(ctx.app, user, { name: 'busy budget', max_budget: '100000' });
    const context = { user_id: user.user.id, api_key_id: key.id };
    fake.defaultReply = { text: 'ten tokens', usage: { prompt_tokens: 1, completion_tokens: 10 }, chunkDelayMs: 5 };
    try {
      // Holds lock the account and the key; settlements (and the sweep) too: in one order, or
      // PostgreSQL finds deadlocks (6 of 64 calls failed so, each after a second's wait).
      for (let wave = 0; wave < 2; wave++) {
        const outcomes = await Promise.allSettled(Array.from({ length: 32 }, () => ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 10 }))));
        expect(outcomes.filter((o) => o.status === 'rejected').map((o) => String(o.reason))).toEqual([]);
      }
    } finally {
      fake.defaultReply = { text: 'Hello from the fake model.', usage: { prompt_tokens: 10, completion_tokens: 5 } };
    }
    await ctx.app.meter.idle();
    expect(await balanceOf(user)).toMatchObject({ balance: String(100000 - 64 * 10), reserved: '0' });
    expect((await api('GET', `/api-keys/${key.id}`, user.headers)).json()).toMatchObject({ spent: '640' });
    await expectConsistent(user);
  });

  it('rpm: calls beyond the key’s limit in a minute answer 429 with retry-after, naming the limit', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    const key = await createKey(ctx.app, user, { name: 'rpm', rpm: 2 });
    const context = { user_id: user.user.id, api_key_id: key.id };
    await ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 1 }));
    await ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 1 }));
    const refused = await ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 1 })).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(TooManyRequestsError);
    const error = refused as TooManyRequestsError;
    expect(error.statusCode).toBe(429);
    expect(error.detail).toMatch(/^API key rate limit reached: rpm 2 \(model calls per minute\)/);
    expect(Number(error.headers['retry-after'])).toBeGreaterThanOrEqual(1);
    expect(Number(error.headers['retry-after'])).toBeLessThanOrEqual(60);
    expect(fake.log).toHaveLength(2);
    // Another key of the same user is not limited by it.
    const other = await createKey(ctx.app, user, { name: 'other' });
    await ctx.app.models.chat(chatRequest('fake-billed', { user_id: user.user.id, api_key_id: other.id }, { maxOutputTokens: 1 }));
    await expectConsistent(user);
  });

  it('a call naming a key deleted since (no limits left) is paid by the account: its hold names no key', async () => {
    const user = await createUser(ctx.app);
    // Less than a credit window's block of such calls: each call holds its own amount.
    await grant(user, '15');
    const key = await createKey(ctx.app, user, { name: 'deleted', max_budget: '100' });
    expect((await api('DELETE', `/api-keys/${key.id}`, user.headers)).statusCode).toBe(200);
    await ctx.app.models.chat(chatRequest('fake-billed', { user_id: user.user.id, api_key_id: key.id }, { maxOutputTokens: 10 }));
    await ctx.app.meter.idle();
    expect((await balanceOf(user)).balance).toBe('10');
    const [record] = await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, user.user.id));
    expect(record).toMatchObject({ api_key_id: key.id, cost: '5.000000000000', status: 'success' });
    await expectConsistent(user);
  });

  it.each([
    { account: 'never granted (no ledger entry)', granted: null },
    { account: 'granted 100', granted: '100' },
  ])('a call that held nothing (a free estimate) and cost something, on a budgeted key, account $account: settlements retried after lost replies, alone and batched, move the key\'s spent and the balance once', async ({ granted }) => {
    // The settlement charges the key and the account. An account never granted has no row: no
    // ledger entry then tells a retry that the settlement committed, yet the key's spend must move
    // once per call. With a row, the entry is there, and the balance moves once too.
    const user = await createUser(ctx.app);
    if (granted !== null) await grant(user, granted);
    const key = await createKey(ctx.app, user, { name: 'budget, free estimate', max_budget: '1000' });
    const context = { user_id: user.user.id, api_key_id: key.id };
    const estimate: CostEstimate = { operation: 'chat', model: 'm', provider: 'p', input_tokens: 0, max_output_tokens: 10, cost: '0', context };
    const record = (): UsageRecord => usageRecordOf(estimate, '5');
    const calls = async (n: number) => {
      const held = await Promise.all(Array.from({ length: n }, async () => ctx.app.meter.reserve(estimate)));
      expect(held.map((r) => r.holdsOutput)).toEqual(held.map(() => false));
      for (const reservation of held) void reservation.settle(record());
    };
    let losing = false;
    let lost = 0;
    let batched = 0;
    const settledTwice = async (n: number) => {
      losing = true;
      await intercepting(
        ctx.database.db,
        (text, params) => {
          // The key's settlements (they release its hold, if any): each commits and its reply is lost, retries too, while `losing`.
          if (losing && /delete from credit_reservations/.test(text) && JSON.stringify(params).includes(key.id)) {
            lost += 1;
            if (/with ordinality/.test(text)) batched += 1;
            throw new Error('connection lost after the commit');
          }
        },
        async () => {
          await calls(n);
          await ctx.app.meter.idle(); // the retries are lost too
          losing = false;
          await ctx.app.meter.idle(); // the next retries go through
        },
        true,
      );
    };
    const state = async () => {
      const spend = await keySpend(ctx.database.db, key.id);
      const [counts] = await queryRows<{ accounts: number; balance: string | null; usageEntries: number; records: number }>(
        ctx.database.db,
        sql`select (select count(*) from credit_accounts where user_id = ${user.user.id})::int as accounts,
              (select balance::text from credit_accounts where user_id = ${user.user.id}) as balance,
              (select count(*) from credit_transactions where owner_id = ${user.user.id} and type = 'usage')::int as "usageEntries",
              (select count(distinct id) from usage_records where owner_id = ${user.user.id})::int as records`,
      );
      return { spent: Number(spend.spent), reserved: Number(spend.reserved), ...counts, balance: counts!.balance === null ? null : Number(counts!.balance) };
    };
    const expected = (calls: number) =>
      granted === null
        ? { spent: 5 * calls, reserved: 0, accounts: 0, balance: null, usageEntries: 0, records: calls }
        : { spent: 5 * calls, reserved: 0, accounts: 1, balance: Number(granted) - 5 * calls, usageEntries: calls, records: calls };
    await settledTwice(1); // alone: `settle`, and retried alone
    expect(lost).toBeGreaterThanOrEqual(2);
    expect(await state()).toEqual(expected(1));
    lost = 0;
    await settledTwice(5); // the first alone, the others together (`settleMany`), all retried together
    expect(lost).toBeGreaterThanOrEqual(3);
    expect(batched).toBeGreaterThanOrEqual(1);
    expect(await state()).toEqual(expected(6));
    if (granted !== null) await expectConsistent(user);
  });

  it('rpm: a call counts once, whatever fallbacks it tries', async () => {
    const user = await createUser(ctx.app);
    await grant(user, '1000');
    const flaky = await api('POST', '/models', admin, { id: 'fake-billed-flaky', provider: 'fake', pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '1000000' }, fallbacks: ['fake-billed'] });
    expect(flaky.statusCode, flaky.body).toBe(200);
    const key = await createKey(ctx.app, user, { name: 'rpm one', rpm: 1 });
    const context = { user_id: user.user.id, api_key_id: key.id };
    fake.script('fake-billed-flaky', { status: 500 });
    const answered = await ctx.app.models.chat(chatRequest('fake-billed-flaky', context, { maxOutputTokens: 1 }));
    expect(answered.model).toBe('fake-billed');
    expect(fake.log.map((r) => r.model)).toEqual(['fake-billed-flaky', 'fake-billed']);
    // That was the minute's one call: the next is refused, before any upstream request.
    await expect(ctx.app.models.chat(chatRequest('fake-billed-flaky', context, { maxOutputTokens: 1 }))).rejects.toBeInstanceOf(TooManyRequestsError);
    expect(fake.log).toHaveLength(2);
    await expectConsistent(user);
  });
});

describe('knowledge-base ingestion through an API key', () => {
  // Where pgvector is missing (this machine's PostgreSQL) ingestion embeds nothing: nothing to meter.
  const withVectors = () => ctx.database.kind === 'pglite';
  const DOCUMENT = {
    filename: 'lights.md',
    content: [
      'Lighthouses guide ships along rocky coasts at night.',
      'Keepers once trimmed the lamp wicks every few hours.',
      'Modern lights run automatically on solar power.',
      'Fog horns warn vessels when the beam cannot be seen.',
      'Seals rest on sandbanks below the tower at low tide.',
    ]
      .map((s, i) => `# Part ${i}\n\n${s}`)
      .join('\n\n'),
  };

  /** A user with credits, a project, a folder in it and a project-scoped key with `limits`. */
  async function scopedSetup(limits: Record<string, unknown>) {
    const user = await createUser(ctx.app);
    await grant(user, '10');
    const project = await createProject(ctx.app, user.headers);
    const folder = await createFolder(ctx.app, user.headers, { name: 'Docs', project_id: project.id });
    const key = await createKey(ctx.app, user, { name: 'ingesting', project_id: project.id, ...limits });
    return { user, project, folder, key };
  }

  /** The embedding calls' usage rows of `user`, oldest first. */
  async function embeddings(user: TestUser) {
    await ctx.app.meter.idle();
    const rows = await ctx.database.db.select().from(usageRecords).where(and(eq(usageRecords.owner_id, user.user.id), eq(usageRecords.operation, 'embed')));
    return rows.sort((a, b) => a.started_at.getTime() - b.started_at.getTime());
  }

  const costOf = (rows: { cost: string }[]) => addCosts('0', ...rows.map((r) => r.cost));

  async function keyOf(user: TestUser, id: string) {
    await ctx.app.meter.idle();
    return (await api('GET', `/api-keys/${id}`, user.headers)).json<{ spent: string; max_budget: string | null }>();
  }

  /** Files under the user's part of the knowledge-base storage (local backend). */
  function storedFiles(user: TestUser): string[] {
    const dir = join(ctx.app.settings.dataDir, 'storage', 'knowledge-base', user.user.id);
    if (!existsSync(dir)) return [];
    return readdirSync(dir, { recursive: true, encoding: 'utf8' }).filter((name) => statSync(join(dir, name)).isFile());
  }

  /** Spends `amount` (whole credits) of the key's budget and the account's balance with one chat call through it. */
  async function spend(user: TestUser, keyId: string, amount: number) {
    fake.script('fake-billed', { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: amount } });
    await ctx.app.models.chat(chatRequest('fake-billed', { user_id: user.user.id, api_key_id: keyId }, { maxOutputTokens: amount }));
    await ctx.app.meter.idle();
  }

  /** Takes the whole balance back (an adjustment): the account is left at 0. */
  async function drain(user: TestUser) {
    const { balance } = await balanceOf(user);
    await grant(user, `-${balance}`, { type: 'adjustment' });
    expect((await balanceOf(user)).available).toBe('0');
  }

  /**
   * An upload whose form stops after the file's first bytes and never ends (Content-Length says
   * more): only an answer given before the file is read can end it.
   */
  function unfinishedUpload(headers: Record<string, string>, folderId: string) {
    const { body, contentType } = multipartBody([DOCUMENT]);
    let pushed = false;
    const payload = new Readable({
      read() {
        if (pushed) return;
        pushed = true;
        this.push(body.subarray(0, body.indexOf('Lighthouses')));
      },
    });
    return ctx.app.inject({
      method: 'POST',
      url: `/api/v1/knowledge-base/folders/${folderId}/upload`,
      headers: { ...headers, 'content-type': contentType, 'content-length': String(body.length) },
      payload,
    });
  }

  async function entriesOf(user: TestUser) {
    return (await api('GET', '/knowledge-base/entries', user.headers)).json<ListBody<EntryBody>>();
  }

  it('an upload through a key whose max_budget is used up answers 402 naming it, before the file is read: no entry, nothing stored, nothing embedded', async () => {
    const { user, folder, key } = await scopedSetup({ max_budget: '5' });
    await grant(user, '100');
    await spend(user, key.id, 5);
    fake.reset();
    if (!withVectors()) {
      // Nothing would be embedded (no pgvector), so nothing to pay: taken as before.
      await uploaded(ctx.app, xApiKey(key.key), folder.id, DOCUMENT);
      return;
    }
    const response = await unfinishedUpload(xApiKey(key.key), folder.id);
    expect(response.statusCode, response.body).toBe(402);
    expect(response.json()).toEqual({ detail: 'API key budget exceeded: max_budget 5, spent 5; nothing is left to embed this document with fake-embed' });
    // The same for a whole form.
    expect((await upload(ctx.app, xApiKey(key.key), folder.id, DOCUMENT)).statusCode).toBe(402);
    expect((await entriesOf(user)).count).toBe(0);
    expect(storedFiles(user)).toEqual([]);
    expect(fake.requestsFor('fake-embed')).toHaveLength(0);
    // Nothing held, nothing charged by the refusal.
    expect((await keyOf(user, key.id)).spent).toBe('5');
    await expectConsistent(user);
  });

  it('with billing on, an upload for an account with no credits available answers 402 naming the balance, storing nothing', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    if (!withVectors()) {
      await uploaded(ctx.app, user.headers, folder.id, DOCUMENT);
      return;
    }
    const response = await upload(ctx.app, user.headers, folder.id, DOCUMENT);
    expect(response.statusCode, response.body).toBe(402);
    expect(response.json()).toEqual({ detail: 'Not enough credits: balance 0, available 0; nothing is left to embed this document with fake-embed' });
    // Through a key with budget to spare: the account is still empty.
    const key = await createKey(ctx.app, user, { name: 'budgeted', max_budget: '10' });
    expect((await upload(ctx.app, xApiKey(key.key), folder.id, DOCUMENT)).json()).toEqual(response.json());
    expect((await entriesOf(user)).count).toBe(0);
    expect(storedFiles(user)).toEqual([]);
  });

  it('a reindex that cannot be paid answers 402 the same (the key: its max_budget; the signed-in user: the balance), leaving the entry as it was', async () => {
    const { user, folder, key } = await scopedSetup({ max_budget: '5' });
    const entry = await ingested(ctx.app, xApiKey(key.key), folder.id, DOCUMENT);
    await grant(user, '100');
    await spend(user, key.id, 4);
    // The key's cap lowered to what it has spent (the document's embeddings and the call).
    const { spent } = await keyOf(user, key.id);
    expect((await api('PATCH', `/api-keys/${key.id}`, user.headers, { max_budget: spent })).statusCode).toBe(200);
    const reindex = (headers: Record<string, string>) => api('POST', `/knowledge-base/entries/${entry.id}/reindex`, headers);
    if (!withVectors()) {
      expect((await reindex(xApiKey(key.key))).statusCode).toBe(202);
      return;
    }
    fake.reset();
    const byKey = await reindex(xApiKey(key.key));
    expect(byKey.statusCode, byKey.body).toBe(402);
    expect(byKey.json<{ detail: string }>().detail).toBe(`API key budget exceeded: max_budget ${spent}, spent ${spent}; nothing is left to embed this document with fake-embed`);
    await drain(user);
    const byUser = await reindex(user.headers);
    expect(byUser.statusCode, byUser.body).toBe(402);
    expect(byUser.json<{ detail: string }>().detail).toBe('Not enough credits: balance 0, available 0; nothing is left to embed this document with fake-embed');
    // An entry the caller cannot see is still 404, not 402.
    const stranger = await createUser(ctx.app);
    expect((await reindex(stranger.headers)).statusCode).toBe(404);
    await sleep(50);
    expect((await api('GET', `/knowledge-base/entries/${entry.id}`, user.headers)).json()).toMatchObject({ status: 'ready', chunk_count: 5, error: null });
    const [row] = await ctx.database.db.execute(sql`select api_key_id from knowledge_entries where id = ${entry.id}`).then((r) => (r as { rows: { api_key_id: string | null }[] }).rows);
    expect(row!.api_key_id).toBe(key.id);
    expect(fake.requestsFor('fake-embed')).toHaveLength(0);
  });

  it('a key with budget left, on an account with credits left, uploads and reindexes as before (only that something is left is checked)', async () => {
    const { user, folder, key } = await scopedSetup({ max_budget: '5' });
    await grant(user, '100');
    await spend(user, key.id, 4);
    const entry = await ingested(ctx.app, xApiKey(key.key), folder.id, DOCUMENT);
    const response = await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, xApiKey(key.key));
    expect(response.statusCode, response.body).toBe(202);
    expect(await settled(ctx.app, user.headers, entry.id)).toMatchObject({ status: 'ready', chunk_count: 5 });
    await expectConsistent(user);
  });

  it("a project-scoped key's upload is embedded against its max_budget: the key's spent grows by the cost, the usage records and the summary name it", async () => {
    const { user, project, folder, key } = await scopedSetup({ max_budget: '1' });
    const entry = await ingested(ctx.app, xApiKey(key.key), folder.id, DOCUMENT);
    expect(entry.chunk_count).toBe(5);
    if (!withVectors()) return;
    const rows = await embeddings(user);
    // KB_EMBED_BATCH=2: 5 chunks in 3 calls, each the key's.
    expect(rows.map((r) => [r.api_key_id, r.project_id, r.status])).toEqual(Array.from({ length: 3 }, () => [key.id, project.id, 'success']));
    const cost = costOf(rows);
    expect(Number(cost)).toBeGreaterThan(0);
    expect(Number((await keyOf(user, key.id)).spent)).toBe(Number(cost));
    // The account paid the same, through the key's ledger entries.
    expect(Number((await balanceOf(user)).balance)).toBe(Number(addCosts('10', `-${cost}`)));
    const summary = (await api('GET', '/billing/summary?group_by=api_key', user.headers)).json<{ data: { api_key_id: string | null; calls: number; cost: string }[] }>();
    expect(summary.data.map((d) => [d.api_key_id, d.calls, Number(d.cost)])).toEqual([[key.id, 3, Number(cost)]]);
    await expectConsistent(user);
  });

  it('a key whose budget cannot cover the embeddings: the entry fails naming the budget, not retried; only the calls held are charged', async () => {
    const { user, folder } = await scopedSetup({});
    // What each call costs, from the same document uploaded by the signed-in user (no key).
    await ingested(ctx.app, user.headers, (await createFolder(ctx.app, user.headers, { name: 'Priced' })).id, DOCUMENT);
    const priced = await embeddings(user);
    if (!withVectors()) return;
    expect(priced.map((r) => r.api_key_id)).toEqual([null, null, null]);
    const [first, second] = priced.map((r) => r.cost);
    // Room for the first call and half the second.
    const budget = addCosts(first!, String(Number(second) / 2));
    const key = await createKey(ctx.app, user, { name: 'small budget', project_id: folder.project_id, max_budget: budget });
    const before = (await balanceOf(user)).balance;
    fake.reset();
    const entry = await settled(ctx.app, xApiKey(key.key), (await uploaded(ctx.app, xApiKey(key.key), folder.id, DOCUMENT)).id);
    expect(entry.status).toBe('failed');
    expect(entry.error).toMatch(/^Embedding stopped: API key budget exceeded: max_budget [\d.]+, spent [\d.]+.*; this call to fake-embed needs up to [\d.]+; reindex the entry once the budget or balance allows it$/);
    expect(entry.chunk_count).toBe(0);
    // The refused call never went upstream, and the 402 was not tried again.
    await sleep(100);
    expect(fake.requestsFor('fake-embed')).toHaveLength(1);
    expect((await api('GET', `/knowledge-base/entries/${entry.id}`, user.headers)).json()).toMatchObject({ status: 'failed' });
    const charged = (await embeddings(user)).filter((r) => r.api_key_id === key.id);
    expect(charged.map((r) => r.status)).toEqual(['success']);
    expect(Number((await keyOf(user, key.id)).spent)).toBe(Number(charged[0]!.cost));
    expect(Number(charged[0]!.cost)).toBeLessThanOrEqual(Number(budget));
    expect(Number((await balanceOf(user)).balance)).toBe(Number(addCosts(before, `-${charged[0]!.cost}`)));
    const [row] = await ctx.database.db.execute(sql`select budget_reserved::text as r from api_keys where id = ${key.id}`).then((r) => (r as { rows: { r: string }[] }).rows);
    expect(Number(row!.r)).toBe(0);
    await expectConsistent(user);
  });

  it('credits running out mid-ingestion (402) fail the entry but keep what was embedded: once credits are granted, a reindex embeds and charges only the missing batches (the ledger as a clean ingestion\'s)', async () => {
    if (!withVectors()) return;
    // A clean ingestion of the same document: what each call costs, and the ledger it leaves.
    const clean = await createUser(ctx.app);
    await grant(clean, '10');
    fake.reset();
    await ingested(ctx.app, clean.headers, (await createFolder(ctx.app, clean.headers)).id, DOCUMENT);
    const cleanCalls = fake.requestsFor('fake-embed').map((r) => r.body.input);
    const cleanCosts = (await embeddings(clean)).map((r) => r.cost);
    expect(cleanCosts).toHaveLength(3);
    const usageOf = async (user: TestUser) =>
      (await api('GET', '/billing/transactions?limit=100', user.headers)).json<ListBody<TransactionBody>>().data.filter((t) => t.type === 'usage').map((t) => t.amount).sort();

    // Credits for the first call and half the second: the second call's hold is refused.
    const user = await createUser(ctx.app);
    await grant(user, addCosts(cleanCosts[0]!, String(Number(cleanCosts[1]) / 2)));
    fake.reset();
    const entry = await settled(ctx.app, user.headers, (await uploaded(ctx.app, user.headers, (await createFolder(ctx.app, user.headers)).id, DOCUMENT)).id);
    expect(entry).toMatchObject({ status: 'failed', chunk_count: 0 });
    expect(entry.error).toMatch(/^Embedding stopped: Not enough credits/);
    expect(fake.requestsFor('fake-embed').map((r) => r.body.input)).toEqual([cleanCalls[0]]);
    // The first call's chunks stay, with their embeddings, and are not searched while the entry is failed.
    const kept = await queryRows<{ chunk_index: number; model: string }>(
      ctx.database.db,
      sql`select c.chunk_index, e.model from knowledge_chunks c join knowledge_chunk_embeddings e on e.chunk_id = c.id where c.entry_id = ${entry.id} order by c.chunk_index`,
    );
    expect(kept).toEqual([
      { chunk_index: 0, model: 'fake-embed' },
      { chunk_index: 1, model: 'fake-embed' },
    ]);
    await grant(user, '10');
    const found = (await api('POST', '/knowledge-base/search', user.headers, { query: 'lighthouses ships keepers' })).json<{ data: unknown[] }>();
    expect(found.data).toEqual([]);

    // Credits granted, the reindex sends (and charges) only the two calls the failed attempt did not make.
    fake.reset();
    expect((await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, user.headers)).statusCode).toBe(202);
    expect(await settled(ctx.app, user.headers, entry.id)).toMatchObject({ status: 'ready', chunk_count: 5, error: null });
    expect(fake.requestsFor('fake-embed').map((r) => r.body.input)).toEqual(cleanCalls.slice(1));
    expect((await embeddings(user)).filter((r) => r.status === 'success').map((r) => r.cost)).toEqual(cleanCosts);
    expect(await usageOf(user)).toEqual(await usageOf(clean));
    expect(Number((await balanceOf(user)).balance)).toBe(Number(addCosts((await balanceOf(clean)).balance, cleanCosts[0]!, String(Number(cleanCosts[1]) / 2))));
    await expectConsistent(user);
  });

  it.each([
    ['revoked', 'the API key that asked for this indexing was revoked', (user: TestUser, keyId: string) => api('PATCH', `/api-keys/${keyId}`, user.headers, { status: 'revoked' })],
    // Deleted, the key has no limits when the call reads them (as the meter does for work no request carries): the account pays, by design.
    ['deleted', null, (user: TestUser, keyId: string) => api('DELETE', `/api-keys/${keyId}`, user.headers)],
    ['deactivated owner', "the owner's account was deactivated", (user: TestUser) => api('PATCH', `/users/${user.user.id}`, admin, { is_active: false })],
  ] as const)(
    'a budgeted key %s while its upload is embedded: the entry fails saying so, not "Could not validate credentials" (deleted: goes on, paid by the account); nothing held',
    async (_way, words, takeAway) => {
      const { user, folder, key } = await scopedSetup({ max_budget: '1' });
      fake.reset();
      // The first call goes through; the key (or its owner) goes away as the second reaches the meter.
      const meter = ctx.app.meter;
      const reserve = meter.reserve.bind(meter);
      let calls = 0;
      meter.reserve = async (estimate) => {
        if (++calls === 2) {
          meter.reserve = reserve;
          const gone = await takeAway(user, key.id);
          expect(gone.statusCode, gone.body).toBe(200);
        }
        return reserve(estimate);
      };
      let entry: EntryBody;
      try {
        const id = (await uploaded(ctx.app, xApiKey(key.key), folder.id, DOCUMENT)).id;
        entry = await settled(ctx.app, admin, id);
      } finally {
        meter.reserve = reserve;
      }
      if (!withVectors()) return;
      expect(calls).toBe(2);
      if (words === null) {
        expect(entry).toMatchObject({ status: 'ready', chunk_count: 5, error: null });
      } else {
        expect(entry).toMatchObject({ status: 'failed', chunk_count: 0, error: `Embedding stopped: ${words}; reindex the entry to index it again` });
        expect(fake.requestsFor('fake-embed')).toHaveLength(1);
      }
      await expectConsistent(user);
    },
  );

  it('a reindex is paid by the key that asks for it (the signed-in user: no key), whoever uploaded', async () => {
    const { user, project, folder, key } = await scopedSetup({ max_budget: '1' });
    const other = await createKey(ctx.app, user, { name: 'reindexing', project_id: project.id, max_budget: '1' });
    const entry = await ingested(ctx.app, xApiKey(key.key), folder.id, DOCUMENT);
    const reindex = async (headers: Record<string, string>) => {
      const response = await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, headers);
      expect(response.statusCode, response.body).toBe(202);
      expect(response.json()).not.toHaveProperty('api_key_id');
      expect(await settled(ctx.app, headers, entry.id)).toMatchObject({ status: 'ready', chunk_count: 5 });
    };
    await reindex(xApiKey(other.key));
    await reindex(user.headers);
    if (!withVectors()) return;
    const rows = await embeddings(user);
    expect(rows.map((r) => r.api_key_id)).toEqual([key.id, key.id, key.id, other.id, other.id, other.id, null, null, null]);
    expect(Number((await keyOf(user, key.id)).spent)).toBe(Number(costOf(rows.slice(0, 3))));
    expect(Number((await keyOf(user, other.id)).spent)).toBe(Number(costOf(rows.slice(3, 6))));
    await expectConsistent(user);
  });

  it("ingestion's embedding calls do not count against the key's rpm (its budget only)", async () => {
    const { user, folder, key } = await scopedSetup({ rpm: 1 });
    await ingested(ctx.app, xApiKey(key.key), folder.id, DOCUMENT);
    if (!withVectors()) return;
    expect((await embeddings(user)).map((r) => r.api_key_id)).toEqual([key.id, key.id, key.id]);
    // The minute's one model call is still the client's; the next is refused.
    const context = { user_id: user.user.id, api_key_id: key.id };
    await ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 1 }));
    await expect(ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 1 }))).rejects.toBeInstanceOf(TooManyRequestsError);
    await expectConsistent(user);
  });

  it('a key deleted while its upload is being embedded: the rest is paid by the account, still recorded under its id', async () => {
    const user = await createUser(ctx.app);
    // Less than a credit window's block of embedding calls: each call holds its own amount.
    await grant(user, '0.00001');
    const folder = await createFolder(ctx.app, user.headers);
    const key = await createKey(ctx.app, user, { name: 'deleted midway', max_budget: '1' });
    // The first call answers late; the key goes meanwhile.
    fake.script('fake-embed', { chunkDelayMs: 300 });
    const entry = await uploaded(ctx.app, xApiKey(key.key), folder.id, DOCUMENT);
    if (withVectors()) await fake.waitFor((log) => log.some((r) => r.model === 'fake-embed'));
    expect((await api('DELETE', `/api-keys/${key.id}`, user.headers)).statusCode).toBe(200);
    const done = await settled(ctx.app, user.headers, entry.id);
    expect(done).toMatchObject({ status: 'ready', error: null, chunk_count: 5 });
    if (!withVectors()) return;
    const rows = await embeddings(user);
    expect(rows.map((r) => [r.api_key_id, r.status])).toEqual(Array.from({ length: 3 }, () => [key.id, 'success']));
    expect(Number((await balanceOf(user)).balance)).toBe(Number(addCosts('0.00001', `-${costOf(rows)}`)));
    await expectConsistent(user);
  });

  it.each([
    ['revoked', (user: TestUser, keyId: string) => api('PATCH', `/api-keys/${keyId}`, user.headers, { status: 'revoked' })],
    ['deleted', (user: TestUser, keyId: string) => api('DELETE', `/api-keys/${keyId}`, user.headers)],
    ['owner deactivated', (user: TestUser) => api('PATCH', `/users/${user.user.id}`, admin, { is_active: false })],
  ] as const)('a search through a key %s before its query embedding is held answers 401, not the passages full text found meanwhile', async (_way, takeAway) => {
    const { user, folder, key } = await scopedSetup({ max_budget: '1' });
    await ingested(ctx.app, xApiKey(key.key), folder.id, DOCUMENT);
    const meter = ctx.app.meter;
    const reserve = meter.reserve.bind(meter);
    let calls = 0;
    // The key (or its owner) goes away after the search was authenticated, as its query embedding reaches the meter.
    meter.reserve = async (estimate) => {
      if (++calls === 1) {
        meter.reserve = reserve;
        const gone = await takeAway(user, key.id);
        expect(gone.statusCode, gone.body).toBe(200);
      }
      return reserve(estimate);
    };
    let response;
    try {
      response = await api('POST', '/knowledge-base/search', xApiKey(key.key), { query: 'lighthouses ships' });
    } finally {
      meter.reserve = reserve;
    }
    // Without pgvector the search embeds nothing: nothing happens between its authentication and its answer.
    if (!withVectors()) return;
    expect(calls).toBe(1);
    expect(response.statusCode, response.body).toBe(401);
    expect(response.json()).toEqual({ detail: 'Could not validate credentials' });
    await expectConsistent(user);
  });

  it('a retry after a passing fault midway embeds (and charges) only the batches not stored yet: each chunk is sent upstream and paid once, and ends with its vector', async () => {
    // What a clean ingestion of the document costs: the same document for another account.
    const clean = await createUser(ctx.app);
    await grant(clean, '10');
    await ingested(ctx.app, clean.headers, (await createFolder(ctx.app, clean.headers)).id, DOCUMENT);
    const user = await createUser(ctx.app);
    await grant(user, '10');
    const folder = await createFolder(ctx.app, user.headers);
    fake.reset();
    // KB_EMBED_BATCH=2, 5 chunks: the first batch goes through, the second meets a 500 (a passing fault): the queue tries again.
    fake.script('fake-embed', {}, { status: 500 });
    const entry = await settled(ctx.app, user.headers, (await uploaded(ctx.app, user.headers, folder.id, DOCUMENT)).id);
    expect(entry).toMatchObject({ status: 'ready', chunk_count: 5, error: null });
    if (!withVectors()) return;
    const chunks = await queryRows<{ chunk_index: number; text: string; vectors: number }>(
      ctx.database.db,
      sql`select c.chunk_index, c.text, count(e.chunk_id)::int as vectors
          from knowledge_chunks c left join knowledge_chunk_embeddings e on e.chunk_id = c.id and e.model = 'fake-embed'
          where c.entry_id = ${entry.id} group by c.id order by c.chunk_index`,
    );
    const texts = chunks.map((c) => c.text);
    expect(texts).toHaveLength(5);
    // Only what was missing went upstream again: the batch that failed and the one never sent.
    expect(fake.requestsFor('fake-embed').map((r) => [r.reply, r.body.input])).toEqual([
      [200, texts.slice(0, 2)],
      [500, texts.slice(2, 4)],
      [200, texts.slice(2, 4)],
      [200, texts.slice(4)],
    ]);
    // Every chunk has one vector by the model, and it is its own text's.
    for (const chunk of chunks) {
      expect(chunk.vectors).toBe(1);
      const [own] = await queryRows<{ d: number }>(
        ctx.database.db,
        sql`select e.embedding <=> ${`[${fakeEmbedding(chunk.text).join(',')}]`}::vector as d from knowledge_chunk_embeddings e join knowledge_chunks c on c.id = e.chunk_id
            where c.entry_id = ${entry.id} and c.chunk_index = ${chunk.chunk_index}`,
      );
      expect(Number(own!.d)).toBeLessThan(1e-6);
    }
    // Charged once: what the clean ingestion cost, in the usage records and the ledger alike.
    const rows = await embeddings(user);
    expect(rows.filter((r) => r.status === 'success')).toHaveLength(3);
    expect(costOf(rows)).toBe(costOf(await embeddings(clean)));
    expect((await balanceOf(user)).balance).toBe((await balanceOf(clean)).balance);
    await expectConsistent(user);
  });
});
