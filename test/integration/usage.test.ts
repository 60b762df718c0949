import { randomUUID } from 'node:crypto';
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { type IncomingMessage, request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { eq, sql } from 'drizzle-orm';
import pino from 'pino';
import { afterAll, beforeAll, beforeEach, describe, expect, inject, it } from 'vitest';

import { openDatabase } from '../../src/core/db.js';
import { ServiceUnavailableError } from '../../src/core/errors.js';

import { usageRecords } from '../../src/models/index.js';

import { insertUsage, keySpend, STRIPPED_USAGE_NOTE as STRIPPED } from '../../src/crud/billing.js';
import { type CostEstimate, type UsageRecord, ZERO_USAGE } from '../../src/modules/ai-models/index.js';
import { startServer } from '../../src/server.js';
import { buildTestApp, openTestDatabase, testSettings, useTestApp } from '../helpers/app.js';
import { createProject, createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey, expectValidationError, xApiKey } from '../helpers/http.js';
import { addFakeModels, chatRequest, FAKE_MODELS, usageRecordOf, usageRowOf } from '../helpers/metered-models.js';
import { intercepting } from '../helpers/statements.js';

// Billing off (the default): usage is recorded, balances are never touched. Answers up to 48 MiB
// (a slow client's stream, below, must be larger than what the sockets between can buffer).
const ctx = useTestApp({ USAGE_FLUSH_INTERVAL_MS: '20', MODEL_MAX_RETRIES: '0', MODEL_MAX_RESPONSE_BYTES: String(48 * 1024 * 1024) });
const api = apiOf(ctx);

let fake: FakeModelServer;
let admin: Record<string, string>;
let alice: TestUser;
let bob: TestUser;

beforeAll(async () => {
  fake = await FakeModelServer.start();
  admin = await superuserHeaders(ctx.app);
  alice = await createUser(ctx.app);
  bob = await createUser(ctx.app);
  await addFakeModels(ctx.app, admin, fake.url);
});
afterAll(async () => {
  await fake.close();
});
beforeEach(() => fake.reset());

async function recordsOf(userId: string) {
  await ctx.app.meter.idle();
  return ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, userId)).orderBy(usageRecords.created_at);
}

const row = usageRowOf;

describe('usage records', () => {
  it('one row per call, after the answer, its cost the catalog price × tokens to the last decimal', async () => {
    const project = await createProject(ctx.app, alice.headers);
    const key = await createKey(ctx.app, alice, { name: 'metered', project_id: project.id });
    const agentId = randomUUID();
    const runId = randomUUID();
    fake.script('fake-precise', { text: 'exact', usage: { prompt_tokens: 1234, completion_tokens: 567, cached_tokens: 1000, reasoning_tokens: 89 } });
    const result = await ctx.app.models.chat(
      chatRequest('fake-precise', { user_id: alice.user.id, api_key_id: key.id, project_id: project.id, agent_id: agentId, run_id: runId }),
    );
    // 234 uncached × 1.23 + 1000 cached × 0.123456 + 478 output × 4.56 + 89 reasoning × 4.56
    // = 287.82 + 123.456 + 2179.68 + 405.84 = 2996.796 per million.
    expect(result.cost).toBe('0.002996796');
    const [record] = await recordsOf(alice.user.id);
    expect(record).toMatchObject({
      owner_id: alice.user.id,
      api_key_id: key.id,
      project_id: project.id,
      agent_id: agentId,
      run_id: runId,
      model: 'fake-precise',
      provider: 'fake',
      operation: 'chat',
      input_tokens: 1234,
      cached_input_tokens: 1000,
      cache_write_tokens: 0,
      output_tokens: 567,
      reasoning_tokens: 89,
      cost: '0.002996796000',
      status: 'success',
      error: null,
      estimated: false,
      attempts: 1,
    });
    expect(record!.latency_ms).toBeGreaterThanOrEqual(0);
    // The key's spend follows the batch; billing off leaves the balance alone.
    const keys = await api('GET', `/api-keys/${key.id}`, alice.headers);
    expect(keys.json()).toMatchObject({ spent: '0.002996796', max_budget: null, rpm: null });
    expect((await api('GET', '/billing/balance', alice.headers)).json()).toEqual({ balance: '0', reserved: '0', available: '0', billing_enabled: false });
    expect((await api('GET', '/billing/transactions', alice.headers)).json()).toEqual({ data: [], count: 0 });
  });

  it('records a failed call (status, error, attempts) and a stream (time to first token), and counts them in /metrics', async () => {
    const carol = await createUser(ctx.app);
    fake.script('fake-precise', { status: 400, body: { error: { message: 'bad request from upstream' } } });
    await expect(ctx.app.models.chat(chatRequest('fake-precise', { user_id: carol.user.id }))).rejects.toThrow('bad request from upstream');
    fake.script('fake-precise', { text: 'one two three', usage: { prompt_tokens: 3, completion_tokens: 3 } });
    const stream = ctx.app.models.stream(chatRequest('fake-precise', { user_id: carol.user.id }));
    for await (const event of stream) void event;
    const records = await recordsOf(carol.user.id);
    expect(records.map((r) => [r.operation, r.status, r.cost])).toEqual([
      ['chat', 'error', '0.000000000000'],
      ['stream', 'success', '0.000017370000'],
    ]);
    expect(records[0]!.error).toContain('bad request from upstream');
    expect(records[1]!.time_to_first_token_ms).not.toBeNull();

    const metrics = await ctx.app.inject({ method: 'GET', url: '/metrics' });
    expect(metrics.body).toMatch(/keel_model_calls_total\{model="fake-precise",provider="fake",operation="chat",status="error"\} [1-9]/);
    expect(metrics.body).toMatch(/keel_model_tokens_total\{model="fake-precise",provider="fake",kind="output"\} [1-9]/);
    expect(metrics.body).toMatch(/keel_model_cost_credits_total\{model="fake-precise",provider="fake"\} 0\.00/);
    expect(metrics.body).toMatch(/keel_model_call_duration_seconds_count\{model="fake-precise",provider="fake",operation="stream",status="success"\} [1-9]/);
    expect(metrics.body).toMatch(/keel_model_time_to_first_token_seconds_count\{model="fake-precise",provider="fake"\} [1-9]/);
  });

  it('a streamed answer through /v1 whose provider reported no usage: the client and the record get the estimate of what streamed', async () => {
    const dave = await createUser(ctx.app);
    const key = await createKey(ctx.app, dave, { name: 'streams' });
    // 380 characters, 4 a token: 95 output tokens.
    const answer = 'A long free answer '.repeat(20);
    fake.script('fake-precise', { chunks: [answer.slice(0, 190), answer.slice(190)], usage: null });
    const response = await ctx.app.inject({
      method: 'POST',
      url: '/v1/chat/completions',
      headers: xApiKey(key.key),
      payload: { model: 'fake-precise', messages: [{ role: 'user', content: 'Talk' }], stream: true, stream_options: { include_usage: true } },
    });
    expect(response.statusCode).toBe(200);
    const chunks = response.body.split('\n\n').filter(Boolean).slice(0, -1).map((event) => JSON.parse(event.slice('data: '.length)) as { choices: { delta: { content?: string } }[]; usage: { completion_tokens: number } | null });
    expect(chunks.map((chunk) => chunk.choices[0]?.delta.content ?? '').join('')).toBe(answer);
    expect(chunks.at(-1)!.usage).toMatchObject({ completion_tokens: 95 });
    const [record] = await recordsOf(dave.user.id);
    expect(record).toMatchObject({ operation: 'stream', status: 'success', estimated: true, output_tokens: 95 });
  });

  it('a /v1 call whose provider answered 200 and dropped the connection before any output is recorded with its prompt estimated, wire and SDK, stream and not', async () => {
    const erin = await createUser(ctx.app);
    const key = await createKey(ctx.app, erin, { name: 'drops' });
    // The same fake behind an `openai` provider: its chat goes through the AI SDK, not the wire.
    expect((await api('POST', '/providers', admin, { name: 'oa-drops', kind: 'openai', base_url: fake.url, api_key: 'sk-oa' })).statusCode).toBe(200);
    const precise = FAKE_MODELS.precise;
    const added = await api('POST', '/models', admin, { id: 'oa-precise', provider: 'oa-drops', pricing: { input_cost_per_million_tokens: precise.input, output_cost_per_million_tokens: precise.output } });
    expect(added.statusCode, added.body).toBe(200);
    const calls: [string, boolean][] = [
      ['fake-precise', true],
      ['oa-precise', true],
      ['fake-precise', false],
      ['oa-precise', false],
    ];
    for (const [model, stream] of calls) {
      // The 200's headers, a first chunk that says nothing (its role, empty content, as OpenAI's first one), the drop.
      fake.script(model, { deltas: [{ content: '' }, { content: 'never sent' }], drop: { afterChunks: 1 } });
      const response = await ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: xApiKey(key.key), payload: { model, messages: [{ role: 'user', content: 'Tell me something long' }], stream } });
      expect(response.statusCode, `${model} ${stream}`).toBe(502);
    }
    expect(fake.log.map((r) => [r.model, r.reply])).toEqual(calls.map(([model]) => [model, 'drop']));
    const records = await recordsOf(erin.user.id);
    // Not free and exact: the provider began its answer, so it billed the prompt (estimated), and the output nothing said.
    expect(records.map((r) => [r.model, r.operation, r.status, r.estimated, r.output_tokens])).toEqual(calls.map(([model, stream]) => [model, stream ? 'stream' : 'chat', 'error', true, 0]));
    for (const record of records) {
      expect(record.input_tokens).toBeGreaterThan(0);
      expect(Number(record.cost)).toBeGreaterThan(0);
    }
    // One estimate of one prompt: the wire's record and the SDK's agree.
    expect(new Set(records.map((r) => r.input_tokens)).size).toBe(1);
  });

  it('a streaming client that stops reading holds the upstream back; reading on, it gets the whole answer, recorded once', async () => {
    const dave = await createUser(ctx.app);
    const key = await createKey(ctx.app, dave);
    // 32 MB of answer: about three times what the sockets of both legs (client, upstream) held together here.
    const chunks = Array.from({ length: 16_000 }, (_, i) => `${String(i).padStart(5, '0')}${'x'.repeat(2_043)} `);
    fake.script('fake-precise', { chunks, usage: { prompt_tokens: 5, completion_tokens: 16_000 } });
    await ctx.app.listen({ host: '127.0.0.1', port: 0 });
    const { port } = ctx.app.server.address() as AddressInfo;
    const body = JSON.stringify({ model: 'fake-precise', messages: [{ role: 'user', content: 'Count' }], stream: true, stream_options: { include_usage: true } });
    const response = await new Promise<IncomingMessage>((resolve, reject) => {
      const request = httpRequest({ host: '127.0.0.1', port, method: 'POST', path: '/v1/chat/completions', headers: { ...xApiKey(key.key), 'content-type': 'application/json' } }, resolve);
      request.on('error', reject);
      request.end(body);
    });
    expect(response.statusCode).toBe(200);
    const received: Buffer[] = [];
    response.on('data', (data: Buffer) => received.push(data));
    await new Promise((resolve) => response.once('data', resolve));
    response.pause();
    // Held back: Keel stopped reading the upstream once what it may hold for the client was full.
    expect(await fake.stalled()).toMatchObject({ completed: false, aborted: false });
    response.resume();
    await new Promise((resolve) => response.on('end', resolve));
    const events = Buffer.concat(received).toString().split('\n\n').filter(Boolean);
    expect(events.at(-1)).toBe('data: [DONE]');
    const parsed = events.slice(0, -1).map((event) => JSON.parse(event.slice('data: '.length)) as { choices: { delta: { content?: string } }[]; usage: unknown });
    expect(parsed.map((chunk) => chunk.choices[0]?.delta.content ?? '').join('')).toBe(chunks.join(''));
    expect(parsed.at(-1)!.usage).toMatchObject({ prompt_tokens: 5, completion_tokens: 16_000 });
    expect(fake.log[0]).toMatchObject({ completed: true, aborted: false });
    const records = await recordsOf(dave.user.id);
    expect(records.map((r) => [r.operation, r.status, r.output_tokens])).toEqual([['stream', 'success', 16_000]]);
  });

  it('reserve does no I/O with billing off and a key without limits: it answers synchronously', async () => {
    const key = await createKey(ctx.app, alice, { name: 'plain' });
    const estimate: CostEstimate = {
      operation: 'chat',
      model: 'fake-precise',
      provider: 'fake',
      input_tokens: 1,
      max_output_tokens: 1,
      cost: '0.00001',
      // As a request's calls carry them: the key's limits read by authentication.
      context: { user_id: alice.user.id, api_key_id: key.id, api_key_limits: { max_budget: null, rpm: null } },
    };
    expect(ctx.app.meter.reserve(estimate)).not.toBeInstanceOf(Promise);
    expect(ctx.app.meter.reserve({ ...estimate, context: { user_id: alice.user.id } })).not.toBeInstanceOf(Promise);
  });

  /** Calls of `user` through `key` (no limits) settled together, through the meter: each its cost, `fields` over its record, `context` over its call's. */
  async function meteredCalls(user: TestUser, keyId: string, calls: { cost: string; fields?: Partial<UsageRecord>; context?: Partial<CostEstimate['context']> }[]): Promise<void> {
    for (const { cost, fields, context } of calls) {
      const estimate: CostEstimate = {
        operation: 'chat',
        model: 'fake-precise',
        provider: 'fake',
        input_tokens: 1,
        max_output_tokens: 5,
        cost,
        context: { user_id: user.user.id, api_key_id: keyId, api_key_limits: { max_budget: null, rpm: null }, ...context },
      };
      void (await ctx.app.meter.reserve(estimate)).settle({ ...usageRecordOf(estimate, cost), ...fields });
    }
    await ctx.app.meter.idle();
  }

  const summaryTotal = async (user: TestUser) => (await api('GET', '/billing/summary', user.headers)).json<{ total: { calls: number; cost: string } }>().total;

  it("a usage row the database refuses for its data, with no settlement to carry it, goes in stripped: the call stays in the summary, and its cost in its key's spent", async () => {
    const hana = await createUser(ctx.app);
    const key = await createKey(ctx.app, hana, { name: 'refused rows' });
    // What both PGlite and PostgreSQL refuse in a row: a NUL in text (22P05), a count past int4 (22003). One batch, refused, then row by row.
    await meteredCalls(hana, key.id, [
      { cost: '0.1' },
      { cost: '0.2', fields: { model: 'fake\u0000precise' } },
      { cost: '0.4', fields: { tokens: { ...ZERO_USAGE, input: 2 ** 31 } } },
    ]);
    const records = (await recordsOf(hana.user.id)).sort((a, b) => Number(a.cost) - Number(b.cost));
    expect(records.map((r) => [r.model, r.status, r.input_tokens, r.output_tokens, Number(r.cost), r.error])).toEqual([
      ['fake-precise', 'success', 0, 5, 0.1, null],
      ['fakeprecise', 'success', 0, 0, 0.2, STRIPPED],
      ['fake-precise', 'success', 0, 0, 0.4, STRIPPED],
    ]);
    // The key's spend (its max_budget's measure) has every call's cost; the summary every call.
    expect(Number((await keySpend(ctx.database.db, key.id)).spent)).toBeCloseTo(0.7, 12);
    expect(await summaryTotal(hana)).toMatchObject({ calls: 3, cost: '0.7' });
  });

  it('a usage row refused stripped too (an id that is no uuid) is set aside; the rows around it, and later ones, are written', async () => {
    const ivan = await createUser(ctx.app);
    const key = await createKey(ctx.app, ivan, { name: 'refused twice' });
    await meteredCalls(ivan, key.id, [{ cost: '0.1' }, { cost: '0.2', context: { project_id: 'not-a-uuid' } }, { cost: '0.4' }]);
    await meteredCalls(ivan, key.id, [{ cost: '0.8' }]);
    expect((await recordsOf(ivan.user.id)).map((r) => Number(r.cost)).sort()).toEqual([0.1, 0.4, 0.8]);
    expect(Number((await keySpend(ctx.database.db, key.id)).spent)).toBeCloseTo(1.3, 12);
  });

  it('a failing flush keeps the records and writes them once the database takes them again', async () => {
    const dave = await createUser(ctx.app);
    const db = ctx.database.db;
    await db.execute(sql`alter table usage_records rename to usage_records_away`);
    try {
      await ctx.app.models.chat(chatRequest('fake-precise', { user_id: dave.user.id }));
      await ctx.app.meter.idle(); // the flush fails: the row stays in memory
      const away = await db.execute(sql`select count(*)::int as n from usage_records_away where owner_id = ${dave.user.id}`);
      expect((away as { rows: { n: number }[] }).rows[0]!.n).toBe(0);
    } finally {
      await db.execute(sql`alter table usage_records_away rename to usage_records`);
    }
    expect(await recordsOf(dave.user.id)).toHaveLength(1);
  });

  it('flushes on app close: a record still in memory is written', async () => {
    const erin = await createUser(ctx.app);
    // A second app on the same database (it reads the fake provider and models at start), whose batches wait 10 minutes.
    const second = await buildTestApp(ctx.database, { USAGE_FLUSH_INTERVAL_MS: '600000' });
    await second.models.chat(chatRequest('fake-precise', { user_id: erin.user.id }));
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, erin.user.id))).toHaveLength(0);
    await second.close();
    expect(await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, erin.user.id))).toHaveLength(1);
  });
});

describe('keys with max_budget', () => {
  it('with billing off, a call without a maximum through a key with a budget sends upstream the default maximum its hold assumed; through a key without one, none', async () => {
    expect(ctx.app.settings.BILLING_ENABLED).toBe(false);
    const erin = await createUser(ctx.app);
    const budgeted = await createKey(ctx.app, erin, { name: 'budget, capped', max_budget: '100000' });
    const open = await createKey(ctx.app, erin, { name: 'no budget' });
    await ctx.app.models.chat(chatRequest('fake-billed', { user_id: erin.user.id, api_key_id: budgeted.id }));
    await ctx.app.models.chat(chatRequest('fake-billed', { user_id: erin.user.id, api_key_id: open.id }));
    expect(fake.log.map((r) => r.body.max_tokens)).toEqual([ctx.app.settings.MODEL_DEFAULT_MAX_OUTPUT_TOKENS, undefined]);
    await ctx.app.meter.idle();
    expect(Number((await keySpend(ctx.database.db, budgeted.id)).reserved)).toBe(0);
  });

  it('a settlement that committed but whose reply was lost is retried without adding the call to the key\'s spend twice', async () => {
    // With billing off no ledger entry is written: what tells a retry that its settlement committed
    // is the call's usage row, written by the settlement itself.
    const carol = await createUser(ctx.app);
    const key = await createKey(ctx.app, carol, { name: 'budget, retried', max_budget: '1000' });
    const context = { user_id: carol.user.id, api_key_id: key.id };
    const call = () => ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 10 }));
    fake.script('fake-billed', ...Array.from({ length: 6 }, () => ({ text: 'four', usage: { prompt_tokens: 1, completion_tokens: 4 } })));
    let losing = true;
    let lost = 0;
    let batched = 0;
    let wave: Promise<unknown> | undefined;
    await intercepting(
      ctx.database.db,
      async (text, params) => {
        // The key's settlements (they release its hold): each commits and then its reply is lost, retries too, while `losing`.
        if (losing && /delete from credit_reservations/.test(text) && JSON.stringify(params).includes(key.id)) {
          lost += 1;
          if (/with ordinality/.test(text)) batched += 1;
          // The wave's first settlement is in flight until the wave has ended: the others are settled together, in one statement.
          else if (wave) await wave.then(() => new Promise(setImmediate));
          throw new Error('connection lost after the commit');
        }
      },
      async () => {
        await call(); // settled alone (`settle`)
        wave = Promise.all(Array.from({ length: 5 }, call));
        await wave;
        await ctx.app.meter.idle(); // the retries are lost too
        losing = false;
        await ctx.app.meter.idle(); // the next retries go through
      },
      true,
    );
    expect(lost).toBeGreaterThanOrEqual(3);
    expect(batched).toBeGreaterThanOrEqual(1);
    const spend = await keySpend(ctx.database.db, key.id);
    expect([Number(spend.spent), Number(spend.reserved)]).toEqual([6 * 4, 0]);
    const records = await recordsOf(carol.user.id);
    expect(records).toHaveLength(6);
    expect(new Set(records.map((r) => r.id)).size).toBe(6);
  });

  it('a usage row the database refuses goes in stripped to its id and cost; its settlement still releases the key\'s hold, and later calls are charged', async () => {
    const dora = await createUser(ctx.app);
    const key = await createKey(ctx.app, dora, { name: 'budget, refused row', max_budget: '1000' });
    const context = { user_id: dora.user.id, api_key_id: key.id };
    const call = () => ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 10 }));
    // As a value PostgreSQL refuses would (22P02): every statement carrying the marked row fails.
    const refused = Object.assign(new Error('invalid input syntax for type json'), { code: '22P02' });
    await intercepting(
      ctx.database.db,
      (_text, params) => {
        if (params.some((p) => typeof p === 'string' && p.includes('MARKED-ROW'))) throw refused;
      },
      async () => {
        fake.script('fake-billed', { status: 400, body: { error: { message: 'MARKED-ROW', type: 'invalid_request_error', param: null, code: null } } });
        await expect(call()).rejects.toThrow();
        fake.script('fake-billed', ...Array.from({ length: 2 }, () => ({ text: 'four', usage: { prompt_tokens: 1, completion_tokens: 4 } })));
        await call();
        await call();
        await ctx.app.meter.idle();
        await ctx.app.meter.idle();
      },
    );
    const spend = await keySpend(ctx.database.db, key.id);
    expect([Number(spend.spent), Number(spend.reserved)]).toEqual([2 * 4, 0]);
    // Order aside: a row's created_at is its call's end to the millisecond, and the refused call
    // and the next may end within one.
    const errors = (await recordsOf(dora.user.id)).map((r) => r.error);
    expect([errors.filter((error) => error === STRIPPED).length, errors.filter((error) => error === null).length]).toEqual([1, 2]);
  });

  it("a usage row the database refuses, whose settlement then goes through and loses its reply, adds the call to the key's spend once", async () => {
    const gail = await createUser(ctx.app);
    const key = await createKey(ctx.app, gail, { name: 'budget, refused row, lost reply', max_budget: '1000' });
    const context = { user_id: gail.user.id, api_key_id: key.id };
    // The row is marked by its input tokens (free on this model): the call costs its 4 output tokens.
    fake.script('fake-billed', { text: 'four', usage: { prompt_tokens: 31_337, completion_tokens: 4 } });
    const marked = (params: unknown[]) => params.some((p) => typeof p === 'string' && p.includes('"input_tokens":31337'));
    // As a value PostgreSQL refuses would (22P02): every statement carrying the marked row fails.
    const refused = Object.assign(new Error('invalid input syntax for type json'), { code: '22P02' });
    let lost = 0;
    const refuseRow = (_text: string, params: unknown[]) => {
      if (marked(params)) throw refused;
    };
    // The key's settlement that goes through (the row stripped) commits, and its reply is lost, once.
    const loseReply = (text: string, params: unknown[]) => {
      if (lost === 0 && /delete from credit_reservations/.test(text) && JSON.stringify(params).includes(key.id)) {
        lost += 1;
        throw new Error('connection lost after the commit');
      }
    };
    const work = async () => {
      await ctx.app.models.chat(chatRequest('fake-billed', context, { maxOutputTokens: 10 }));
      await ctx.app.meter.idle(); // refused, then retried one by one: with the row stripped it commits, its reply lost
      await ctx.app.meter.idle(); // retried again
    };
    await intercepting(ctx.database.db, refuseRow, () => intercepting(ctx.database.db, loseReply, work, true));
    expect(lost).toBe(1);
    const spend = await keySpend(ctx.database.db, key.id);
    expect([Number(spend.spent), Number(spend.reserved)]).toEqual([4, 0]);
    // The row that went in with the settlement: its id and cost (what the key's spend adds up), no tokens.
    const [record, ...more] = await recordsOf(gail.user.id);
    expect(more).toHaveLength(0);
    expect(record).toMatchObject({ api_key_id: key.id, model: 'fake-billed', status: 'success', input_tokens: 0, output_tokens: 0, error: STRIPPED });
    expect(Number(record!.cost)).toBe(4);
  });
});

describe('GET /billing/summary', () => {
  let frank: TestUser;
  let project: { id: string };
  let keyId: string;

  beforeAll(async () => {
    frank = await createUser(ctx.app);
    project = await createProject(ctx.app, frank.headers);
    keyId = (await createKey(ctx.app, frank, { name: 'k' })).id;
    await insertUsage(ctx.database.db, [
      row(frank.user.id, '2026-03-01T10:00:00.000Z', { model: 'm1', cost: '0.000000000001', input_tokens: 1 }),
      row(frank.user.id, '2026-03-01T23:59:59.999Z', { model: 'm1', cost: '0.5', project_id: project.id, api_key_id: keyId }),
      row(frank.user.id, '2026-03-02T00:00:00.000Z', { model: 'm2', cost: '1.25', api_key_id: keyId }),
      row(frank.user.id, '2026-03-05T12:00:00.000Z', { model: 'm1', cost: '2' }),
      row(bob.user.id, '2026-03-01T12:00:00.000Z', { model: 'm1', cost: '100' }),
    ]);
  });

  const summary = (query: string, headers = frank.headers) => api('GET', `/billing/summary?${query}`, headers);

  it('groups by model and day by default, from `from` through the whole day `to` names, to the last decimal', async () => {
    const response = await summary('from=2026-03-01&to=2026-03-03');
    expect(response.statusCode, response.body).toBe(200);
    const body = response.json<{ group_by: string[]; data: Record<string, unknown>[]; total: Record<string, unknown> }>();
    expect(body.group_by).toEqual(['model', 'day']);
    expect(body.data.map((d) => [d.model, d.day, d.calls, d.cost])).toEqual([
      ['m1', '2026-03-01', 2, '0.500000000001'],
      ['m2', '2026-03-02', 1, '1.25'],
    ]);
    expect(body.total).toMatchObject({ calls: 3, cost: '1.750000000001', input_tokens: 21, output_tokens: 15 });
  });

  it('groups by model, by day, by api_key; the date filters cut exactly', async () => {
    const byModel = (await summary('from=2026-03-01T00:00:00Z&to=2026-03-06T00:00:00Z&group_by=model')).json<{ data: { model: string; cost: string }[] }>();
    expect(byModel.data.map((d) => [d.model, d.cost])).toEqual([
      ['m1', '2.500000000001'],
      ['m2', '1.25'],
    ]);
    const byDay = (await summary('from=2026-03-01&to=2026-03-02&group_by=day')).json<{ data: { day: string; calls: number }[] }>();
    expect(byDay.data).toEqual([expect.objectContaining({ day: '2026-03-01', calls: 2 }), expect.objectContaining({ day: '2026-03-02', calls: 1 })]);
    const byKey = (await summary('from=2026-03-01&to=2026-03-10&group_by=api_key')).json<{ data: { api_key_id: string | null; cost: string }[] }>();
    expect(byKey.data.map((d) => [d.api_key_id, d.cost]).sort()).toEqual([
      [keyId, '1.75'],
      [null, '2.000000000001'],
    ].sort());
    // A date-time `to` is exclusive, `from` inclusive.
    const edge = (await summary('from=2026-03-02T00:00:00Z&to=2026-03-05T12:00:00Z&group_by=model')).json<{ total: { calls: number } }>();
    expect(edge.total.calls).toBe(1);
    // The default range is the last 30 days: none of these rows.
    expect((await summary('')).json<{ total: { calls: number } }>().total.calls).toBe(0);
  });

  it('shows only the caller’s usage; a project-scoped key only its project’s', async () => {
    const bobs = (await summary('from=2026-03-01&to=2026-03-10&group_by=model', bob.headers)).json<{ total: { cost: string; calls: number } }>();
    expect(bobs.total).toMatchObject({ calls: 1, cost: '100' });
    const scoped = await createKey(ctx.app, frank, { name: 'scoped', project_id: project.id });
    const body = (await summary('from=2026-03-01&to=2026-03-10&group_by=model', xApiKey(scoped.key))).json<{ total: { cost: string; calls: number } }>();
    expect(body.total).toMatchObject({ calls: 1, cost: '0.5' });
    // The superuser sees their own usage here, not everyone's.
    expect((await summary('from=2026-03-01&to=2026-03-10', admin)).json<{ total: { calls: number } }>().total.calls).toBe(0);
  });

  it('takes a bare-date `to` as that whole day (UTC), its last millisecond in and the next midnight out; a date-time `to` as the exclusive end', async () => {
    const oneDay = await summary('from=2026-03-01&to=2026-03-01&group_by=day');
    expect(oneDay.statusCode, oneDay.body).toBe(200);
    expect(oneDay.json()).toMatchObject({ from: '2026-03-01T00:00:00.000Z', to: '2026-03-02T00:00:00.000Z', data: [{ day: '2026-03-01', calls: 2 }], total: { calls: 2 } });
    // The same range written as instants.
    expect((await summary('from=2026-03-01T00:00:00Z&to=2026-03-02T00:00:00Z&group_by=day')).json()).toEqual(oneDay.json());
    const toTheLastMillisecond = await summary('from=2026-03-01&to=2026-03-01T23:59:59.999Z&group_by=day');
    expect(toTheLastMillisecond.json()).toMatchObject({ to: '2026-03-01T23:59:59.999Z', total: { calls: 1 } });
    // A range ending on the year 9999's last day ends at its last storable instant.
    const last = await summary('from=2026-03-01&to=9999-12-31&group_by=model');
    expect(last.statusCode, last.body).toBe(200);
    expect(last.json()).toMatchObject({ to: '9999-12-31T23:59:59.999Z', total: { calls: 4 } });
  });

  it('refuses bad queries with 422 and answers 401 without credentials', async () => {
    expectValidationError(await summary('group_by=user'), ['query', 'group_by']);
    // The refusal names the forms a bound takes.
    const dateMessage = 'Input should be an ISO 8601 date (2026-03-01) or date-time with an offset (2026-03-01T00:00:00Z)';
    for (const query of ['from=yesterday', 'from=', 'from=2026-02-30', 'to=2026-03-01T00:00']) {
      const [name] = query.split('=');
      expect(expectValidationError(await summary(query), ['query', name!]).detail).toContainEqual(expect.objectContaining({ msg: dateMessage }));
    }
    expectValidationError(await summary('from=2026-03-05&to=2026-03-01'), ['query', 'from']);
    expectValidationError(await summary('from=2026-03-02&to=2026-03-01'), ['query', 'from']);
    expectValidationError(await summary('from=2026-03-02T00:00:00Z&to=2026-03-01T23:59:59Z'), ['query', 'from']);
    // Without `to` the range ends now: one starting later is as empty a range as the above.
    expectValidationError(await summary(`from=${new Date(Date.now() + 60_000).toISOString()}`), ['query', 'from']);
    expect((await summary(`from=${new Date(Date.now() - 60_000).toISOString()}`)).statusCode).toBe(200);
    expectValidationError(await summary('page=2'), ['query', 'page'], 'extra_forbidden');
    expect((await api('GET', '/billing/summary')).statusCode).toBe(401);
  });

  it('refuses instants outside the years 1 to 9999 (UTC) with 422; a range that starts before year 1 by default starts at its first instant', async () => {
    const outside = [
      ['from=0000-01-01', 'from'],
      ['from=0000-12-31T23:00:00Z&to=2026-01-01', 'from'],
      ['from=9999-12-31T23:59:59-23:59', 'from'],
      ['to=9999-12-31T23:59:59-01:00', 'to'],
      ['from=0001-01-01&to=0000-06-01', 'to'],
    ];
    for (const [query, field] of outside) {
      const response = await summary(query!);
      expect(response.statusCode, `${query}: ${response.body}`).toBe(422);
      expect(response.json<{ detail: { loc: string[] }[] }>().detail.map((d) => d.loc)).toContainEqual(['query', field]);
    }
    const early = await summary('to=0001-01-15');
    expect(early.statusCode, early.body).toBe(200);
    expect(early.json()).toMatchObject({ from: '0001-01-01T00:00:00.000Z', to: '0001-01-16T00:00:00.000Z', data: [] });
    const late = await summary('from=2026-03-01&to=9999-12-31T23:59:59.999Z&group_by=model');
    expect(late.statusCode, late.body).toBe(200);
    expect(late.json<{ total: { calls: number } }>().total.calls).toBe(4);
  });
});

/** A database for a server a test starts itself: a PostgreSQL database of its own (DATABASE_URL set), or a copy of the migrated PGlite template. */
async function databaseOfItsOwn(): Promise<{ overrides: Record<string, string>; cleanup: () => Promise<void> }> {
  if (process.env.DATABASE_URL) {
    const opened = await openTestDatabase();
    await opened.database.close();
    return { overrides: { DATABASE_URL: opened.url! }, cleanup: opened.destroy };
  }
  const dir = mkdtempSync(join(tmpdir(), 'keel-test-db-'));
  cpSync(inject('templatePgliteDir')!, dir, { recursive: true });
  return { overrides: { PGLITE_DATA_DIR: dir }, cleanup: async () => rmSync(dir, { recursive: true, force: true }) };
}

describe('shutdown', () => {
  /** A second app on the file's database (it reads the fake provider and models at start) whose batches wait 10 minutes: only its close writes them. */
  const secondApp = () => buildTestApp(ctx.database, { USAGE_FLUSH_INTERVAL_MS: '600000' });
  const rowsOf = (user: TestUser) => ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, user.user.id));

  it('a call that ends as the meter closes is written before close() resolves', async () => {
    const user = await createUser(ctx.app);
    const context = { user_id: user.user.id };
    const other = await secondApp();
    try {
      await other.meter.idle(); // nothing in flight: close() has nothing to wait for
      const reservation = await other.meter.reserve({ operation: 'chat', model: 'fake-precise', provider: 'fake', input_tokens: 1, max_output_tokens: 1, cost: '0.00000579', context });
      const closing = other.meter.close();
      // The model manager settles a call as it ends: here, the moment close() began.
      const record: UsageRecord = {
        operation: 'chat',
        model: 'fake-precise',
        provider: 'fake',
        tokens: { ...ZERO_USAGE, input: 1, output: 1 },
        estimated: false,
        cost: '0.00000579',
        latency_ms: 5,
        time_to_first_token_ms: null,
        status: 'success',
        error: null,
        attempts: 1,
        started_at: new Date(),
        context,
      };
      await reservation.settle(record);
      await closing;
      expect(await rowsOf(user)).toHaveLength(1);
    } finally {
      await other.close();
    }
  });

  it('a call that starts once the meter is closing is refused (503) before it reaches the provider; the calls before it are written', async () => {
    const user = await createUser(ctx.app);
    const other = await secondApp();
    try {
      await other.models.chat(chatRequest('fake-precise', { user_id: user.user.id })); // its row waits in memory: close() writes it
      const closing = other.meter.close();
      await expect(other.models.chat(chatRequest('fake-precise', { user_id: user.user.id }))).rejects.toBeInstanceOf(ServiceUnavailableError);
      await closing;
      expect(fake.log).toHaveLength(1);
      expect(await rowsOf(user)).toHaveLength(1);
    } finally {
      await other.close();
    }
  });

  it('a call in flight when the meter closed is written as it ends', async () => {
    const user = await createUser(ctx.app);
    const other = await secondApp();
    try {
      fake.script('fake-precise', { text: 'slow', usage: { prompt_tokens: 10, completion_tokens: 5 }, chunkDelayMs: 300 });
      const call = other.models.chat(chatRequest('fake-precise', { user_id: user.user.id }));
      await fake.waitFor((log) => log.length === 1);
      await other.meter.close();
      await call;
      // No flush timer runs once closed: it is written at once, not after the 10-minute interval.
      await expect.poll(async () => (await rowsOf(user)).length, { timeout: 2_000 }).toBe(1);
    } finally {
      await other.close();
    }
  });

  it('a gateway call still waiting for its credit hold when the server stops answers 503 before the shutdown deadline, not a cut connection', async () => {
    // A database gone silent keeps a hold's statement (up to its timeout + 2 s, past SHUTDOWN_TIMEOUT_MS,
    // where the process exits and cuts the connection): the cut-off before the deadline (here 3 s
    // after the stop, the deadline at 4 s) must reach the call waiting for it. The statement goes on at 6 s.
    const dir = await databaseOfItsOwn();
    const settings = testSettings({ ...dir.overrides, PORT: '0', BILLING_ENABLED: 'true', SHUTDOWN_TIMEOUT_MS: '4000' });
    let release = () => undefined as void;
    const silent = new Promise<void>((resolve) => (release = resolve));
    let releaser: NodeJS.Timeout | undefined;
    try {
      const server = await startServer(settings, pino({ level: 'silent' }), { migrate: true });
      let closed: Promise<unknown> | undefined;
      try {
        const admin = await superuserHeaders(server);
        await addFakeModels(server, admin, fake.url);
        const user = await createUser(server);
        expect((await server.inject({ method: 'POST', url: '/api/v1/billing/credits', headers: admin, payload: { user_id: user.user.id, amount: '1000', description: 'test' } })).statusCode).toBe(200);
        const key = await createKey(server, user, { name: 'gateway' });
        let holding = false;
        await intercepting(
          server.database.db,
          async (text, params) => {
            if (/insert into credit_reservations/.test(text) && params.includes(user.user.id)) {
              holding = true;
              await silent;
            }
          },
          async () => {
            const { port } = server.server.address() as AddressInfo;
            const answer = fetch(`http://127.0.0.1:${port}/v1/chat/completions`, {
              method: 'POST',
              headers: { authorization: `Bearer ${key.key}`, 'content-type': 'application/json' },
              body: JSON.stringify({ model: 'fake-billed', max_tokens: 10, messages: [{ role: 'user', content: 'hi' }] }),
            }).then(async (response) => ({ status: response.status, body: await response.text(), at: Date.now() }));
            await expect.poll(() => holding).toBe(true);
            const stopped = Date.now();
            releaser = setTimeout(release, 6_000);
            closed = server.close();
            const response = await answer;
            expect(response.status, response.body).toBe(503);
            expect(response.at - stopped).toBeLessThan(4_000);
            release();
            await closed;
          },
        );
      } finally {
        release();
        await (closed ?? server.close());
      }
    } finally {
      clearTimeout(releaser);
      await dir.cleanup();
    }
  });

  it('a server that stops writes the usage still in memory before its database closes, and that of a call still in flight', async () => {
    const adminUrl = process.env.DATABASE_URL;
    let overrides: Record<string, string>;
    let cleanup: () => Promise<void>;
    if (adminUrl) {
      const opened = await openTestDatabase();
      await opened.database.close();
      overrides = { DATABASE_URL: opened.url! };
      cleanup = opened.destroy;
    } else {
      const dir = mkdtempSync(join(tmpdir(), 'keel-test-db-'));
      cpSync(inject('templatePgliteDir')!, dir, { recursive: true });
      overrides = { PGLITE_DATA_DIR: dir };
      cleanup = async () => rmSync(dir, { recursive: true, force: true });
    }
    const settings = testSettings({ ...overrides, PORT: '0', USAGE_FLUSH_INTERVAL_MS: '600000' });
    try {
      const server = await startServer(settings, pino({ level: process.env.DEBUG_LOG ? 'debug' : 'silent' }), { migrate: true });
      const headers = await superuserHeaders(server);
      await addFakeModels(server, headers, fake.url);
      const me = (await server.inject({ method: 'POST', url: '/api/v1/login/test-token', headers })).json<{ id: string }>();
      await server.models.chat(chatRequest('fake-precise', { user_id: me.id }));
      // A call (no request behind it) still waiting for its answer when the server stops.
      fake.script('fake-precise', { text: 'slow', usage: { prompt_tokens: 10, completion_tokens: 5 }, chunkDelayMs: 300 });
      const inFlight = server.models.chat(chatRequest('fake-precise', { user_id: me.id }));
      await fake.waitFor((log) => log.length === 2);
      await server.close(); // closes the database too (server.ts)
      await inFlight;
      const reopened = await openDatabase(settings);
      try {
        const rows = await reopened.db.select().from(usageRecords).where(eq(usageRecords.owner_id, me.id));
        expect(rows).toHaveLength(2);
      } finally {
        await reopened.close();
      }
    } finally {
      await cleanup();
    }
  });
});
