/**
 * Billing off: what an operator changes while metered calls are in flight (see
 * admin-in-flight.test.ts for billing on). Usage is still recorded, and a key's budget still
 * charged (its settlement writes the call's usage row itself).
 */
import { sql } from 'drizzle-orm';
import { expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import type { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey, xApiKey } from '../helpers/http.js';
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
