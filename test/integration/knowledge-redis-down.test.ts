import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { Database } from '../../src/core/db.js';

import { sweepIngestion } from '../../src/services/knowledge/ingestion.js';
import { buildTestApp, openTestDatabase } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { call, type ListBody } from '../helpers/http.js';
import { createFolder, type EntryBody, type FormFile, settled, upload } from '../helpers/knowledge.js';
import { SilentProxy } from '../helpers/silent-proxy.js';

// Scaled mode whose Redis goes out of reach after the start: an upload or a reindex writes its
// entry, cannot hand its job to Redis, and still answers within seconds (the entry waits, pending,
// for the sweep). Held without an answer, the client's retry made a second entry.

let database: Database;
let destroy: () => Promise<void>;

beforeAll(async () => {
  const opened = await openTestDatabase();
  database = opened.database;
  destroy = opened.destroy;
});
afterAll(() => destroy?.());

/** Runs `work` on an app (and a user, a folder) whose Redis is behind a proxy of its own. */
async function behindProxy(work: (app: FastifyInstance, proxy: SilentProxy, user: TestUser, folderId: string) => Promise<void>): Promise<void> {
  const proxy = await SilentProxy.to(process.env.REDIS_URL!, 6379);
  const app = await buildTestApp(database, { REDIS_URL: proxy.url(process.env.REDIS_URL!) });
  try {
    const user = await createUser(app);
    await work(app, proxy, user, (await createFolder(app, user.headers)).id);
  } finally {
    // The app first: its queue closes gracefully while its Redis is there, at once when it is not.
    await app.close();
    await proxy.close();
  }
}

/** The response, which must come within the Redis command timeout (2 s) and a margin. */
async function answeredQuickly<T>(request: Promise<T>): Promise<T> {
  const started = Date.now();
  const response = await request;
  expect(Date.now() - started).toBeLessThan(5_000);
  return response;
}

const file = (name: string): FormFile => ({ filename: name, type: 'text/markdown', content: `# ${name}\n\nSome text to index.\n` });

async function entriesIn(app: FastifyInstance, user: TestUser, folderId: string): Promise<EntryBody[]> {
  return (await call(app, 'GET', `/knowledge-base/entries?folder_id=${folderId}`, user.headers)).json<ListBody<EntryBody>>().data;
}

describe.skipIf(!process.env.REDIS_URL)('knowledge base with Redis out of reach', () => {
  it('upload and reindex answer within seconds while Redis is silent; the entry is ingested once it answers again, once', async () => {
    await behindProxy(async (app, proxy, user, folderId) => {
      proxy.fallSilent();
      const uploaded = await answeredQuickly(upload(app, user.headers, folderId, file('doc.md')));
      expect(uploaded.statusCode, uploaded.body).toBe(201);
      const entry = uploaded.json<EntryBody>();
      expect(entry.status).toBe('pending');
      const reindexed = await answeredQuickly(call(app, 'POST', `/knowledge-base/entries/${entry.id}/reindex`, user.headers));
      expect(reindexed.statusCode, reindexed.body).toBe(202);

      proxy.speak();
      // Its jobs (held, then handed over) or a later sweep ingest it.
      expect((await settled(app, user.headers, entry.id, 20_000)).status).toBe('ready');
      expect((await entriesIn(app, user, folderId)).map((e) => e.filename)).toEqual(['doc.md']);
    });
  }, 60_000);

  it('upload, reindex and the ingestion sweep fail fast while Redis refuses connections; the entry waits, pending, for the sweep', async () => {
    await behindProxy(async (app, proxy, user, folderId) => {
      await proxy.close();
      const uploaded = await answeredQuickly(upload(app, user.headers, folderId, file('doc2.md')));
      expect(uploaded.statusCode, uploaded.body).toBe(201);
      const entry = uploaded.json<EntryBody>();
      const reindexed = await answeredQuickly(call(app, 'POST', `/knowledge-base/entries/${entry.id}/reindex`, user.headers));
      expect(reindexed.statusCode, reindexed.body).toBe(202);
      // Nor is a sweep, which queues the same job the same way.
      await answeredQuickly(expect(sweepIngestion(app.db, app.queue, { pendingAgeMs: 0, markMs: 0, ignoreMarks: true })).rejects.toThrow());
      const entries = await entriesIn(app, user, folderId);
      expect(entries.map((e) => [e.filename, e.status])).toEqual([['doc2.md', 'pending']]);
    });
  }, 60_000);
});
