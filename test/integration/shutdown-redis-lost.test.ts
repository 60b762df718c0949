import { sql } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { Database } from '../../src/core/db.js';

import { buildTestApp, openTestDatabase } from '../helpers/app.js';
import { createUser, superuserHeaders } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { addFakeModels, chatRequest } from '../helpers/metered-models.js';
import { SilentProxy } from '../helpers/silent-proxy.js';

// Scaled mode whose Redis goes out of reach just as the app closes. Silent with its connections
// still `ready`, the queue's graceful close waited without bound (the workers' connections have no
// command timeout), so the usage meter's flush after it never ran: past the shutdown deadline the
// process exits with its usage only saved to disk, and here the close never ended.

let database: Database;
let destroy: () => Promise<void>;
let fake: FakeModelServer;

beforeAll(async () => {
  const opened = await openTestDatabase();
  database = opened.database;
  destroy = opened.destroy;
  fake = await FakeModelServer.start();
  // The models are records in the database every app of the file shares.
  const app = await buildTestApp(database, { REDIS_URL: '' });
  await addFakeModels(app, await superuserHeaders(app), fake.url);
  await app.close();
});
afterAll(async () => {
  await fake?.close();
  await destroy?.();
});

async function usageCount(userId: string): Promise<number> {
  const result = await database.db.execute(sql`select count(*)::int as n from usage_records where owner_id = ${userId}`);
  return (result as { rows: { n: number }[] }).rows[0]!.n;
}

describe.skipIf(!process.env.REDIS_URL)('an app whose Redis goes out of reach as it closes', () => {
  it.each([
    ['falls silent', (proxy: SilentProxy) => proxy.fallSilent()],
    ['refuses connections', (proxy: SilentProxy) => void proxy.close()],
  ])('closes in bounded time, its usage written, when Redis %s', async (_how, loseRedis) => {
    const proxy = await SilentProxy.to(process.env.REDIS_URL!, 6379);
    const app = await buildTestApp(database, { REDIS_URL: proxy.url(process.env.REDIS_URL!), USAGE_FLUSH_INTERVAL_MS: '600000', MODEL_MAX_RETRIES: '0' });
    try {
      const user = await createUser(app);
      for (let i = 0; i < 3; i++) await app.models.chat(chatRequest('fake-precise', { user_id: user.user.id }));
      expect(await usageCount(user.user.id)).toBe(0);
      loseRedis(proxy);
      const started = Date.now();
      await app.close();
      // Within the shutdown deadline (SHUTDOWN_TIMEOUT_MS, 10 s by default): a PING or two unanswered, and the app's client's QUIT.
      expect(Date.now() - started).toBeLessThan(8_000);
      expect(await usageCount(user.user.id)).toBe(3);
    } finally {
      await proxy.close();
    }
  }, 30_000);
});
