import { and, eq, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { usageRecords } from '../../src/models/index.js';

import { queryRows } from '../../src/crud/owned.js';
import { buildTestApp, useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { call, eventually } from '../helpers/http.js';
import { createFolder, ingested, search, settled } from '../helpers/knowledge.js';
import { addFakeModels, FAKE_MODELS } from '../helpers/metered-models.js';

// A change of KB_SEARCH_LANGUAGE changes every chunk's full-text vector and none of its embeddings:
// the reindex README asks for after it must not embed (and charge) the document again.
const SETTINGS = { EMBEDDING_MODEL: 'fake-embed', KB_EMBED_BATCH: '2', KB_CHUNK_TOKENS: '32', KB_CHUNK_OVERLAP_TOKENS: '0', MODEL_MAX_RETRIES: '0' };
const ctx = useTestApp(SETTINGS);
// Embedded (PGlite) has pgvector: the chunks are embedded. The machine's PostgreSQL has none.
const withVectors = () => ctx.database.kind === 'pglite';

let fake: FakeModelServer;
let user: TestUser;

beforeAll(async () => {
  fake = await FakeModelServer.start();
  await addFakeModels(ctx.app, await superuserHeaders(ctx.app), fake.url);
  user = await createUser(ctx.app);
});
afterAll(async () => {
  await fake.close();
});
beforeEach(() => fake.reset());

// German, so that `german` stems what `english` keeps whole ("Häuser" is "haus" only in German).
const SECTIONS = [
  'Die alten Häuser stehen am Ufer des Flusses.',
  'Im Winter frieren die Seen in den Bergen zu.',
  'Die Fischer fahren früh am Morgen hinaus.',
  'Abends leuchten die Fenster der Dörfer.',
];
const DOCUMENT = { filename: 'dorf.md', content: SECTIONS.map((s, i) => `# Teil ${i}\n\n${s}`).join('\n\n') };
/** Embedding calls for the document's chunks (KB_EMBED_BATCH 2). */
const EMBED_CALLS = SECTIONS.length / 2;
/** A German stem of a word of the first chunk ("Häuser"): found by full text under `german` only. */
const STEM_QUERY = 'Haus';

interface StoredChunk {
  id: string;
  chunk_index: number;
  german: boolean;
  embedding_id: string | null;
  embedding_model: string | null;
}

/** The entry's chunks: whether their full-text vector is German, and their embedding (PGlite). */
function chunksOf(entryId: string): Promise<StoredChunk[]> {
  const embedding = withVectors()
    ? sql`(select e.id from knowledge_chunk_embeddings e where e.chunk_id = c.id) as embedding_id, (select e.model from knowledge_chunk_embeddings e where e.chunk_id = c.id) as embedding_model`
    : sql`null as embedding_id, null as embedding_model`;
  return queryRows<StoredChunk>(
    ctx.database.db,
    sql`select c.id, c.chunk_index, c.tsv = to_tsvector('german', c.text) as german, ${embedding} from knowledge_chunks c where c.entry_id = ${entryId} order by c.chunk_index`,
  );
}

/** The owner's usage records of embeddings answered (charged): not the queries' refused by `fullTextHits`. */
async function embedRecords(): Promise<number> {
  const rows = await ctx.database.db
    .select({ id: usageRecords.id })
    .from(usageRecords)
    .where(and(eq(usageRecords.owner_id, user.user.id), eq(usageRecords.operation, 'embed'), eq(usageRecords.status, 'success')));
  return rows.length;
}

/** The entry's full-text hits alone (their places): on PGlite the query's embedding is refused (search then answers with full text), on PostgreSQL there is none. */
async function fullTextHits(app: FastifyInstance, entryId: string, query: string): Promise<number[]> {
  if (withVectors()) fake.script('fake-embed', { status: 500 });
  const found = await search(app, user.headers, { query, entry_ids: [entryId] });
  expect(found.mode).toBe('full_text');
  return found.data.map((hit) => hit.chunk_index);
}

/** An entry ingested under `english` and its chunks then; the embedding usage records are written before it returns. */
async function ingestedInEnglish(filename: string) {
  const prior = await embedRecords();
  const folder = await createFolder(ctx.app, user.headers, { name: filename });
  const entry = await ingested(ctx.app, user.headers, folder.id, { ...DOCUMENT, filename });
  expect(entry.chunk_count).toBe(SECTIONS.length);
  // The ingestion's usage is written (USAGE_FLUSH_INTERVAL_MS): the counts compared below are after it.
  if (withVectors()) await eventually(async () => (await embedRecords()) === prior + EMBED_CALLS);
  const before = await chunksOf(entry.id);
  expect(before.map((c) => c.german)).toEqual(SECTIONS.map(() => false));
  return { entry, before };
}

/** A node of the same deployment with other settings (the database and stored files shared), closed after `use`. */
async function withApp(overrides: Record<string, string>, use: (app: FastifyInstance) => Promise<void>): Promise<void> {
  const app = await buildTestApp(ctx.database, { ...SETTINGS, DATA_DIR: ctx.app.settings.DATA_DIR, ...overrides });
  try {
    await use(app);
  } finally {
    // Writes the usage it metered.
    await app.close();
  }
}

async function reindexed(app: FastifyInstance, entryId: string): Promise<void> {
  const response = await call(app, 'POST', `/knowledge-base/entries/${entryId}/reindex`, user.headers);
  expect(response.statusCode, response.body).toBe(202);
  expect(await settled(app, user.headers, entryId)).toMatchObject({ status: 'ready', chunk_count: SECTIONS.length, error: null });
}

/**
 * Reindexes the entry on a node set to `german`: no embedding asked for, the same rows and
 * embeddings (none deleted and stored again) with German full-text vectors, found by a German stem,
 * and no embedding charged.
 */
async function expectReindexedInGermanWithoutEmbedding(entryId: string, before: StoredChunk[]): Promise<void> {
  const records = await embedRecords();
  fake.reset();
  await withApp({ KB_SEARCH_LANGUAGE: 'german' }, async (german) => {
    await reindexed(german, entryId);
    expect(fake.requestsFor('fake-embed')).toEqual([]);
    const after = await chunksOf(entryId);
    expect(after).toEqual(before.map((chunk) => ({ ...chunk, german: true })));
    if (withVectors()) expect(after.every((chunk) => chunk.embedding_model === 'fake-embed' && chunk.embedding_id !== null)).toBe(true);
    expect(await fullTextHits(german, entryId, STEM_QUERY)).toEqual([0]);
  });
  expect(await embedRecords()).toBe(records);
}

describe('a change of KB_SEARCH_LANGUAGE', () => {
  it('is indexed by a reindex that redoes the full-text vectors in place and embeds nothing: the embeddings are kept, nothing is charged', async () => {
    const { entry, before } = await ingestedInEnglish('dorf.md');
    expect(await fullTextHits(ctx.app, entry.id, STEM_QUERY)).toEqual([]);
    await expectReindexedInGermanWithoutEmbedding(entry.id, before);
  });

  it("is indexed the same way by a failed entry's reindex (which resumes from its kept chunks)", async () => {
    const { entry, before } = await ingestedInEnglish('dorf-failed.md');
    // As `fail` leaves it: its chunks kept, hidden, nothing counted.
    await ctx.database.db.execute(
      sql`update knowledge_entries set status = 'failed', error = 'Embedding stopped', chunk_count = 0, token_count = 0, chunks_hidden = true where id = ${entry.id}`,
    );
    await expectReindexedInGermanWithoutEmbedding(entry.id, before);
  });

  it('with EMBEDDING_MODEL changed too, still embeds every chunk by the new model (and charges it)', async () => {
    const { entry, before } = await ingestedInEnglish('dorf-2.md');
    const added = await call(ctx.app, 'POST', '/models', await superuserHeaders(ctx.app), {
      id: 'fake-embed-2',
      provider: 'fake',
      capabilities: ['embedding'],
      pricing: { input_cost_per_million_tokens: FAKE_MODELS.embed.input, output_cost_per_million_tokens: FAKE_MODELS.embed.output },
    });
    expect(added.statusCode, added.body).toBe(200);
    const records = await embedRecords();
    fake.reset();
    await withApp({ KB_SEARCH_LANGUAGE: 'german', EMBEDDING_MODEL: 'fake-embed-2' }, async (other) => {
      await reindexed(other, entry.id);
      const after = await chunksOf(entry.id);
      expect(after.map((chunk) => [chunk.chunk_index, chunk.german])).toEqual(SECTIONS.map((_, i) => [i, true]));
      if (!withVectors()) return;
      expect(fake.requestsFor('fake-embed-2').flatMap((request) => request.body.input as string[])).toEqual(SECTIONS);
      expect(after.map((chunk) => chunk.embedding_model)).toEqual(SECTIONS.map(() => 'fake-embed-2'));
      expect(after.map((chunk) => chunk.id).filter((id) => before.some((old) => old.id === id))).toEqual([]);
    });
    if (withVectors()) expect(await embedRecords()).toBe(records + EMBED_CALLS);
  });

  it('without a change of language, a reindex of a ready entry embeds it anew as before', async () => {
    const { entry, before } = await ingestedInEnglish('dorf-3.md');
    fake.reset();
    await reindexed(ctx.app, entry.id);
    const after = await chunksOf(entry.id);
    expect(after.map((chunk) => chunk.id).filter((id) => before.some((old) => old.id === id))).toEqual([]);
    if (withVectors()) expect(fake.requestsFor('fake-embed').flatMap((request) => request.body.input as string[])).toEqual(SECTIONS);
  });
});
