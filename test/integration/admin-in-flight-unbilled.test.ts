/**
 * Billing off: what an operator changes while metered calls are in flight (see
 * admin-in-flight.test.ts for billing on). Usage is still recorded, and a key's budget still
 * charged (its settlement writes the call's usage row itself).
 */
import { sql } from 'drizzle-orm';
import type { LightMyRequestResponse } from 'fastify';
import { describe, expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import type { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey, eventually, xApiKey } from '../helpers/http.js';
import { lockWaits } from '../helpers/lock-waits.js';
import { useFakeModels } from '../helpers/metered-models.js';

const ctx = useTestApp({ USAGE_FLUSH_INTERVAL_MS: '20', MODEL_MAX_RETRIES: '0' });
const api = apiOf(ctx);

let fake: FakeModelServer;
let admin: Record<string, string>;

useFakeModels(ctx, (server, headers) => {
  fake = server;
  admin = headers;
});

const chat = (headers: Record<string, string>, model: string) =>
  ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers, payload: { model, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 10 } });

const rowsOf = <T>(query: ReturnType<typeof sql>): Promise<T[]> => ctx.database.db.execute(query).then((result) => (result as { rows: T[] }).rows);

it("a user deleted, a budgeted key deleted and a model deleted mid-call: the others' records written, the deleted user's dropped, nothing held", async () => {
  const gone = await createUser(ctx.app);
  const keeper = await createUser(ctx.app);
  const goneKey = await createKey(ctx.app, gone, { name: 'budgeted', max_budget: '50' });
  const keeperKey = await createKey(ctx.app, keeper, { name: 'budgeted', max_budget: '50' });
  const revokedKey = await createKey(ctx.app, keeper, { name: 'deleted', max_budget: '50' });
  const created = await api('POST', '/models', admin, { id: 'fake-unbilled-gone', provider: 'fake', pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '1000000' } });
  expect(created.statusCode, created.body).toBe(200);
  fake.defaultReply = { text: 'slow', chunkDelayMs: 300, usage: { prompt_tokens: 1, completion_tokens: 4 } };
  try {
    const calls = [
      chat(xApiKey(goneKey.key), 'fake-billed'),
      chat(gone.headers, 'fake-billed'),
      chat(xApiKey(keeperKey.key), 'fake-unbilled-gone'),
      chat(xApiKey(revokedKey.key), 'fake-billed'),
    ];
    await fake.waitFor((log) => log.length === 4);
    expect((await api('DELETE', `/users/${gone.user.id}`, admin)).statusCode).toBe(200);
    expect((await api('DELETE', `/api-keys/${revokedKey.id}`, keeper.headers)).statusCode).toBe(200);
    expect((await api('DELETE', '/models/fake-unbilled-gone', admin)).statusCode).toBe(200);
    for (const response of await Promise.all(calls)) expect(response.statusCode, response.body).toBe(200);
  } finally {
    fake.defaultReply = { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 1 } };
  }
  await ctx.app.meter.idle();
  expect(await rowsOf(sql`select count(*)::int as n from usage_records where owner_id = ${gone.user.id}`)).toEqual([{ n: 0 }]);
  const records = await rowsOf<{ model: string; api_key_id: string; cost: string }>(
    sql`select model, api_key_id, trim_scale(cost)::text as cost from usage_records where owner_id = ${keeper.user.id} order by model`,
  );
  expect(records).toEqual([
    { model: 'fake-billed', api_key_id: revokedKey.id, cost: '4' },
    { model: 'fake-unbilled-gone', api_key_id: keeperKey.id, cost: '4' },
  ]);
  expect(await rowsOf(sql`select trim_scale(spent)::text as spent, trim_scale(budget_reserved)::text as reserved from api_keys where id = ${keeperKey.id}`)).toEqual([{ spent: '4', reserved: '0' }]);
  expect(await rowsOf(sql`select count(*)::int as n from credit_reservations`)).toEqual([{ n: 0 }]);
  expect(await rowsOf(sql`select count(*)::int as n from credit_transactions`)).toEqual([{ n: 0 }]);
});

describe('a budgeted key revoked, or its owner deactivated, between its call’s authentication and its hold (billing off: the hold is the key’s one UPDATE)', () => {
  const onServer = !!process.env.DATABASE_URL;
  const { waitingForLocks } = lockWaits(ctx);

  function expectInvalidKey(response: LightMyRequestResponse): void {
    expect(response.statusCode, response.body).toBe(401);
    expect(response.json<{ error: { code: string } }>().error.code).toBe('invalid_api_key');
  }

  /** The call, with `takeAway` run as it reaches the meter (authenticated, before its hold). */
  async function callTakingAway(key: string, takeAway: () => Promise<void>): Promise<LightMyRequestResponse> {
    const meter = ctx.app.meter;
    const reserve = meter.reserve.bind(meter);
    meter.reserve = async (estimate) => {
      meter.reserve = reserve;
      await takeAway();
      return reserve(estimate);
    };
    try {
      return await chat(xApiKey(key), 'fake-billed');
    } finally {
      meter.reserve = reserve;
    }
  }

  it.each(['revoked', 'owner deactivated'] as const)('%s: 401 invalid_api_key, nothing held of its budget, nothing sent upstream', async (way) => {
    const owner = await createUser(ctx.app);
    const key = await createKey(ctx.app, owner, { name: 'budgeted', max_budget: '50' });
    const upstream = fake.log.length;
    const answered = await callTakingAway(key.key, async () => {
      const gone =
        way === 'revoked' ? await api('PATCH', `/api-keys/${key.id}`, owner.headers, { status: 'revoked' }) : await api('PATCH', `/users/${owner.user.id}`, admin, { is_active: false });
      expect(gone.statusCode, gone.body).toBe(200);
    });
    expectInvalidKey(answered);
    expectInvalidKey(await chat(xApiKey(key.key), 'fake-billed'));
    expect(fake.log.length).toBe(upstream);
    await ctx.app.meter.idle();
    expect(await rowsOf(sql`select trim_scale(spent)::text as spent, trim_scale(budget_reserved)::text as reserved from api_keys where id = ${key.id}`)).toEqual([{ spent: '0', reserved: '0' }]);
    expect(await rowsOf(sql`select count(*)::int as n from usage_records where api_key_id = ${key.id}`)).toEqual([{ n: 0 }]);
  });

  it.skipIf(!onServer)('revoked while the hold waits for the key’s row: the hold reads the row as the revocation left it and takes nothing', async () => {
    const owner = await createUser(ctx.app);
    const key = await createKey(ctx.app, owner, { name: 'budgeted', max_budget: '50' });
    expect((await chat(xApiKey(key.key), 'fake-billed')).statusCode).toBe(200); // authenticated from the cache from then on
    await ctx.app.meter.idle();
    const upstream = fake.log.length;
    let answered: LightMyRequestResponse;
    await ctx.database.withSession(async (session) => {
      await session.exec('begin');
      try {
        // The revocation's own statement, uncommitted: the key's row locked, as PATCH /api-keys holds it until its commit.
        await session.query(`update api_keys set status = 'revoked' where id = $1`, [key.id]);
        const call = chat(xApiKey(key.key), 'fake-billed');
        await eventually(async () => (await waitingForLocks()) > 0);
        await session.exec('commit');
        answered = await call;
      } catch (error) {
        await session.exec('rollback');
        throw error;
      }
    });
    expectInvalidKey(answered!);
    expect(fake.log.length).toBe(upstream);
    await ctx.app.meter.idle();
    expect(await rowsOf(sql`select trim_scale(budget_reserved)::text as reserved from api_keys where id = ${key.id}`)).toEqual([{ reserved: '0' }]);
  });
});
