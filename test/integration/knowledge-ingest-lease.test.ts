/**
 * An ingestion job renews its claim while it waits for an embedding call, not only when it stores
 * a batch: with the defaults one call may last MODEL_TIMEOUT_MS x (MODEL_MAX_RETRIES + 1) +
 * MODEL_RETRY_MAX_WAIT_MS x MODEL_MAX_RETRIES = 400 s, past the 300 s lease, and the sweeper handed
 * the entry to another job, which paid for the same batch again (the first job's answer thrown away
 * at its write). Scaled down here: a 2 s lease, embedding calls that answer in 3 s.
 */
import { beforeAll, describe, expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { createFolder, settled, uploaded } from '../helpers/knowledge.js';
import { addFakeModels } from '../helpers/metered-models.js';

const ctx = useTestApp({
  EMBEDDING_MODEL: 'fake-embed',
  KB_EMBED_BATCH: '2',
  KB_CHUNK_TOKENS: '32',
  KB_CHUNK_OVERLAP_TOKENS: '0',
  MODEL_MAX_RETRIES: '0',
  MODEL_TIMEOUT_MS: '10000',
  KB_INGEST_LEASE_MS: '2000',
  KB_SWEEP_INTERVAL_MS: '1000',
  JOB_BACKOFF_MS: '10',
});

let fake: FakeModelServer;
beforeAll(async () => {
  fake = await FakeModelServer.start();
  await addFakeModels(ctx.app, await superuserHeaders(ctx.app), fake.url);
  return () => fake.close();
});

describe('the ingestion lease during a slow embedding call', () => {
  it('is kept by the job that waits for the model: the document ends ready, each batch paid once', async () => {
    if (ctx.database.kind !== 'pglite') return; // embeddings need pgvector
    fake.defaultReply = { ...fake.defaultReply, chunkDelayMs: 3_000 };
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const sections = ['Lighthouses guide ships.', 'Keepers trimmed wicks.', 'Lights run on solar power.', 'Fog horns warn vessels.'];
    const entry = await uploaded(ctx.app, user.headers, folder.id, { filename: 'lights.md', content: sections.map((s, i) => `# Part ${i}\n\n${s}`).join('\n\n') });
    const done = await settled(ctx.app, user.headers, entry.id, 60_000);
    const calls = fake.requestsFor('fake-embed').length;
    expect({ status: done.status, error: done.error, calls }).toEqual({ status: 'ready', error: null, calls: 2 });
  }, 90_000);
});
