import { eq } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';

import { creditTransactions, usageRecords } from '../../src/models/index.js';

import { getBalance } from '../../src/crud/billing.js';
import { addCosts } from '../../src/modules/ai-models/index.js';
import { useTestApp } from '../helpers/app.js';
import { bearer, createProject, createUser, type TestUser } from '../helpers/factories.js';
import type { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey } from '../helpers/http.js';
import { useFakeModels } from '../helpers/metered-models.js';
import { createAgent, createThread, startRun, waitForRun } from '../helpers/runs.js';

// The meter's timer would write a minute after a call: what a read shows, it shows because the read (or the run's end) had it written.
const ctx = useTestApp({ BILLING_ENABLED: 'true', USAGE_FLUSH_INTERVAL_MS: '60000', MODEL_MAX_RETRIES: '0' }, { tools: { knowledge_search: undefined } });
const api = apiOf(ctx);
let admin: Record<string, string>;
let fake: FakeModelServer;

useFakeModels(ctx, (server, headers) => {
  fake = server;
  admin = headers;
});

async function fundedUser(amount: string): Promise<TestUser> {
  const user = await createUser(ctx.app);
  const granted = await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount, description: 'test credits' });
  expect(granted.statusCode, granted.body).toBe(200);
  return user;
}

describe('what a client reads right after a call', () => {
  it('the balance, the ledger and the usage summary read after a /v1 call show it (no wait for the meter)', async () => {
    const user = await fundedUser('100');
    const { key } = await createKey(ctx.app, user);
    const answered = await ctx.app.inject({
      method: 'POST',
      url: '/v1/chat/completions',
      headers: bearer(key),
      payload: { model: 'fake-billed', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 10 },
    });
    expect(answered.statusCode, answered.body).toBe(200);
    // `fake-billed`: input free, 1 credit per output token.
    const cost = String(answered.json<{ usage: { completion_tokens: number } }>().usage.completion_tokens);
    expect(Number(cost)).toBeGreaterThan(0);

    const balance = await api('GET', '/billing/balance', user.headers);
    // Nothing held any more: the credit window's block with no call in it went back too.
    expect(balance.json()).toEqual({ balance: addCosts('100', `-${cost}`), reserved: '0', available: addCosts('100', `-${cost}`), billing_enabled: true });
    const ledger = (await api('GET', '/billing/transactions', user.headers)).json<{ data: { type: string; amount: string }[] }>();
    expect(ledger.data[0]).toMatchObject({ type: 'usage', amount: `-${cost}` });
    const summary = (await api('GET', '/billing/summary', user.headers)).json<{ total: { calls: number; cost: string } }>();
    expect(summary.total).toMatchObject({ calls: 1, cost });
  });

  it('reads sent together after calls all show them: the one that finds a write under way waits for it', async () => {
    const user = await fundedUser('100');
    const { key } = await createKey(ctx.app, user);
    let cost = '0';
    for (let i = 0; i < 3; i++) {
      const answered = await ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: bearer(key), payload: { model: 'fake-billed', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 10 } });
      expect(answered.statusCode, answered.body).toBe(200);
      cost = addCosts(cost, String(answered.json<{ usage: { completion_tokens: number } }>().usage.completion_tokens));
    }
    // A dashboard's three reads at once: the first starts the write, the others must not read before it
    // commits (on PostgreSQL: PGlite's one connection runs their statements after it anyway).
    const [balance, ledger, summary] = await Promise.all([
      api('GET', '/billing/balance', user.headers),
      api('GET', '/billing/transactions', user.headers),
      api('GET', '/billing/summary', user.headers),
    ]);
    expect(balance.json<{ balance: string }>().balance).toBe(addCosts('100', `-${cost}`));
    expect(ledger.json<{ count: number }>().count).toBe(4);
    expect(summary.json<{ total: { calls: number; cost: string } }>().total).toMatchObject({ calls: 3, cost });
  });

  it("a project-scoped key's calls are its project's: its ledger and summary show them alone, its balance is the account's", async () => {
    const user = await fundedUser('100');
    const project = await createProject(ctx.app, user.headers);
    const scoped = await createKey(ctx.app, user, { name: 'scoped', project_id: project.id });
    const whole = await createKey(ctx.app, user, { name: 'whole' });
    const costOf = async (key: string) => {
      const answered = await ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: bearer(key), payload: { model: 'fake-billed', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 10 } });
      expect(answered.statusCode, answered.body).toBe(200);
      return String(answered.json<{ usage: { completion_tokens: number } }>().usage.completion_tokens);
    };
    const inProject = await costOf(scoped.key);
    const outside = await costOf(whole.key);
    const ledger = (await api('GET', '/billing/transactions', bearer(scoped.key))).json<{ count: number; data: { type: string; amount: string }[] }>();
    expect(ledger.count).toBe(1);
    expect(ledger.data[0]).toMatchObject({ type: 'usage', amount: `-${inProject}` });
    expect((await api('GET', '/billing/summary', bearer(scoped.key))).json<{ total: { calls: number; cost: string } }>().total).toMatchObject({ calls: 1, cost: inProject });
    const left = addCosts('100', `-${addCosts(inProject, outside)}`);
    expect((await api('GET', '/billing/balance', bearer(scoped.key))).json<{ balance: string }>().balance).toBe(left);
    expect((await api('GET', '/billing/transactions', user.headers)).json<{ count: number }>().count).toBe(3);
  });

  it("a key's spent read right after its calls shows them, and a max_budget set then counts them", async () => {
    const user = await fundedUser('100');
    const read = await createKey(ctx.app, user, { name: 'read' });
    const capped = await createKey(ctx.app, user, { name: 'capped' });
    const chat = (key: string) =>
      ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: bearer(key), payload: { model: 'fake-billed', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 10 } });
    fake.defaultReply = { text: 'five', usage: { prompt_tokens: 1, completion_tokens: 5 } };
    try {
      // A key without a budget has its spend moved with the usage batch (a minute away here).
      for (let i = 0; i < 2; i++) expect((await chat(read.key)).statusCode).toBe(200);
      expect((await api('GET', `/api-keys/${read.id}`, user.headers)).json()).toMatchObject({ spent: '10' });
      expect((await chat(read.key)).statusCode).toBe(200);
      const listed = (await api('GET', '/api-keys', user.headers)).json<{ data: { id: string; spent: string }[] }>().data;
      expect(listed.find((k) => k.id === read.id)).toMatchObject({ spent: '15' });

      for (let i = 0; i < 2; i++) expect((await chat(capped.key)).statusCode).toBe(200);
      const patched = await api('PATCH', `/api-keys/${capped.id}`, user.headers, { max_budget: '12' });
      expect(patched.json()).toMatchObject({ max_budget: '12', spent: '10' });
      // 2 left of the budget cannot cover a call's worst case of 10.
      const refused = await chat(capped.key);
      expect(refused.statusCode, refused.body).toBe(402);
      expect(refused.json<{ error: { message: string } }>().error.message).toBe('API key budget exceeded: max_budget 12, spent 10; this call to fake-billed needs up to 10');
    } finally {
      fake.defaultReply = { text: 'Hello from the fake model.', usage: { prompt_tokens: 10, completion_tokens: 5 } };
    }
  });

  it("a superuser's adjustment right after a user's call is not refused for the credit this process still holds of the account", async () => {
    const user = await fundedUser('100');
    const { key } = await createKey(ctx.app, user);
    fake.script('fake-billed', { text: 'one', usage: { prompt_tokens: 1, completion_tokens: 1 } });
    const answered = await ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: bearer(key), payload: { model: 'fake-billed', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 1 } });
    expect(answered.statusCode, answered.body).toBe(200);
    // The call took a credit window's block (32 of the 100) and is over: nothing is in progress.
    const adjusted = await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount: '-90', type: 'adjustment', description: 'correction' });
    expect(adjusted.statusCode, adjusted.body).toBe(200);
    expect(adjusted.json()).toMatchObject({ type: 'adjustment', amount: '-90', balance_after: '9' });
    expect((await api('GET', '/billing/balance', user.headers)).json()).toMatchObject({ balance: '9', reserved: '0' });
  });

  it("a cancelled run's final event comes after its stopped call's usage is written", async () => {
    const user = await fundedUser('100');
    await createAgent(ctx.app, user.headers, { model: 'fake-billed', max_output_tokens: 10, is_default: true });
    const thread = await createThread(ctx.app, user.headers);
    fake.script('fake-billed', { chunks: Array.from({ length: 50 }, (_, i) => `t${i} `), chunkDelayMs: 100 });
    const run = await startRun(ctx.app, user.headers, thread.id, { input: 'long' });
    await fake.waitFor((log) => log.some((r) => r.model === 'fake-billed' && r.chunksSent >= 2));
    expect((await api('POST', `/runs/${run.id}/cancel`, user.headers)).statusCode).toBe(200);
    // The event stream ends with run.cancelled, which the run's worker writes once its call has stopped.
    const events = await ctx.app.inject({ method: 'GET', url: `/api/v1/runs/${run.id}/events`, headers: user.headers });
    expect(events.body).toMatch(/event: run\.cancelled/);
    const rows = await ctx.database.db.select({ status: usageRecords.status }).from(usageRecords).where(eq(usageRecords.run_id, run.id));
    expect(rows).toEqual([{ status: 'aborted' }]);
  });

  it('a run is seen completed with its calls charged: its ledger entries and usage rows are written by then', async () => {
    const user = await fundedUser('100');
    await createAgent(ctx.app, user.headers, { model: 'fake-billed', max_output_tokens: 10, is_default: true });
    const thread = await createThread(ctx.app, user.headers);
    const run = await startRun(ctx.app, user.headers, thread.id, { input: 'hello' });
    const ended = await waitForRun(ctx.app, user.headers, run.id, ['completed', 'failed']);
    expect(ended.status).toBe('completed');
    expect(Number(ended.cost)).toBeGreaterThan(0);
    // Read from the database, not through the billing routes (which write what is pending themselves).
    const db = ctx.database.db;
    expect(Number((await getBalance(db, user.user.id)).balance)).toBe(100 - Number(ended.cost));
    expect(await db.select({ amount: creditTransactions.amount }).from(creditTransactions).where(eq(creditTransactions.owner_id, user.user.id))).toHaveLength(2);
    expect(await db.select({ id: usageRecords.id }).from(usageRecords).where(eq(usageRecords.run_id, run.id))).toHaveLength(1);
    expect(fake.log).toHaveLength(1);
  });
});
