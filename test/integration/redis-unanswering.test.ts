/**
 * A Redis that takes connections but answers nothing (a stopped server, a network black hole):
 * what needs it fails within REDIS_COMMAND_TIMEOUT_MS, where a command had waited for the TCP
 * connection to give up (minutes), holding its request all that time.
 */
import type { FastifyInstance } from 'fastify';
import { afterEach, describe, expect, it } from 'vitest';

import { RATE_LIMITER_RETRY_AFTER_SECONDS } from '../../src/core/errors.js';
import { createRedis, REDIS_COMMAND_TIMEOUT_MS } from '../../src/core/redis.js';

import { until } from '../contract/run-bus.js';
import { buildTestApp, openTestDatabase, testSettings } from '../helpers/app.js';
import { createUser, superuserHeaders } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { createKey } from '../helpers/http.js';
import { addFakeModels } from '../helpers/metered-models.js';
import { type Child, freePort, launch } from '../helpers/process.js';

let server: Child | undefined;

/** A redis-server of this test's own, once it takes connections. */
async function startRedis(): Promise<string> {
  const port = await freePort();
  server = launch('redis-server', ['--port', String(port), '--save', '', '--appendonly', 'no'], {});
  await until(() => server!.out().includes('Ready to accept connections'), 5_000, 'redis-server');
  return `redis://127.0.0.1:${port}`;
}

afterEach(async () => {
  server?.process.kill('SIGCONT');
  server?.process.kill('SIGKILL');
  await server?.ended;
  server = undefined;
});

describe('a Redis that stops answering', () => {
  it("fails the app client's commands within REDIS_COMMAND_TIMEOUT_MS, and serves again once it answers", async () => {
    const client = createRedis(testSettings({ REDIS_URL: await startRedis() }))!;
    try {
      expect(await client.incr('keel-test:unanswering')).toBe(1);
      server!.process.kill('SIGSTOP');
      const started = Date.now();
      await expect(client.incr('keel-test:unanswering')).rejects.toThrow(/timed out/i);
      expect(Date.now() - started).toBeGreaterThanOrEqual(REDIS_COMMAND_TIMEOUT_MS - 50);
      expect(Date.now() - started).toBeLessThan(REDIS_COMMAND_TIMEOUT_MS + 1_000);
      server!.process.kill('SIGCONT');
      expect(await client.get('keel-test:unanswering')).not.toBeNull();
    } finally {
      client.disconnect();
    }
  });

  it("answers a /v1 call whose key has an rpm with 503 in OpenAI's shape within seconds, not when the connection gives up", async () => {
    const url = await startRedis();
    const opened = await openTestDatabase();
    const fake = await FakeModelServer.start();
    let app: FastifyInstance | null = null;
    try {
      app = await buildTestApp(opened.database, { REDIS_URL: url });
      await addFakeModels(app, await superuserHeaders(app), fake.url);
      const user = await createUser(app);
      const { key } = await createKey(app, user, { name: 'limited', rpm: 100 });
      const ask = () =>
        app!.inject({
          method: 'POST',
          url: '/v1/chat/completions',
          headers: { authorization: `Bearer ${key}` },
          payload: { model: 'fake-precise', messages: [{ role: 'user', content: 'Hi' }] },
        });
      expect((await ask()).statusCode).toBe(200);
      server!.process.kill('SIGSTOP');
      const started = Date.now();
      const refused = await ask();
      expect(Date.now() - started).toBeLessThan(REDIS_COMMAND_TIMEOUT_MS + 2_000);
      expect(refused.statusCode, refused.body).toBe(503);
      expect(refused.json<{ error: { type: string } }>().error.type).toBe('server_error');
      // A short wait the openai client honours; and nothing was called or charged, so its retry is
      // not refused (no `x-should-retry: false`, which a failed model call carries).
      expect(refused.headers['retry-after']).toBe(String(RATE_LIMITER_RETRY_AFTER_SECONDS));
      expect(refused.headers['x-should-retry']).toBeUndefined();
      expect(fake.log).toHaveLength(1);
      server!.process.kill('SIGCONT');
      expect((await ask()).statusCode).toBe(200);
    } finally {
      server?.process.kill('SIGCONT');
      await app?.close();
      await fake.close();
      await opened.destroy();
    }
  });

  it('refuses a rate-limited route with 503 and a short Retry-After while the counters cannot be reached, and serves again once they can', async () => {
    const url = await startRedis();
    const opened = await openTestDatabase();
    let app: FastifyInstance | null = null;
    try {
      app = await buildTestApp(opened.database, { REDIS_URL: url });
      const user = await createUser(app);
      const login = () =>
        app!.inject({
          method: 'POST',
          url: '/api/v1/login/access-token',
          headers: { 'content-type': 'application/x-www-form-urlencoded' },
          payload: new URLSearchParams({ username: user.email, password: user.password }).toString(),
        });
      expect((await login()).statusCode).toBe(200);
      server!.process.kill('SIGSTOP');
      const refused = await login();
      expect(refused.statusCode, refused.body).toBe(503);
      expect(refused.json()).toEqual({ detail: 'Rate limiter unavailable, try again later' });
      expect(refused.headers['retry-after']).toBe(String(RATE_LIMITER_RETRY_AFTER_SECONDS));
      server!.process.kill('SIGCONT');
      const served = await login();
      expect(served.statusCode).toBe(200);
      expect(served.headers['retry-after']).toBeUndefined();
    } finally {
      server?.process.kill('SIGCONT');
      await app?.close();
      await opened.destroy();
    }
  });
});
