/**
 * A model call through an API key whose key is deleted or revoked (or whose user is deleted or
 * deactivated) after the call was authenticated and before its credit hold reaches the key's row
 * (the account's). A revoked key's row stays: the hold's conditional UPDATE checks its status (and
 * the account's its user's is_active), so it refuses as it does for a deleted one. With billing on and a key with a budget, the call holds
 * per call, from the account and then from the key (one transaction): the key's conditional UPDATE
 * then finds no row, as a key over its budget does. The client must be told what a call made with
 * the deleted key is told (401 invalid_api_key), not that the key is over a budget it no longer
 * has, and nothing may stay held.
 *
 * On the server the real DELETE /api-keys/{id} runs while the call's hold waits for the account's
 * row, which a connection of the test holds: the delete commits first, then the hold goes on.
 * Embedded (one session at a time), the same DELETE runs as the call, authenticated, reaches the
 * meter: its hold runs after the deletion, as it does when the delete's statements come between.
 */
import { sql } from 'drizzle-orm';
import type { LightMyRequestResponse } from 'fastify';
import { describe, expect, it } from 'vitest';

import { getBalance } from '../../src/crud/billing.js';
import { useTestApp } from '../helpers/app.js';
import type { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey, eventually } from '../helpers/http.js';
import { creditedUser, lockWaits } from '../helpers/lock-waits.js';
import { captureLogs } from '../helpers/logs.js';
import { useFakeModels } from '../helpers/metered-models.js';

const logs = captureLogs('info');
const ctx = useTestApp({ BILLING_ENABLED: 'true', USAGE_FLUSH_INTERVAL_MS: '20', MODEL_MAX_RETRIES: '0' }, { logger: logs.logger });
const api = apiOf(ctx);
const onServer = !!process.env.DATABASE_URL;

let fake: FakeModelServer;
let admin: Record<string, string>;
useFakeModels(ctx, (server, headers) => {
  fake = server;
  admin = headers;
});

const { rowsOf, waitingForLocks } = lockWaits(ctx);
const userWithCredits = (options?: { superuser?: boolean }) => creditedUser(ctx, admin, options);

const chat = (key: string) =>
  ctx.app.inject({
    method: 'POST',
    url: '/v1/chat/completions',
    headers: { authorization: `Bearer ${key}` },
    payload: { model: 'fake-billed', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 10 },
  });

/** 401 invalid_api_key, as a call made with a deleted key is answered. */
function expectInvalidKey(response: LightMyRequestResponse): void {
  expect(response.statusCode, response.body).toBe(401);
  expect(response.json<{ error: { type: string; code: string } }>().error).toMatchObject({ type: 'invalid_request_error', code: 'invalid_api_key' });
}

/** What takes the key away: its real DELETE, or its revocation (PATCH status revoked), which leaves the row. */
const takeAway = {
  deleted: (key: { id: string }, headers: Record<string, string>) => api('DELETE', `/api-keys/${key.id}`, headers),
  revoked: (key: { id: string }, headers: Record<string, string>) => api('PATCH', `/api-keys/${key.id}`, headers, { status: 'revoked' }),
};

describe.each(['deleted', 'revoked'] as const)('a budgeted API key %s while its call is being held', (way) => {
  it(`the call answers 401 invalid_api_key, as one made with the ${way} key; nothing is held, nothing sent upstream`, async () => {
    const user = await userWithCredits();
    const key = await createKey(ctx.app, user, { name: 'budgeted', max_budget: '50' });
    // One call first: the key is authenticated from the cache from then on (its last use recorded).
    fake.script('fake-billed', { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 4 } });
    expect((await chat(key.key)).statusCode).toBe(200);
    await ctx.app.meter.idle();
    const upstreamCalls = fake.log.length;
    logs.clear();

    let answered: LightMyRequestResponse;
    if (onServer) {
      await ctx.database.withSession(async (session) => {
        await session.exec('begin');
        try {
          // The hold's first lock: it waits here, authenticated, before it reaches the key.
          await session.query('select user_id from credit_accounts where user_id = $1 for update', [user.user.id]);
          const call = chat(key.key);
          await eventually(async () => (await waitingForLocks()) > 0);
          const gone = await takeAway[way](key, user.headers);
          expect(gone.statusCode, gone.body).toBe(200);
          await session.exec('rollback');
          answered = await call;
        } catch (error) {
          await session.exec('rollback');
          throw error;
        }
      });
    } else {
      // The call authenticated (the key read) and metered: the key is deleted before its hold runs.
      const meter = ctx.app.meter;
      const reserve = meter.reserve.bind(meter);
      meter.reserve = async (estimate) => {
        meter.reserve = reserve;
        const gone = await takeAway[way](key, user.headers);
        expect(gone.statusCode, gone.body).toBe(200);
        return reserve(estimate);
      };
      try {
        answered = await chat(key.key);
      } finally {
        meter.reserve = reserve;
      }
    }
    expectInvalidKey(answered!);
    // What a call made with the deleted key now gets.
    expectInvalidKey(await chat(key.key));
    expect(fake.log.length).toBe(upstreamCalls);
    await ctx.app.meter.idle();
    const account = await getBalance(ctx.database.db, user.user.id);
    expect([Number(account.balance), Number(account.reserved)]).toEqual([96, 0]);
    expect(await rowsOf(sql`select id from credit_reservations where user_id = ${user.user.id}`)).toEqual([]);
    // Said once, at info (no error: the client's key is gone, nothing failed here).
    expect(logs.lines().filter((line) => Number(line.level) >= 40)).toEqual([]);
    expect(logs.lines().filter((line) => line.msg === `model call refused: its API key was ${way} before its hold`)).toMatchObject([{ apiKeyId: key.id }]);
    // The key's budget holds nothing either (a revoked key keeps its row).
    expect(await rowsOf(sql`select budget_reserved::text as held from api_keys where id = ${key.id}`)).toEqual(way === 'deleted' ? [] : [{ held: '0.000000000000' }]);
  });
});

/** What takes the user away: their real DELETE, or their deactivation (PATCH is_active false), which leaves the account. */
const takeUserAway = {
  deleted: (userId: string) => api('DELETE', `/users/${userId}`, admin),
  deactivated: (userId: string) => api('PATCH', `/users/${userId}`, admin, { is_active: false }),
};

describe.each(['deleted', 'deactivated'] as const)('a user %s while their call is being held', (way) => {
  it(`the call answers 401 invalid_api_key, as one made with their key now, not 402 for their account, nor a call that goes on; nothing sent upstream`, async () => {
    const user = await userWithCredits();
    const key = await createKey(ctx.app, user, { name: 'plain' });
    const upstreamCalls = fake.log.length;
    logs.clear();
    // The call authenticated (its key and user read) and metered: the user is deleted before its hold runs.
    const meter = ctx.app.meter;
    const reserve = meter.reserve.bind(meter);
    meter.reserve = async (estimate) => {
      meter.reserve = reserve;
      const gone = await takeUserAway[way](user.user.id);
      expect(gone.statusCode, gone.body).toBe(200);
      return reserve(estimate);
    };
    let answered: LightMyRequestResponse;
    try {
      answered = await chat(key.key);
    } finally {
      meter.reserve = reserve;
    }
    expectInvalidKey(answered);
    expectInvalidKey(await chat(key.key));
    expect(fake.log.length).toBe(upstreamCalls);
    expect(await rowsOf(sql`select id from credit_reservations where user_id = ${user.user.id}`)).toEqual([]);
    expect(logs.lines().filter((line) => Number(line.level) >= 40)).toEqual([]);
    expect(logs.lines().filter((line) => line.msg === `model call refused: its user was ${way} before its hold`)).toMatchObject([{ userId: user.user.id }]);
    if (way === 'deactivated') {
      // Their account is untouched: nothing held, nothing charged.
      const account = await getBalance(ctx.database.db, user.user.id);
      expect([Number(account.balance), Number(account.reserved)]).toEqual([100, 0]);
    }
  });
});
