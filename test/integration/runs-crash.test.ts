import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { FakeModelServer } from '../helpers/fake-model-server.js';
import { eventually } from '../helpers/http.js';
import { freePort, killLeftovers, migratedDataDir, startLocalKeel } from '../helpers/process.js';
import { expectIncreasing, FINAL_EVENTS, json, messagesOf, readEvents, type RunBody, startRunWithThread, userWithAgent } from '../helpers/runs.js';

// The real CLI (`keel start`, embedded) killed with SIGKILL or stopped with SIGTERM mid-run, then
// started again on the same data directory: the run is taken up again, never left running.
const scratch = mkdtempSync(join(tmpdir(), 'keel-runs-crash-'));
const PASSWORD = 'crash-test-password';
const MODEL = 'gpt-4.1';
// Two `keel start`s and a streamed run: seconds on a quiet machine, but each start loads the whole
// server and PGlite, and on a shared 2-core CI machine the default 30 s ran out (the other process
// tests allow minutes too). The waits that matter keep their own deadlines (`eventually`).
const PROCESS_TEST_TIMEOUT_MS = 120_000;
let fake: FakeModelServer;

beforeAll(async () => {
  fake = await FakeModelServer.start();
});
afterEach(killLeftovers);
afterAll(async () => {
  await fake?.close();
  rmSync(scratch, { recursive: true, force: true });
});

function start(dataDir: string, port: number, env: Record<string, string> = {}) {
  return startLocalKeel(dataDir, port, {
    FIRST_SUPERUSER: 'admin@crash.test',
    FIRST_SUPERUSER_PASSWORD: PASSWORD,
    OPENAI_API_KEY: 'sk-fake',
    OPENAI_BASE_URL: fake.url,
    RUN_LEASE_SECONDS: '2',
    RUN_SWEEP_INTERVAL_SECONDS: '1',
    ...env,
  });
}

/** A user with a default agent on MODEL and a run started on a new thread. */
async function userWithRun(base: string, email: string) {
  const headers = await userWithAgent(base, email, PASSWORD, MODEL);
  return { headers, run: await startRunWithThread(base, headers, 'tell me a long story') };
}

/**
 * A new data directory (its database already migrated: the restart is under test, not the first
 * start) with `keel start` on it, a user, and a run the fake model streams slowly; `then` is the
 * model's next answer.
 */
async function runMidStream(name: string, then: string, chunksBefore: number, env: Record<string, string> = {}) {
  fake.reset();
  fake.script(MODEL, { chunks: Array.from({ length: 100 }, (_, i) => `w${i} `), chunkDelayMs: 100 }, { text: then });
  const dataDir = await migratedDataDir(join(scratch, name));
  const port = await freePort();
  const first = await start(dataDir, port, env);
  const { headers, run } = await userWithRun(first.base, `${name}@crash.test`);
  await fake.waitFor((log) => log.some((r) => r.chunksSent >= chunksBefore), 10_000);
  return { first, headers, run, restart: () => start(dataDir, port) };
}

describe('embedded process stopped mid-run', () => {
  it('kill -9, then a restart: the run is resumed once its lease expires and completes with one answer; a reader that saw unstored events misses nothing of it', async () => {
    // Deltas wait for the flush timer before they are stored; readers get them at once. A long
    // timer makes sure the reader below saw events the database never got.
    const { first, headers, run, restart } = await runMidStream('kill', 'the resumed story', 5, { RUN_EVENTS_FLUSH_MS: '10000' });
    const seen = await readEvents(first.base, headers, run.id, { limit: 6 });
    expect(seen.events.filter((e) => e.event === 'message.delta').length).toBeGreaterThanOrEqual(2);
    const lastSeen = seen.events.at(-1)!.id;
    first.child.process.kill('SIGKILL');
    await first.child.ended;

    const second = await restart();
    await eventually(async () => (await json<RunBody>(second.base, 'GET', `/runs/${run.id}`, headers)).body.status !== 'running', 20_000);
    const final = (await json<RunBody>(second.base, 'GET', `/runs/${run.id}`, headers)).body;
    expect(final).toMatchObject({ status: 'completed', steps: 1 });
    // Taken up again: its second attempt, or its first when the kill took the claim with it (the
    // claim commits without waiting for the disk, and no event was stored since: docs/decisions.md).
    expect([1, 2]).toContain(final.attempts);
    const answers = (await messagesOf(second.base, headers, run.thread_id)).filter((m) => m.role === 'assistant');
    expect(answers.map((m) => m.content)).toEqual(['the resumed story']);
    const { events } = await readEvents(second.base, headers, run.id);
    expectIncreasing(events);
    expect(events.filter((e) => FINAL_EVENTS.has(e.event)).map((e) => e.event)).toEqual(['run.completed']);
    // Reconnecting where it was: the resumed attempt whole — its message opened, its text, its end
    // (its seqs come after any the dead process handed out unstored).
    const after = await readEvents(second.base, headers, run.id, { lastEventId: lastSeen });
    expectIncreasing(after.events);
    expect(after.events[0]!.id).toBeGreaterThan(lastSeen);
    const created = after.events.find((e) => e.event === 'message.created');
    expect(created).toBeDefined();
    const messageId = (created!.data.message as { id: string }).id;
    const text = after.events.filter((e) => e.event === 'message.delta' && e.data.message_id === messageId).map((e) => e.data.delta as string);
    expect(text.join('')).toBe('the resumed story');
    expect(after.events.at(-1)!.event).toBe('run.completed');
    second.child.process.kill('SIGTERM');
    await second.child.ended;
  }, PROCESS_TEST_TIMEOUT_MS);

  it('SIGTERM hands the running run back; the next start finishes it', async () => {
    const { first, headers, run, restart } = await runMidStream('term', 'finished after restart', 3);
    first.child.process.kill('SIGTERM');
    const exit = await first.child.ended;
    expect(exit.code).toBe(0);
    expect(fake.log[0]!.aborted).toBe(true);

    const second = await restart();
    await eventually(async () => (await json<RunBody>(second.base, 'GET', `/runs/${run.id}`, headers)).body.status === 'completed', 10_000);
    const final = (await json<RunBody>(second.base, 'GET', `/runs/${run.id}`, headers)).body;
    // A handed-back run is not a crash: it does not use up an attempt.
    expect(final.attempts).toBe(1);
    expect((await messagesOf(second.base, headers, run.thread_id)).filter((m) => m.role === 'assistant').map((m) => m.content)).toEqual(['finished after restart']);
    second.child.process.kill('SIGTERM');
    await second.child.ended;
  }, PROCESS_TEST_TIMEOUT_MS);
});

/**
 * A `keel start` with billing on, on a data directory of its own (`name`): a user whose agent calls
 * MODEL, holding 100 credits granted by the superuser (`admin`).
 */
async function billedProcess(name: string) {
  const dataDir = await migratedDataDir(join(scratch, name));
  const port = await freePort();
  const first = await start(dataDir, port, { BILLING_ENABLED: 'true' });
  const headers = await userWithAgent(first.base, `${name}@crash.test`, PASSWORD, MODEL);
  const me = (await json<{ id: string }>(first.base, 'GET', '/users/me', headers)).body;
  const login = await fetch(`${first.base}/api/v1/login/access-token`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams({ username: 'admin@crash.test', password: PASSWORD }) });
  const admin = { authorization: `Bearer ${((await login.json()) as { access_token: string }).access_token}` };
  expect((await json(first.base, 'POST', '/billing/credits', admin, { user_id: me.id, amount: '100', description: 'test' })).status).toBe(200);
  return { dataDir, port, first, headers, admin, me };
}

describe('embedded process killed after metered calls', () => {
  it('kill -9 a moment after answered gateway calls (billing on): their charges and usage records are there after a restart', async () => {
    fake.reset();
    const calls = 4;
    fake.script(MODEL, ...Array.from({ length: calls }, () => ({ text: 'ok', usage: { prompt_tokens: 1_000, completion_tokens: 500 } })));
    const { dataDir, port, first, headers } = await billedProcess('billing-kill');
    for (let i = 0; i < calls; i++) {
      const answered = await fetch(`${first.base}/v1/chat/completions`, { method: 'POST', headers: { ...headers, 'content-type': 'application/json' }, body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] }) });
      expect(answered.status).toBe(200);
    }
    const before = (await json<{ balance: string; reserved: string }>(first.base, 'GET', '/billing/balance', headers)).body;
    expect(Number(before.balance)).toBeLessThan(100);
    // Written (the read waited for it) and then nothing more: a crash seconds later loses none of it
    // (its WAL is written 500 ms after; 3 s leave room for a loaded machine).
    await new Promise((done) => setTimeout(done, 3_000));
    first.child.process.kill('SIGKILL');
    await first.child.ended;

    const second = await start(dataDir, port, { BILLING_ENABLED: 'true' });
    expect((await json<{ balance: string }>(second.base, 'GET', '/billing/balance', headers)).body.balance).toBe(before.balance);
    expect((await json<{ total: { calls: number } }>(second.base, 'GET', '/billing/summary', headers)).body.total.calls).toBe(calls);
    second.child.process.kill('SIGTERM');
    await second.child.ended;
  }, PROCESS_TEST_TIMEOUT_MS);

  it('kill -9 mid-call (billing on): after a restart what the call held is free at once, not after the reservation TTL', async () => {
    fake.reset();
    fake.script(MODEL, { chunks: Array.from({ length: 100 }, (_, i) => `w${i} `), chunkDelayMs: 100 }, { text: 'after restart', usage: { prompt_tokens: 10, completion_tokens: 5 } });
    const { dataDir, port, first, headers, admin, me } = await billedProcess('billing-mid-call');
    const streaming = await fetch(`${first.base}/v1/chat/completions`, { method: 'POST', headers: { ...headers, 'content-type': 'application/json' }, body: JSON.stringify({ model: MODEL, stream: true, messages: [{ role: 'user', content: 'hi' }] }) });
    expect(streaming.status).toBe(200);
    await fake.waitFor((log) => log.some((r) => r.chunksSent >= 2), 10_000);
    const during = (await json<{ balance: string; reserved: string }>(first.base, 'GET', '/billing/balance', headers)).body;
    expect(during.balance).toBe('100');
    expect(Number(during.reserved)).toBeGreaterThan(0);
    // The hold was committed without waiting for the WAL (as holds are): a durable commit after it
    // writes it too, so the kill cannot take it along (under load the WAL writer's 500 ms came late).
    expect((await json(first.base, 'POST', '/projects', headers, { name: 'durable' })).status).toBeLessThan(300);
    first.child.process.kill('SIGKILL');
    await first.child.ended;
    await streaming.body?.cancel().catch(() => undefined);

    // The default TTL (900 s): only the release at start can free it within the test.
    const second = await start(dataDir, port, { BILLING_ENABLED: 'true' });
    const after = (await json<{ balance: string; reserved: string; available: string }>(second.base, 'GET', '/billing/balance', headers)).body;
    expect(after).toMatchObject({ balance: '100', reserved: '0', available: '100' });
    // Its log line comes through the child's pipe in its own time.
    await eventually(() => Promise.resolve((second.child.out() + second.child.err()).includes('credit reservations of an earlier process released at start')), 5_000);
    // The whole balance is free: an adjustment taking all of it is not refused for credit "held for calls not yet settled".
    expect((await json(second.base, 'POST', '/billing/credits', admin, { user_id: me.id, type: 'adjustment', amount: '-100', description: 'all of it' })).status).toBe(200);
    second.child.process.kill('SIGTERM');
    await second.child.ended;
  }, PROCESS_TEST_TIMEOUT_MS);
});
