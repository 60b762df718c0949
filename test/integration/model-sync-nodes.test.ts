/**
 * Catalog changes reach every node: two apps on one PostgreSQL database, a superuser changes
 * models and providers on one, the other reloads through the triggers' NOTIFY (migration 0005).
 */
import { randomBytes } from 'node:crypto';

import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { type Database, openDatabase } from '../../src/core/db.js';

import { cacheUsers } from '../../src/crud/user.js';
import { buildTestApp, openTestDatabase, testSettings } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { eventually } from '../helpers/http.js';

describe.runIf(Boolean(process.env.DATABASE_URL))('model catalog across nodes on one PostgreSQL', () => {
  // Both nodes share SECRET_KEY, as a deployment's nodes do: provider secrets sealed on one open on the other.
  const shared = { SECRET_KEY: randomBytes(32).toString('hex') };
  let fake: FakeModelServer;
  let destroy: () => Promise<void>;
  let a: FastifyInstance;
  let b: { database: Database; app: FastifyInstance };
  let admin: Record<string, string>;
  let user: TestUser;

  const modelOn = (app: FastifyInstance, id: string) => app.inject({ method: 'GET', url: `/api/v1/models/${id}`, headers: user.headers });
  const chatOn = (app: FastifyInstance, model: string) =>
    app.inject({ method: 'POST', url: '/v1/chat/completions', headers: user.headers, payload: { model, messages: [{ role: 'user', content: 'Hi' }] } });

  beforeAll(async () => {
    fake = await FakeModelServer.start();
    const opened = await openTestDatabase();
    destroy = opened.destroy;
    a = await buildTestApp(opened.database, shared);
    const otherDatabase = await openDatabase(testSettings({ DATABASE_URL: opened.url! }));
    await cacheUsers(otherDatabase);
    b = { database: otherDatabase, app: await buildTestApp(otherDatabase, shared) };
    admin = await superuserHeaders(a);
    user = await createUser(a);
  });
  afterAll(async () => {
    await b?.app.close();
    await b?.database.close();
    await a?.close();
    await destroy?.();
    await fake?.close();
  });

  it('serves a provider and model added on one node from the other, secrets included', async () => {
    expect((await modelOn(b.app, 'node-model')).statusCode).toBe(404);
    const provider = await a.inject({
      method: 'POST',
      url: '/api/v1/providers',
      headers: admin,
      payload: { name: 'nodes', kind: 'openai-compatible', base_url: fake.url, api_key: 'sk-node-secret' },
    });
    expect(provider.statusCode, provider.body).toBe(200);
    const model = await a.inject({
      method: 'POST',
      url: '/api/v1/models',
      headers: admin,
      payload: { id: 'node-model', provider: 'nodes', capabilities: ['chat'], pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' } },
    });
    expect(model.statusCode, model.body).toBe(200);

    await eventually(async () => (await modelOn(b.app, 'node-model')).statusCode === 200);
    expect((await modelOn(b.app, 'node-model')).json()).toMatchObject({ provider: 'nodes', available: true });
    const answer = await chatOn(b.app, 'node-model');
    expect(answer.statusCode, answer.body).toBe(200);
    expect(fake.requestsFor('node-model').at(-1)!.headers.authorization).toBe('Bearer sk-node-secret');
  });

  it('disables, re-prices and deletes on the other node too', async () => {
    const patch = await a.inject({ method: 'PATCH', url: '/api/v1/models/node-model', headers: admin, payload: { pricing: { input_cost_per_million_tokens: '7', output_cost_per_million_tokens: '9' } } });
    expect(patch.statusCode, patch.body).toBe(200);
    await eventually(async () => (await modelOn(b.app, 'node-model')).json<{ pricing: { input_cost_per_million_tokens: string } }>().pricing.input_cost_per_million_tokens === '7');

    await a.inject({ method: 'PATCH', url: '/api/v1/models/node-model', headers: admin, payload: { enabled: false } });
    await eventually(async () => (await chatOn(b.app, 'node-model')).statusCode === 404);

    const providers = await a.inject({ method: 'GET', url: '/api/v1/providers', headers: admin });
    const { id } = providers.json<{ data: { id: string; name: string }[] }>().data.find((p) => p.name === 'nodes')!;
    await a.inject({ method: 'PATCH', url: '/api/v1/models/node-model', headers: admin, payload: { enabled: true } });
    await eventually(async () => (await modelOn(b.app, 'node-model')).json<{ enabled: boolean }>().enabled);
    // A provider that models name is not deleted (409); disabled, its models are unavailable on every node.
    expect((await a.inject({ method: 'DELETE', url: `/api/v1/providers/${id}`, headers: admin })).statusCode).toBe(409);
    expect((await a.inject({ method: 'PATCH', url: `/api/v1/providers/${id}`, headers: admin, payload: { enabled: false } })).statusCode).toBe(200);
    await eventually(async () => (await modelOn(b.app, 'node-model')).json<{ available: boolean }>().available === false);
  });

  it('hears a change written straight to the table (another tool, a migration)', async () => {
    await b.database.withSession((session) =>
      session.query(`insert into model_overrides (model_id, deleted, priority) values ('gpt-4.1', false, 999) on conflict (model_id) do update set priority = 999`),
    );
    for (const app of [a, b.app]) {
      await eventually(async () => (await modelOn(app, 'gpt-4.1')).json<{ priority: number }>().priority === 999);
    }
  });
});
