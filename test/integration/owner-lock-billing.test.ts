/**
 * A transaction that locks a users row without deleting it (a run start's active-run limit, a
 * per-user limit's count, a default agent's change) must not make that
 * user's model calls wait. A hold's reservation row and a settlement's ledger row reference
 * users(id): their foreign-key check takes a KEY SHARE lock on the users row, which FOR UPDATE
 * blocks and FOR NO KEY UPDATE does not. With FOR UPDATE, a call's hold waited for the whole
 * locking transaction (here paused on purpose: it waits for a row a connection of the test holds),
 * and a settlement waited holding the account's row (a deadlock if that transaction then wanted it).
 *
 * Each test pauses the real transaction right after its users-row lock, then makes a model call of
 * that user: it must be held, answered and settled while the transaction is still open.
 * Embedded, PGlite runs one session at a time: nothing runs beside an open transaction, so these
 * run on the server only.
 */
import type { LightMyRequestResponse } from 'fastify';
import { describe, expect, it } from 'vitest';

import { transaction } from '../../src/core/db.js';

import { getBalance } from '../../src/crud/billing.js';
import * as userCrud from '../../src/crud/user.js';
import { useTestApp } from '../helpers/app.js';
import { createProject, type TestUser } from '../helpers/factories.js';
import type { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, eventually } from '../helpers/http.js';
import { creditedUser, lockWaits, unlessItWaits } from '../helpers/lock-waits.js';
import { useFakeModels } from '../helpers/metered-models.js';
import { createAgent, createThread, waitForRun } from '../helpers/runs.js';

const ctx = useTestApp({ BILLING_ENABLED: 'true', USAGE_FLUSH_INTERVAL_MS: '20', MODEL_MAX_RETRIES: '0' }, { tools: { knowledge_search: undefined } });
const api = apiOf(ctx);
const onServer = !!process.env.DATABASE_URL;

let fake: FakeModelServer;
let admin: Record<string, string>;
useFakeModels(ctx, (server, headers) => {
  fake = server;
  admin = headers;
});

const { waitingForLocks } = lockWaits(ctx);
const userWithCredits = (options?: { superuser?: boolean }) => creditedUser(ctx, admin, options);

/**
 * A model call of `user` costing 4, made while their users row is locked: held and answered, then
 * settled by the meter, each without waiting for the lock's transaction.
 */
async function callSettlesMeanwhile(user: TestUser): Promise<void> {
  fake.script('fake-billed', { text: 'done', usage: { prompt_tokens: 1, completion_tokens: 4 } });
  const call = ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: user.headers, payload: { model: 'fake-billed', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 10 } });
  const answered = await unlessItWaits(call);
  expect(answered === 'waited' ? 'the hold waited for the users row' : answered.statusCode, answered === 'waited' ? '' : answered.body).toBe(200);
  expect(await unlessItWaits(ctx.app.meter.idle().then(() => 'settled'))).toBe('settled');
  const account = await getBalance(ctx.database.db, user.user.id);
  expect([Number(account.balance), Number(account.reserved)]).toEqual([96, 0]);
}

/**
 * `request` is sent while a connection of the test holds `pause` (a row its transaction locks after
 * the users row); once it waits there, `meanwhile` runs; then the pause ends and the request answers.
 */
async function pausedAfterUserLock(pause: [text: string, params: unknown[]], request: () => Promise<LightMyRequestResponse>, meanwhile: () => Promise<void>): Promise<LightMyRequestResponse> {
  let pending!: Promise<LightMyRequestResponse>;
  await ctx.database.withSession(async (session) => {
    await session.exec('begin');
    try {
      await session.query(...pause);
      pending = request();
      await eventually(async () => (await waitingForLocks()) > 0);
      await meanwhile();
    } finally {
      await session.exec('rollback');
    }
  });
  return pending;
}

describe.runIf(onServer)("a model call while a transaction holds its user's row (not to delete it)", () => {
  it('a run start (the active-run limit), paused at its thread: the call is held, answered and settled meanwhile', async () => {
    const user = await userWithCredits();
    await createAgent(ctx.app, user.headers, { model: 'fake-billed', max_output_tokens: 10, is_default: true });
    const thread = await createThread(ctx.app, user.headers);
    // The start locks the owner, then updates the thread (busy): this lock makes it wait in between.
    const started = await pausedAfterUserLock(
      ['select id from threads where id = $1 for update', [thread.id]],
      () => api('POST', `/threads/${thread.id}/runs`, user.headers, { input: 'hello' }),
      () => callSettlesMeanwhile(user),
    );
    expect(started.statusCode, started.body).toBe(202);
    await waitForRun(ctx.app, user.headers, started.json<{ id: string }>().id, ['completed', 'failed']);
  });

  it('a thread created under the per-user limit, paused at its project: the call is held, answered and settled meanwhile', async () => {
    const user = await userWithCredits();
    const project = await createProject(ctx.app, user.headers);
    // The limit locks the owner, counts, then inserts: the thread's foreign key waits for this lock.
    const created = await pausedAfterUserLock(
      ['select id from projects where id = $1 for update', [project.id]],
      () => api('POST', '/threads', user.headers, { title: 't', project_id: project.id }),
      () => callSettlesMeanwhile(user),
    );
    expect(created.statusCode, created.body).toBe(200);
  });

  it("an agent made the default (the owner's lock, then the agent's), paused at the agent: the call is held, answered and settled meanwhile", async () => {
    const user = await userWithCredits();
    const agent = await createAgent(ctx.app, user.headers, { model: 'fake-billed' });
    const changed = await pausedAfterUserLock(
      ['select id from agents where id = $1 for update', [agent.id]],
      () => api('PATCH', `/agents/${agent.id}`, user.headers, { is_default: true }),
      () => callSettlesMeanwhile(user),
    );
    expect(changed.statusCode, changed.body).toBe(200);
  });

  // It locks no users row (an advisory lock: crud/user.ts); test/integration/superuser-lock.test.ts has the rest.
  it("the superusers' lock (a demotion's or deactivation's last-superuser check): a superuser's call is held, answered and settled meanwhile", async () => {
    const superuser = await userWithCredits({ superuser: true });
    await transaction(ctx.database.db, async (tx) => {
      await userCrud.lockSuperusers(tx);
      await callSettlesMeanwhile(superuser);
    });
  });
});
