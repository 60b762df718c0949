/**
 * A streamed /v1 chat completion outlives its request's authentication: once its API key is revoked
 * or deleted, or its user deactivated or deleted, it ends at the next look of its watcher
 * (RUN_EVENTS_KEEPALIVE_SECONDS, as a run-event stream does) with a 401 error event, its upstream
 * request aborted, and its call metered and charged for what it streamed, rather than running on to
 * the model's end. A streamed `agent:` completion likewise, its run cancelled as a client's leaving
 * cancels it. Real HTTP, a slow fake model.
 */
import { and, eq } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';

import { creditTransactions, runs, usageRecords } from '../../src/models/index.js';

import { getBalance, ledgerSum } from '../../src/crud/billing.js';
import { useTestApp } from '../helpers/app.js';
import { bearer, createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { apiOf, createKey, sleep, xApiKey } from '../helpers/http.js';
import { createAgent, useRunServer } from '../helpers/runs.js';

// A look every second: a stream whose credential stops working ends within about two.
const ctx = useTestApp({ RUN_EVENTS_KEEPALIVE_SECONDS: '1', BILLING_ENABLED: 'true', USAGE_FLUSH_INTERVAL_MS: '20', MODEL_MAX_RETRIES: '0' });
const server = useRunServer(ctx);
const api = apiOf(ctx);

const MODEL = 'fake-precise';
// 100 chunks 100 ms apart: a 10 s answer, longer than any stream here is let run (ENDED_WITHIN_MS
// after its 5th chunk), which is well into it half a second in.
const SLOW = { chunks: Array.from({ length: 100 }, (_, i) => `w${i} `), chunkDelayMs: 100, usage: { prompt_tokens: 5, completion_tokens: 100 } };
/** 20 chunks 200 ms apart: a 4 s answer, some four looks, for the streams that run to their end. */
const WHOLE = { ...SLOW, chunks: SLOW.chunks.slice(0, 20), chunkDelayMs: 200 };
/** Where a stream that ends on its own must have ended by (its credential checked some 8 times meanwhile). */
const ENDED_WITHIN_MS = 6_000;
const GRANT = 100;
const INVALID_API_KEY = { message: 'Incorrect API key provided.', type: 'invalid_request_error', param: null, code: 'invalid_api_key' };

interface ReadStream {
  status: number;
  text: string;
  endedAt: number;
  /** An agent completion's run (x-keel-run-id). */
  runId: string | null;
  headers: Headers;
}

/** A completion of `model` (streamed unless told) over real HTTP, read to its end (or 40 s, whichever comes first). */
async function readCompletion(headers: Record<string, string>, model = MODEL, stream = true): Promise<ReadStream> {
  const response = await fetch(`${server.base}/v1/chat/completions`, {
    method: 'POST',
    headers: { ...headers, 'content-type': 'application/json' },
    body: JSON.stringify({ model, stream, messages: [{ role: 'user', content: 'Count' }] }),
    signal: AbortSignal.timeout(40_000),
  });
  let text = '';
  const decoder = new TextDecoder();
  for await (const piece of response.body!) text += decoder.decode(piece as Uint8Array, { stream: true });
  return { status: response.status, text, endedAt: Date.now(), runId: response.headers.get('x-keel-run-id'), headers: response.headers };
}

/** The stream's last event is the 401 any call with its credential now gets, in OpenAI's shape; no [DONE]. */
function expectEndedUnauthenticated(text: string, error = INVALID_API_KEY): void {
  expect(text).toContain('data: {"id"');
  expect(text.trimEnd().split('\n\n').at(-1)).toBe(`data: ${JSON.stringify({ error })}`);
  expect(text).not.toContain('data: [DONE]');
}

async function fundedUser(admin: Record<string, string>): Promise<TestUser> {
  const user = await createUser(ctx.app);
  const granted = await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount: String(GRANT), description: 'test credits' });
  expect(granted.statusCode, granted.body).toBe(200);
  return user;
}

/** The user's one usage record, written; the ledger's charge for it; nothing held; the balance the ledger's sum and the grant less the cost. */
async function expectSettled(userId: string): Promise<{ status: string; output_tokens: number; cost: string }> {
  await ctx.app.meter.idle();
  const records = await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.owner_id, userId));
  expect(records).toHaveLength(1);
  const record = records[0]!;
  const charges = await ctx.database.db
    .select({ amount: creditTransactions.amount })
    .from(creditTransactions)
    .where(and(eq(creditTransactions.owner_id, userId), eq(creditTransactions.usage_record_id, record.id)));
  expect(charges.map((c) => Number(c.amount))).toEqual([-Number(record.cost)]);
  const account = await getBalance(ctx.database.db, userId);
  expect(Number(account.reserved)).toBe(0);
  expect(await ledgerSum(ctx.database.db, userId)).toBe(account.balance);
  expect(Number(account.balance)).toBeCloseTo(GRANT - Number(record.cost), 9);
  return record;
}

describe('a streamed /v1 chat completion whose credential stops working mid-stream', () => {
  it.each([
    ['its API key revoked', 'key', (user: TestUser, keyId: string) => api('PATCH', `/api-keys/${keyId}`, user.headers, { status: 'revoked' })],
    ['its API key deleted', 'key', (user: TestUser, keyId: string) => api('DELETE', `/api-keys/${keyId}`, user.headers)],
    ['its user deactivated (an API key)', 'key', (user: TestUser, _keyId: string, admin: Record<string, string>) => api('PATCH', `/users/${user.user.id}`, admin, { is_active: false })],
    ['its user deactivated (an access token)', 'token', (user: TestUser, _keyId: string, admin: Record<string, string>) => api('PATCH', `/users/${user.user.id}`, admin, { is_active: false })],
  ] as const)(
    'ends within a few looks once %s: a 401 error event, no [DONE], the upstream request aborted, the call recorded and charged for what it streamed',
    async (_label, credential, stopWorking) => {
      const { fake } = server;
      const admin = await superuserHeaders(ctx.app);
      const user = await fundedUser(admin);
      const key = await createKey(ctx.app, user);
      fake.script(MODEL, SLOW);
      const reading = readCompletion(credential === 'key' ? xApiKey(key.key) : bearer(user.token));
      // Well into the answer before the credential stops working.
      await fake.waitFor((log) => (log[0]?.chunksSent ?? 0) >= 5, 10_000);
      const stoppedAt = Date.now();
      expect((await stopWorking(user, key.id, admin)).statusCode).toBe(200);
      const { status, text, endedAt } = await reading;
      expect(status).toBe(200);
      expect(endedAt - stoppedAt).toBeLessThan(ENDED_WITHIN_MS);
      expectEndedUnauthenticated(text);
      await fake.waitFor((log) => log[0]!.aborted, 5_000);
      expect(fake.log[0]).toMatchObject({ completed: false, aborted: true });
      expect(fake.log[0]!.chunksSent).toBeLessThan(SLOW.chunks.length);
      const record = await expectSettled(user.user.id);
      expect(record.status).toBe('aborted');
      // Charged for the chunks it streamed (estimated: the usage would have come at the end).
      expect(record.output_tokens).toBeGreaterThan(0);
      expect(Number(record.cost)).toBeGreaterThan(0);
    },
    30_000,
  );

  it('ends once its user is deleted: the upstream request aborted, nothing left held', async () => {
    const { fake } = server;
    const admin = await superuserHeaders(ctx.app);
    const user = await fundedUser(admin);
    fake.script(MODEL, SLOW);
    const reading = readCompletion(user.headers);
    await fake.waitFor((log) => (log[0]?.chunksSent ?? 0) >= 5, 10_000);
    const stoppedAt = Date.now();
    expect((await api('DELETE', `/users/${user.user.id}`, admin)).statusCode).toBe(200);
    const { text, endedAt } = await reading;
    expect(endedAt - stoppedAt).toBeLessThan(ENDED_WITHIN_MS);
    expect(text).not.toContain('data: [DONE]');
    await fake.waitFor((log) => log[0]!.aborted, 5_000);
    await ctx.app.meter.idle();
    // The deleted user's record goes with the user (admin-in-flight.test.ts); its hold does not stay.
    expect(await getBalance(ctx.database.db, user.user.id)).toEqual({ balance: '0', reserved: '0' });
  }, 30_000);

  it("runs to its end while its credential works, another key of the user's revoked meanwhile", async () => {
    const { fake } = server;
    const admin = await superuserHeaders(ctx.app);
    const user = await fundedUser(admin);
    const [used, other] = [await createKey(ctx.app, user, { name: 'used' }), await createKey(ctx.app, user, { name: 'other' })];
    fake.script(MODEL, WHOLE);
    const reading = readCompletion(xApiKey(used.key));
    await fake.waitFor((log) => (log[0]?.chunksSent ?? 0) >= 2, 10_000);
    expect((await api('PATCH', `/api-keys/${other.id}`, user.headers, { status: 'revoked' })).statusCode).toBe(200);
    const { text } = await reading;
    expect(text).toContain('data: [DONE]');
    expect(text).not.toContain('"error"');
    expect(fake.log[0]).toMatchObject({ completed: true, aborted: false });
    expect((await expectSettled(user.user.id)).status).toBe('success');
  }, 30_000);
});

/** How long an agent test's key lives when its expiry is what stops it: past the stream's first few chunks. */
const KEY_LIFETIME_MS = 3_000;

/** What stops a credential working (the user's, their key's id, a superuser's headers). */
type StopWorking = (user: TestUser, keyId: string, admin: Record<string, string>) => Promise<{ statusCode: number }>;
type CredentialLoss = readonly [label: string, credential: 'key' | 'token' | 'expiring key', stopWorking: StopWorking];

/** Ways an agent completion's credential stops working mid-run, and the credential each is tried with. */
const AGENT_CREDENTIAL_LOSSES: readonly CredentialLoss[] = [
  ['its API key revoked', 'key', (user: TestUser, keyId: string) => api('PATCH', `/api-keys/${keyId}`, user.headers, { status: 'revoked' })],
  ['its API key deleted', 'key', (user: TestUser, keyId: string) => api('DELETE', `/api-keys/${keyId}`, user.headers)],
  ['its user deactivated (an API key)', 'key', (user: TestUser, _keyId: string, admin: Record<string, string>) => api('PATCH', `/users/${user.user.id}`, admin, { is_active: false })],
  ['its user deactivated (an access token)', 'token', (user: TestUser, _keyId: string, admin: Record<string, string>) => api('PATCH', `/users/${user.user.id}`, admin, { is_active: false })],
  // Neither cancels the user's runs by itself: only the completion's watcher sees them.
  ['its access token outdated (the password changed)', 'token', (user: TestUser) => api('PATCH', '/users/me/password', user.headers, { current_password: user.password, new_password: 'another-password-1' })],
  ['its API key expired', 'expiring key', async () => {
    await sleep(KEY_LIFETIME_MS);
    return { statusCode: 200 };
  }],
];

/**
 * An agent completion, streamed or not, whose credential `stopWorking` stops well into its run's
 * slow answer, read to its end: which comes within a few looks, its run cancelled, its model call
 * aborted and charged for what it streamed (nothing left running for nobody).
 */
async function agentCompletionLosing([, credential, stopWorking]: CredentialLoss, stream: boolean): Promise<ReadStream & { credential: Record<string, string> }> {
  const { fake } = server;
  const admin = await superuserHeaders(ctx.app);
  const user = await fundedUser(admin);
  const agent = await createAgent(ctx.app, user.headers);
  const key = await createKey(ctx.app, user, credential === 'expiring key' ? { name: 'brief', expires_at: new Date(Date.now() + KEY_LIFETIME_MS).toISOString() } : { name: 'key' });
  fake.script(MODEL, SLOW);
  const headers = credential === 'token' ? bearer(user.token) : xApiKey(key.key);
  const reading = readCompletion(headers, `agent:${agent.id}`, stream);
  await fake.waitFor((log) => (log[0]?.chunksSent ?? 0) >= 5, 10_000);
  const stoppedAt = Date.now();
  expect((await stopWorking(user, key.id, admin)).statusCode).toBe(200);
  const read = await reading;
  expect(read.endedAt - stoppedAt).toBeLessThan(ENDED_WITHIN_MS);
  await fake.waitFor((log) => log[0]!.aborted, 5_000);
  expect(fake.log[0]).toMatchObject({ completed: false, aborted: true });
  const [run] = await ctx.database.db.select().from(runs).where(eq(runs.id, read.runId!));
  expect(run!.status).toBe('cancelled');
  const record = await expectSettled(user.user.id);
  expect(record.status).toBe('aborted');
  expect(Number(record.cost)).toBeGreaterThan(0);
  return { ...read, credential: headers };
}

describe('an agent: completion whose credential stops working mid-run', () => {
  it.each(AGENT_CREDENTIAL_LOSSES)(
    'streamed, ends within a few looks once %s: a 401 error event, no [DONE], its run cancelled, its model call aborted and charged for what it streamed',
    async (...loss) => {
      const { status, text } = await agentCompletionLosing(loss, true);
      expect(status).toBe(200);
      expectEndedUnauthenticated(text, INVALID_API_KEY);
    },
    30_000,
  );

  // Its socket takes nothing before the answer: only the credential is watched, at the same pace.
  it.each(AGENT_CREDENTIAL_LOSSES)(
    'not streamed, answers within a few looks once %s: the same 401 (not a cancelled run\'s 409, nor the run\'s end), its run cancelled, its model call aborted and charged',
    async (...loss) => {
      const { status, text, headers, credential } = await agentCompletionLosing(loss, false);
      expect(status).toBe(401);
      expect(headers.get('x-should-retry')).toBe('false');
      expect(JSON.parse(text)).toEqual({ error: INVALID_API_KEY });
      // Word for word and header for header what a plain model's call with that credential now gets.
      const plain = await readCompletion(credential, MODEL, false);
      expect([plain.status, JSON.parse(plain.text)]).toEqual([401, { error: INVALID_API_KEY }]);
      expect(headers.get('www-authenticate')).toBe(plain.headers.get('www-authenticate'));
      expect(headers.get('www-authenticate')).toBe('Bearer');
    },
    30_000,
  );

  it("runs to its end while its credential works: another key of the user's revoked, the user's deletion refused (409) meanwhile", async () => {
    const { fake } = server;
    const admin = await superuserHeaders(ctx.app);
    const user = await fundedUser(admin);
    const agent = await createAgent(ctx.app, user.headers);
    const [used, other] = [await createKey(ctx.app, user, { name: 'used' }), await createKey(ctx.app, user, { name: 'other' })];
    fake.script(MODEL, WHOLE);
    const reading = readCompletion(xApiKey(used.key), `agent:${agent.id}`);
    await fake.waitFor((log) => (log[0]?.chunksSent ?? 0) >= 2, 10_000);
    expect((await api('PATCH', `/api-keys/${other.id}`, user.headers, { status: 'revoked' })).statusCode).toBe(200);
    // A user is not deleted under a running run (deactivating them is what cancels it): the stream's credential still works.
    expect((await api('DELETE', `/users/${user.user.id}`, admin)).statusCode).toBe(409);
    const { text, runId } = await reading;
    expect(text).toContain('data: [DONE]');
    expect(text).not.toContain('"error"');
    expect(fake.log[0]).toMatchObject({ completed: true, aborted: false });
    const [run] = await ctx.database.db.select().from(runs).where(eq(runs.id, runId!));
    expect(run!.status).toBe('completed');
    expect((await expectSettled(user.user.id)).status).toBe('success');
  }, 30_000);
});
