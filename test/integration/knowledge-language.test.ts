import { and, eq, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { knowledgeEntries, usageRecords } from '../../src/models/index.js';

import { queryRows } from '../../src/crud/owned.js';
import { KNOWLEDGE_PREFIX } from '../../src/services/knowledge/files.js';
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
/** A Markdown document of one chunk per section (KB_CHUNK_TOKENS 32). */
const markdown = (sections: string[]) => sections.map((s, i) => `# Teil ${i}\n\n${s}`).join('\n\n');
/** Embedding calls for the document's chunks (KB_EMBED_BATCH 2). */
const EMBED_CALLS = SECTIONS.length / 2;
/** A longer document: more chunks than the 8 the claim once read for their language (SECTIONS first). */
const LONG_SECTIONS = [
  ...SECTIONS,
  'Der Bäcker backt das Brot für die ganze Gemeinde.',
  'Kinder spielen auf der Wiese hinter der Kirche.',
  'Im Herbst sammeln die Bauern die Äpfel ein.',
  'Der Zug nach der Stadt fährt zweimal am Tag.',
  'Auf dem Markt verkaufen die Frauen frisches Gemüse.',
  'Die Glocken läuten jeden Sonntag um zehn Uhr.',
  'Im Frühling blühen die Kirschbäume am Hang.',
  'Der Förster kennt jeden Weg im dunklen Wald.',
];
/** Chunks of figures alone (a table's opening rows), which every language indexes alike, before German text. */
const NUMERIC_OPENING = 8;
const NUMERIC_SECTIONS = [...Array.from({ length: NUMERIC_OPENING }, (_, i) => `${2010 + i} ${1000 + i * 37} ${i}.25 ${42 * (i + 1)}`), ...SECTIONS];
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

/** The language the entry records its chunks were indexed under (null: older code's). */
async function searchLanguageOf(entryId: string): Promise<string | null> {
  const [row] = await ctx.database.db.select({ language: knowledgeEntries.search_language }).from(knowledgeEntries).where(eq(knowledgeEntries.id, entryId));
  return row!.language;
}

/**
 * An entry of `sections` ingested under `english` and its chunks then; the embedding usage records
 * are written before it returns. Their full-text vectors are not German, but for `alike` (figures).
 */
async function ingestedInEnglish(filename: string, sections = SECTIONS, alike = 0) {
  const prior = await embedRecords();
  const folder = await createFolder(ctx.app, user.headers, { name: filename });
  const entry = await ingested(ctx.app, user.headers, folder.id, { filename, content: markdown(sections) });
  expect(entry.chunk_count).toBe(sections.length);
  // The ingestion's usage is written (USAGE_FLUSH_INTERVAL_MS): the counts compared below are after it.
  if (withVectors()) await eventually(async () => (await embedRecords()) === prior + sections.length / 2);
  const before = await chunksOf(entry.id);
  expect(before.map((c) => c.german)).toEqual(sections.map((_, i) => i < alike));
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

async function reindexed(app: FastifyInstance, entryId: string, chunkCount = SECTIONS.length): Promise<void> {
  const response = await call(app, 'POST', `/knowledge-base/entries/${entryId}/reindex`, user.headers);
  expect(response.statusCode, response.body).toBe(202);
  expect(await settled(app, user.headers, entryId)).toMatchObject({ status: 'ready', chunk_count: chunkCount, error: null });
}

/**
 * Reindexes the entry on a node set to `german`: no embedding asked for, the same rows and
 * embeddings (none deleted and stored again) with German full-text vectors, found by a German stem
 * (in the chunk `stemAt`), no embedding charged, and the entry records `german`.
 */
async function expectReindexedInGermanWithoutEmbedding(entryId: string, before: StoredChunk[], stemAt = 0): Promise<void> {
  const records = await embedRecords();
  fake.reset();
  await withApp({ KB_SEARCH_LANGUAGE: 'german' }, async (german) => {
    await reindexed(german, entryId, before.length);
    expect(fake.requestsFor('fake-embed')).toEqual([]);
    const after = await chunksOf(entryId);
    expect(after).toEqual(before.map((chunk) => ({ ...chunk, german: true })));
    if (withVectors()) expect(after.every((chunk) => chunk.embedding_model === 'fake-embed' && chunk.embedding_id !== null)).toBe(true);
    expect(await fullTextHits(german, entryId, STEM_QUERY)).toEqual([stemAt]);
  });
  expect(await embedRecords()).toBe(records);
  expect(await searchLanguageOf(entryId)).toBe('german');
}

/**
 * What a language reindex cut short after its first batch leaves, as ingestion writes it: the
 * first `converted` chunks' full-text vectors redone under `german` in place (`refreshFullText`'s
 * statement), the rest still English, and the entry as its claim left it (`chunk_count` kept, still
 * recording `english`) and then `state`:
 * - `processing`: its worker died (or still runs) with the lease not yet run out;
 * - `pending`: a passing fault handed it back for the queue's next try (`release`);
 * - `failed`: the job failed (`fail`: its chunks kept and hidden, nothing counted).
 * No node's sweeper re-queues it before the reindex that follows (a lease an hour ahead; a pending
 * entry's `updated_at` too, as the sweeper leaves one queued a moment ago): that reindex's claim is
 * what is tested.
 */
async function interruptedInGerman(entryId: string, converted: number, state: 'processing' | 'pending' | 'failed'): Promise<void> {
  const { db } = ctx.database;
  await db.execute(sql`update knowledge_chunks set tsv = to_tsvector('german', text) where entry_id = ${entryId} and chunk_index < ${converted}`);
  await db.execute(
    sql`update knowledge_entries set status = 'processing', attempts = 1, lease_token = gen_random_uuid(), lease_expires_at = now() + interval '1 hour', processing_started_at = now() where id = ${entryId}`,
  );
  if (state === 'pending') {
    await db.execute(sql`update knowledge_entries set status = 'pending', lease_token = null, lease_expires_at = null, updated_at = now() + interval '1 hour' where id = ${entryId}`);
  } else if (state === 'failed') {
    await db.execute(
      sql`update knowledge_entries set status = 'failed', error = 'Embedding stopped', chunk_count = 0, token_count = 0, chunks_hidden = true, lease_token = null, lease_expires_at = null, processed_at = now() where id = ${entryId}`,
    );
  }
  expect(await searchLanguageOf(entryId)).toBe('english');
}

/**
 * Reindexes the entry on `first`, whose job is then held midway (its extracted text's write waits)
 * while `meanwhile` runs: a reindex asked for then takes the entry over, and the first job, let go
 * after, finds its claim gone. A language reindex cut short as it happens, not as SQL would leave it.
 */
async function reindexTakenOver(first: FastifyInstance, entryId: string, meanwhile: () => Promise<void>): Promise<void> {
  const backend = first.storage(KNOWLEDGE_PREFIX).backend;
  const put = backend.put.bind(backend);
  let held = false;
  let letGo!: () => void;
  const released = new Promise<void>((resolve) => (letGo = resolve));
  backend.put = (key, body, mimeType) => {
    if (held || !key.endsWith('.txt')) return put(key, body, mimeType);
    held = true;
    return released.then(() => put(key, body, mimeType));
  };
  try {
    const response = await call(first, 'POST', `/knowledge-base/entries/${entryId}/reindex`, user.headers);
    expect(response.statusCode, response.body).toBe(202);
    await eventually(async () => held);
    await meanwhile();
  } finally {
    letGo();
    backend.put = put;
  }
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

  it.each(['processing', 'pending', 'failed'] as const)(
    'is resumed, embedding nothing, by a reindex after one cut short (%s) with its first 8 chunks already converted',
    async (state) => {
      const { entry, before } = await ingestedInEnglish(`dorf-long-${state}.md`, LONG_SECTIONS);
      // The first batch's chunks are German already; the entry records English until an indexing ends ready.
      await interruptedInGerman(entry.id, 8, state);
      await expectReindexedInGermanWithoutEmbedding(entry.id, before);
    },
  );

  it('is resumed, embedding nothing, by a reindex asked for while a language reindex runs (the first cut short by it)', async () => {
    const { entry, before } = await ingestedInEnglish('dorf-again.md', LONG_SECTIONS);
    const records = await embedRecords();
    fake.reset();
    await withApp({ KB_SEARCH_LANGUAGE: 'german' }, async (german) => {
      await reindexTakenOver(german, entry.id, () => reindexed(german, entry.id, LONG_SECTIONS.length));
    });
    expect(fake.requestsFor('fake-embed')).toEqual([]);
    expect(await chunksOf(entry.id)).toEqual(before.map((chunk) => ({ ...chunk, german: true })));
    expect(await embedRecords()).toBe(records);
    expect(await searchLanguageOf(entry.id)).toBe('german');
  });

  it('set back midway (a reindex under the old language while the new one runs) is resumed too, embedding nothing', async () => {
    const { entry, before } = await ingestedInEnglish('dorf-back.md', LONG_SECTIONS);
    const records = await embedRecords();
    fake.reset();
    await withApp({ KB_SEARCH_LANGUAGE: 'german' }, async (german) => {
      await reindexTakenOver(german, entry.id, () => reindexed(ctx.app, entry.id, LONG_SECTIONS.length));
    });
    expect(fake.requestsFor('fake-embed')).toEqual([]);
    expect(await chunksOf(entry.id)).toEqual(before);
    expect(await embedRecords()).toBe(records);
    expect(await searchLanguageOf(entry.id)).toBe('english');
  });

  it('is indexed without embedding for a document whose opening chunks read alike in both languages (figures)', async () => {
    // Their full-text vectors are German already: only the entry says the chunks were indexed under English.
    const { entry, before } = await ingestedInEnglish('dorf-table.md', NUMERIC_SECTIONS, NUMERIC_OPENING);
    await expectReindexedInGermanWithoutEmbedding(entry.id, before, NUMERIC_OPENING);
  });

  it("clears and embeds anew, once, an entry indexed by code older than the recorded language (its vectors may be a fallback's)", async () => {
    const { entry, before } = await ingestedInEnglish('dorf-old.md');
    expect(await searchLanguageOf(entry.id)).toBe('english');
    // As migration 0020 leaves the entries there before it.
    await ctx.database.db.execute(sql`update knowledge_entries set search_language = null where id = ${entry.id}`);
    const records = await embedRecords();
    fake.reset();
    await withApp({ KB_SEARCH_LANGUAGE: 'german' }, async (german) => {
      await reindexed(german, entry.id);
      const after = await chunksOf(entry.id);
      expect(after.map((chunk) => [chunk.chunk_index, chunk.german])).toEqual(SECTIONS.map((_, i) => [i, true]));
      expect(after.map((chunk) => chunk.id).filter((id) => before.some((old) => old.id === id))).toEqual([]);
      if (withVectors()) expect(fake.requestsFor('fake-embed').flatMap((request) => request.body.input as string[])).toEqual(SECTIONS);
    });
    if (withVectors()) await eventually(async () => (await embedRecords()) === records + EMBED_CALLS);
    expect(await searchLanguageOf(entry.id)).toBe('german');
    // Recorded now: the next change of language (back to English) embeds nothing.
    const reembedded = await chunksOf(entry.id);
    fake.reset();
    await reindexed(ctx.app, entry.id);
    expect(fake.requestsFor('fake-embed')).toEqual([]);
    expect(await chunksOf(entry.id)).toEqual(reembedded.map((chunk) => ({ ...chunk, german: false })));
    expect(await searchLanguageOf(entry.id)).toBe('english');
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
