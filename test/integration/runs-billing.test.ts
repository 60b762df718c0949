import type { AddressInfo } from 'node:net';

import { eq, sql } from 'drizzle-orm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { modelOverrides } from '../../src/models/index.js';

import { getBalance, ledgerSum } from '../../src/crud/billing.js';
import { refreshModels } from '../../src/services/model-sync.js';
import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey } from '../helpers/http.js';
import { addFakeModels } from '../helpers/metered-models.js';
import { createAgent, createThread, readEvents, startRun, waitForRun } from '../helpers/runs.js';

// Billing on, a one-second run deadline, and the built-in knowledge_search switched off (a server without the tool).
const ctx = useTestApp({ BILLING_ENABLED: 'true', RUN_TIMEOUT_SECONDS: '1', MODEL_TIMEOUT_MS: '30000' }, { tools: { knowledge_search: undefined } });
const api = apiOf(ctx);
let fake: FakeModelServer;
let admin: Record<string, string>;
let base: string;

beforeAll(async () => {
  fake = await FakeModelServer.start();
  admin = await superuserHeaders(ctx.app);
  await addFakeModels(ctx.app, admin, fake.url);
  await ctx.app.listen({ port: 0, host: '127.0.0.1' });
  base = `http://127.0.0.1:${(ctx.app.server.address() as AddressInfo).port}`;
});
afterAll(async () => {
  await fake?.close();
});
beforeEach(() => fake.reset());

async function grant(user: TestUser, amount: string) {
  const response = await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount, description: 'test credits' });
  expect(response.statusCode, response.body).toBe(200);
}

describe('runs with billing on', () => {
  it('402 at start when the balance cannot cover the first step; no run, no message', async () => {
    const owner = await createUser(ctx.app);
    // `fake-billed`: 1 credit per output token; 10 output tokens at most → a step needs up to 10.
    await createAgent(ctx.app, owner.headers, { model: 'fake-billed', max_output_tokens: 10, is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    await grant(owner, '9.5');
    const refused = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'hello' });
    expect(refused.statusCode).toBe(402);
    expect(refused.json<{ detail: string }>().detail).toMatch(/^Not enough credits to start this run: available 9.5; .* needs up to 10$/);
    expect((await api('GET', `/threads/${thread.id}/runs`, owner.headers)).json<{ count: number }>().count).toBe(0);
    expect((await api('GET', `/threads/${thread.id}/messages`, owner.headers)).json<{ count: number }>().count).toBe(0);
    expect(fake.log).toHaveLength(0);
  });

  /** A user whose default agent runs `model` (10 output tokens at most) and who holds 9.5 credits: a run's start is refused (402), priced by fake-billed (1 credit an output token), and nothing reaches the model. */
  async function expectStartPricedByFakeBilled(model: string) {
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { model, max_output_tokens: 10, is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    await grant(owner, '9.5');
    const refused = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'hello' });
    expect(refused.statusCode, refused.body).toBe(402);
    expect(refused.json<{ detail: string }>().detail).toMatch(/^Not enough credits to start this run: available 9.5; its first step with fake-billed needs up to 10$/);
    expect(fake.log).toHaveLength(0);
    return owner;
  }

  it('an agent whose model\'s provider is switched off is checked at start against the fallback that will answer (and reserve)', async () => {
    const offline = await api('POST', '/providers', admin, { name: 'offline-at-start', kind: 'openai-compatible', base_url: fake.url });
    expect(offline.statusCode, offline.body).toBe(200);
    // Free on its own provider; its fallback `fake-billed` costs 1 credit per output token (up to 10 here).
    const free = await api('POST', '/models', admin, { id: 'offline-free', provider: 'offline-at-start', fallbacks: ['fake-billed'], pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '0' } });
    expect(free.statusCode, free.body).toBe(200);
    expect((await api('PATCH', `/providers/${offline.json<{ id: string }>().id}`, admin, { enabled: false })).statusCode).toBe(200);
    await expectStartPricedByFakeBilled('offline-free');
  });

  it('a model that chats and embeds, its provider off: checked against the fallback its chat calls go to, and listed by /v1/models as its own', async () => {
    const offline = await api('POST', '/providers', admin, { name: 'offline-both', kind: 'openai-compatible', base_url: fake.url });
    expect(offline.statusCode, offline.body).toBe(200);
    const free = { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '0' };
    const created = await api('POST', '/models', admin, { id: 'offline-both-model', provider: 'offline-both', capabilities: ['chat', 'embedding'], pricing: free });
    expect(created.statusCode, created.body).toBe(200);
    // A row from before fallbacks were checked: its chat calls fall to fake-billed (chat only), its embeddings to fake-embed.
    await ctx.database.db.update(modelOverrides).set({ fallbacks: ['fake-billed', 'fake-embed'] }).where(eq(modelOverrides.model_id, 'offline-both-model'));
    expect((await api('PATCH', `/providers/${offline.json<{ id: string }>().id}`, admin, { enabled: false })).statusCode).toBe(200);
    await refreshModels(ctx.app.models, ctx.app.db, ctx.app.settings, ctx.app.log);
    expect((await api('GET', '/models/offline-both-model', admin)).json()).toMatchObject({ available: false, fallbacks: ['fake-billed', 'fake-embed'], answered_by: 'fake-billed' });
    const owner = await expectStartPricedByFakeBilled('offline-both-model');
    // Callable, so listed and found; owned_by stays its own provider while fake-billed answers for it.
    const listed = (await ctx.app.inject({ method: 'GET', url: '/v1/models', headers: owner.headers })).json<{ data: { id: string; owned_by: string }[] }>().data;
    expect(listed.find((m) => m.id === 'offline-both-model')).toMatchObject({ owned_by: 'offline-both' });
    const found = await ctx.app.inject({ method: 'GET', url: '/v1/models/offline-both-model', headers: owner.headers });
    expect(found.statusCode, found.body).toBe(200);
    expect(found.json()).toMatchObject({ id: 'offline-both-model', object: 'model', owned_by: 'offline-both' });
  });

  it("402 at start when what is left of the caller's key's max_budget cannot cover the first step; no run, no message", async () => {
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { model: 'fake-billed', max_output_tokens: 10, is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    await grant(owner, '1000');
    const capped = { authorization: `Bearer ${(await createKey(ctx.app, owner, { name: 'capped', max_budget: '9.5' })).key}` };
    const refused = await api('POST', `/threads/${thread.id}/runs`, capped, { input: 'hello' });
    expect(refused.statusCode).toBe(402);
    expect(refused.json<{ detail: string }>().detail).toMatch(/^API key budget exceeded: max_budget 9.5, spent 0; its first step with fake-billed needs up to 10$/);
    expect((await api('GET', `/threads/${thread.id}/runs`, owner.headers)).json<{ count: number }>().count).toBe(0);
    expect((await api('GET', `/threads/${thread.id}/messages`, owner.headers)).json<{ count: number }>().count).toBe(0);
    // A key whose budget covers it starts the run.
    const roomy = { authorization: `Bearer ${(await createKey(ctx.app, owner, { name: 'roomy', max_budget: '10' })).key}` };
    fake.script('fake-billed', { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 1 } });
    const started = await api('POST', `/threads/${thread.id}/runs`, roomy, { input: 'hello' });
    expect(started.statusCode, started.body).toBe(202);
    await waitForRun(ctx.app, owner.headers, started.json<{ id: string }>().id, ['completed']);
  });

  it("starts right after the user's model call: the credit this process still holds of the account from it is no shortage", async () => {
    const owner = await createUser(ctx.app);
    await grant(owner, '100');
    // A first step that needs 70 of the 100.
    await createAgent(ctx.app, owner.headers, { model: 'fake-billed', max_output_tokens: 70, is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    const { key } = await createKey(ctx.app, owner);
    fake.script('fake-billed', { text: 'one', usage: { prompt_tokens: 1, completion_tokens: 1 } }, { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 1 } });
    // A call that holds 1 credit takes a credit window's block of 32 for the account, and is over before the run starts.
    const answered = await ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: { authorization: `Bearer ${key}` }, payload: { model: 'fake-billed', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 1 } });
    expect(answered.statusCode, answered.body).toBe(200);
    const started = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'hello' });
    expect(started.statusCode, started.body).toBe(202);
    await waitForRun(ctx.app, owner.headers, started.json<{ id: string }>().id, ['completed']);
    expect((await api('GET', '/billing/balance', owner.headers)).json()).toMatchObject({ balance: '98', reserved: '0' });
  });

  it("a run on another user's thread (a superuser's start) checks the thread owner's credits, not the caller's", async () => {
    const owner = await createUser(ctx.app);
    const thread = await createThread(ctx.app, owner.headers);
    // The caller (the superuser) pays nothing here; its agent is what runs.
    const agent = await createAgent(ctx.app, admin, { model: 'fake-billed', max_output_tokens: 10 });
    await grant(owner, '9.5');
    const refused = await api('POST', `/threads/${thread.id}/runs`, admin, { agent_id: agent.id, input: 'hello' });
    expect(refused.statusCode, refused.body).toBe(402);
    expect(refused.json<{ detail: string }>().detail).toMatch(/^Not enough credits to start this run: available 9.5; /);
    await grant(owner, '10');
    const started = await api('POST', `/threads/${thread.id}/runs`, admin, { agent_id: agent.id, input: 'hello' });
    expect(started.statusCode, started.body).toBe(202);
    await waitForRun(ctx.app, admin, started.json<{ id: string }>().id, ['completed']);
  });

  it("without a max_output_tokens of the agent's, the start asks for the worst case the call reserves: the default capped by the model's own output limit", async () => {
    // 1 credit per output token, input free; the catalog caps its output at 10, far below MODEL_DEFAULT_MAX_OUTPUT_TOKENS.
    const capped = await api('POST', '/models', admin, { id: 'fake-capped', provider: 'fake', max_output_tokens: 10, pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '1000000' } });
    expect(capped.statusCode, capped.body).toBe(200);
    expect(ctx.app.settings.MODEL_DEFAULT_MAX_OUTPUT_TOKENS).toBeGreaterThan(10);
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { model: 'fake-capped', is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    // Short of the capped worst case: refused at start, naming what the call would reserve.
    await grant(owner, '9.5');
    const refused = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'hello' });
    expect(refused.statusCode, refused.body).toBe(402);
    expect(refused.json<{ detail: string }>().detail).toMatch(/^Not enough credits to start this run: available 9.5; its first step with fake-capped needs up to 10$/);
    // Exactly the capped worst case (far less than the default's): the run starts, and its call's reservation passes too.
    await grant(owner, '0.5');
    fake.script('fake-capped', { text: 'Hi.', usage: { prompt_tokens: 3, completion_tokens: 2 } });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'hello' });
    expect(await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed'])).toMatchObject({ status: 'completed', cost: '2' });
    expect(fake.requestsFor('fake-capped').map((r) => r.body.max_tokens)).toEqual([10]);
  });

  /** A model `id` that costs 1 credit per input token (output free, at most 10), a new user's default agent on it, and a thread of theirs. */
  async function inputBilledThread(id: string) {
    const priced = await api('POST', '/models', admin, { id, provider: 'fake', max_output_tokens: 10, pricing: { input_cost_per_million_tokens: '1000000', output_cost_per_million_tokens: '0' } });
    expect(priced.statusCode, priced.body).toBe(200);
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { model: id, is_default: true });
    return { owner, thread: await createThread(ctx.app, owner.headers) };
  }

  it('the start check estimates a prompt outside ASCII by its bytes, as the call will: 80 CJK characters need 100 input tokens, not 20', async () => {
    const { owner, thread } = await inputBilledThread('fake-input-billed');
    await grant(owner, '90');
    // 'Be brief.' (9 ASCII characters, 2¼ tokens) + 80 CJK characters (100): 103 (4 characters a token said 23).
    const refused = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: '数据'.repeat(40) });
    expect(refused.statusCode, refused.body).toBe(402);
    expect(refused.json<{ detail: string }>().detail).toMatch(/^Not enough credits to start this run: available 90; its first step with fake-input-billed needs up to 103$/);
    expect(fake.log).toHaveLength(0);
  });

  it("a run on a thread with history: the start check counts the thread's messages, as the first step's prompt will carry them", async () => {
    const { owner, thread } = await inputBilledThread('fake-history-billed');
    for (const message of [
      { role: 'user', content: 'x'.repeat(400) }, // 100 tokens
      { role: 'user', content: '数据'.repeat(40) }, // 100 tokens
    ]) {
      const added = await api('POST', `/threads/${thread.id}/messages`, owner.headers, message);
      expect(added.statusCode, added.body).toBe(200);
    }
    await grant(owner, '150');
    // 'Be brief.' (2¼) + the history (200) + 'hello' (1¼): 204; the new input alone would have needed 4.
    const refused = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'hello' });
    expect(refused.statusCode, refused.body).toBe(402);
    expect(refused.json<{ detail: string }>().detail).toMatch(/^Not enough credits to start this run: available 150; its first step with fake-history-billed needs up to 204$/);
    expect((await api('GET', `/threads/${thread.id}/runs`, owner.headers)).json<{ count: number }>().count).toBe(0);
    expect((await api('GET', `/threads/${thread.id}/messages`, owner.headers)).json<{ count: number }>().count).toBe(2);
    expect(fake.log).toHaveLength(0);
    // Enough for the call's own estimate (which counts the messages' framing too): it runs.
    await grant(owner, '100');
    fake.script('fake-history-billed', { text: 'Hi.', usage: { prompt_tokens: 210, completion_tokens: 2 } });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'hello' });
    expect(await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed'])).toMatchObject({ status: 'completed', cost: '210' });

    // A retry runs on the thread too: its check counts the history, its stored input once.
    await grant(owner, '200');
    fake.script('fake-history-billed', { status: 400 });
    const failing = await startRun(ctx.app, owner.headers, thread.id, { input: 'again' });
    expect(await waitForRun(ctx.app, owner.headers, failing.id, ['completed', 'failed'])).toMatchObject({ status: 'failed', cost: '0' });
    const adjusted = await api('POST', '/billing/credits', admin, { user_id: owner.user.id, amount: '-210', type: 'adjustment', description: 'test' });
    expect(adjusted.statusCode, adjusted.body).toBe(200);
    // 'Be brief.' (2¼) + the history: 400 + 80 CJK + 'hello' + 'Hi.' + 'again' (100 + 100 + 3¼): 205½ → 206.
    const retried = await api('POST', `/runs/${failing.id}/retry`, owner.headers);
    expect(retried.statusCode, retried.body).toBe(402);
    expect(retried.json<{ detail: string }>().detail).toMatch(/^Not enough credits to start this run: available 30; its first step with fake-history-billed needs up to 206$/);
  });

  it('a later step the credits cannot cover fails the run with "not enough credits"; a tool without an implementation answers the model with an error', async () => {
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { model: 'fake-billed', max_output_tokens: 10, tools: ['knowledge_search'], is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    await grant(owner, '15');
    fake.script('fake-billed', { toolCalls: [{ id: 'call_1', name: 'knowledge_search', arguments: '{"query":"q"}' }], usage: { prompt_tokens: 3, completion_tokens: 8 } });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'search then answer' });
    const final = await waitForRun(ctx.app, owner.headers, run.id, ['failed', 'completed']);
    expect(final.status).toBe('failed');
    expect(final.error).toMatch(/^Not enough credits/);
    expect(final).toMatchObject({ steps: 1, cost: '8' });
    const { events } = await readEvents(base, owner.headers, run.id);
    expect(events.find((e) => e.event === 'tool.result')!.data).toMatchObject({ name: 'knowledge_search', is_error: true, content: 'Error: the tool knowledge_search is not available on this server' });
    expect(fake.requestsFor('fake-billed')).toHaveLength(1);
    await ctx.app.meter.idle();
    const account = await getBalance(ctx.database.db, owner.user.id);
    expect(Number(account.balance)).toBe(7);
    expect(Number(account.reserved)).toBe(0);
    expect(await ledgerSum(ctx.database.db, owner.user.id)).toBe(account.balance);
  });

  it('the deadline (RUN_TIMEOUT_SECONDS) aborts a hanging model call and fails the run in words', async () => {
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    await grant(owner, '100');
    fake.script('fake-precise', { hang: true });
    // Every write of the run as a reader could see it once committed: polling could miss the moment
    // between its end and a later write of its totals.
    const { db } = ctx.database;
    await db.execute(sql`create table run_writes (run_id uuid not null, status text not null, cost numeric not null)`);
    await db.execute(sql.raw(`create function record_run_write() returns trigger language plpgsql as $$ begin insert into run_writes values (new.id, new.status, new.cost); return null; end $$`));
    await db.execute(sql`create trigger record_run_write after update on runs for each row execute function record_run_write()`);
    const started = Date.now();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'never answered' });
    const final = await waitForRun(ctx.app, owner.headers, run.id, ['failed'], 5_000).finally(async () => {
      await db.execute(sql`drop trigger record_run_write on runs`);
      await db.execute(sql`drop function record_run_write()`);
    });
    expect(Date.now() - started).toBeLessThan(3_000);
    expect(final.error).toBe('The run passed its deadline of 1 s (RUN_TIMEOUT_SECONDS) and was stopped');
    await fake.waitFor((log) => log[0]!.aborted, 1_000);
    expect((await api('GET', `/threads/${thread.id}`, owner.headers)).json<{ status: string }>().status).toBe('idle');
    // The stopped call was charged for its prompt (the provider had it): the run's cost says so, as the ledger does.
    expect(Number(final.cost)).toBeGreaterThan(0);
    expect(final.usage.input_tokens).toBeGreaterThan(0);
    expect(Number((await getBalance(ctx.database.db, owner.user.id)).balance)).toBeCloseTo(100 - Number(final.cost), 12);
    // It failed and showed that cost in one write: no reader saw it failed and free.
    const writes = await db.execute(sql`select status, cost::text as cost from run_writes where run_id = ${run.id} and status <> 'running'`).then((r) => (r as { rows: { status: string; cost: string }[] }).rows);
    expect(writes.length).toBeGreaterThan(0);
    for (const write of writes) expect(Number(write.cost), write.status).toBe(Number(final.cost));
    await db.execute(sql`drop table run_writes`);
  });

  it('a cancelled run shows what its calls were charged, the one stopped mid-stream included', async () => {
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { model: 'fake-billed', max_output_tokens: 50, tools: ['knowledge_search'], is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    await grant(owner, '1000');
    fake.script(
      'fake-billed',
      { toolCalls: [{ id: 'call_1', name: 'knowledge_search', arguments: '{"query":"q"}' }], usage: { prompt_tokens: 3, completion_tokens: 8 } },
      { chunks: Array.from({ length: 40 }, (_, i) => `w${i} `), chunkDelayMs: 100 },
    );
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'search then answer slowly' });
    await fake.waitFor((log) => log.length === 2 && log[1]!.chunksSent >= 3, 5_000);
    expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).statusCode).toBe(200);
    // The run's final event comes once the worker has written what the stopped call cost (the events end with it).
    const { events } = await readEvents(base, owner.headers, run.id);
    expect(events.at(-1)!.event).toBe('run.cancelled');
    // Step 1: 8 output tokens at 1 credit each. The stopped step: its streamed words, estimated, at least 3 of them.
    const paid = 1000 - Number((await getBalance(ctx.database.db, owner.user.id)).balance);
    expect(paid).toBeGreaterThan(8);
    const final = (await api('GET', `/runs/${run.id}`, owner.headers)).json<{ status: string; cost: string; usage: { output_tokens: number } }>();
    expect(final).toMatchObject({ status: 'cancelled', cost: String(paid) });
    expect(final.usage.output_tokens).toBe(paid); // input is free on fake-billed
    expect((events.at(-1)!.data as unknown as { run: { cost: string } }).run.cost).toBe(String(paid)); // as GET /runs/{id} shows money
  });
});
