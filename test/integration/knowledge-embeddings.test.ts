import { and, eq, sql } from 'drizzle-orm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { knowledgeChunks, usageRecords } from '../../src/models/index.js';

import { queryRows } from '../../src/crud/owned.js';
import { anyEmbedded } from '../../src/services/knowledge/embeddings.js';
import { KNOWLEDGE_PREFIX } from '../../src/services/knowledge/files.js';
import { sweepIngestion } from '../../src/services/knowledge/ingestion.js';
import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { fakeEmbedding, FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, eventually, sleep } from '../helpers/http.js';
import { createFolder, ingested, search, settled, storedFiles, SWEEP,uploaded } from '../helpers/knowledge.js';
import { addFakeModels } from '../helpers/metered-models.js';
import { createAgent, createThread, startRun, waitForRun } from '../helpers/runs.js';
import { intercepting } from '../helpers/statements.js';

// Embedded (PGlite) has pgvector: ingestion embeds and search is hybrid. The machine's PostgreSQL
// has none: the same app embeds nothing and searches full text only.
const ctx = useTestApp({ EMBEDDING_MODEL: 'fake-embed', KB_EMBED_BATCH: '2', KB_CHUNK_TOKENS: '32', KB_CHUNK_OVERLAP_TOKENS: '0', MODEL_MAX_RETRIES: '0', JOB_BACKOFF_MS: '10' });
const api = apiOf(ctx);
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

const SECTIONS = [
  'Lighthouses guide ships along rocky coasts at night.',
  'Keepers once trimmed the lamp wicks every few hours.',
  'Modern lights run automatically on solar power.',
  'Fog horns warn vessels when the beam cannot be seen.',
  'To be or not to be.',
];

describe('embeddings', () => {
  it('embeds the chunks in batches through the model manager (metered to the owner) where pgvector exists', async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'lights.md', content: SECTIONS.map((s, i) => `# Part ${i}\n\n${s}`).join('\n\n') });
    expect(entry.chunk_count).toBe(SECTIONS.length);
    const requests = fake.requestsFor('fake-embed');
    if (!withVectors()) {
      expect(requests).toEqual([]);
      expect((await api('GET', '/knowledge-base/stats', user.headers)).json()).toMatchObject({ vector_search: false });
      expect((await ctx.app.inject({ method: 'GET', url: '/ready' })).json()).toMatchObject({ vector_search: false });
      return;
    }
    // KB_EMBED_BATCH=2: 5 chunks in 3 requests.
    expect(requests.map((r) => (r.body.input as string[]).length)).toEqual([2, 2, 1]);
    const stored = await queryRows<{ n: number; dims: number }>(
      ctx.database.db,
      sql`select count(*)::int as n, max(vector_dims(e.embedding))::int as dims from knowledge_chunk_embeddings e join ${knowledgeChunks} c on c.id = e.chunk_id where c.entry_id = ${entry.id} and e.model = 'fake-embed'`,
    );
    expect(stored[0]).toEqual({ n: SECTIONS.length, dims: 8 });
    const index = await queryRows<{ indexdef: string }>(ctx.database.db, sql`select indexdef from pg_indexes where indexname = 'ix_knowledge_chunk_embeddings_hnsw_8'`);
    expect(index[0]?.indexdef).toMatch(/USING hnsw .*vector_cosine_ops.*WHERE \(vector_dims\(embedding\) = 8\)/);
    await eventually(async () => {
      const rows = await ctx.database.db
        .select()
        .from(usageRecords)
        .where(and(eq(usageRecords.owner_id, user.user.id), eq(usageRecords.operation, 'embed')));
      return rows.length >= 3;
    });
    expect((await api('GET', '/knowledge-base/stats', user.headers)).json()).toMatchObject({ vector_search: true });
    expect((await ctx.app.inject({ method: 'GET', url: '/ready' })).json()).toMatchObject({ vector_search: true });
  });

  it('searches hybrid where there are embeddings (finding what full text cannot), full text otherwise', async () => {
    const other = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, other.headers);
    const entry = await ingested(ctx.app, other.headers, folder.id, { filename: 'hamlet.txt', content: 'To be or not to be.' });
    // Only stop words: full text finds nothing; the query's embedding equals the chunk's.
    const found = await search(ctx.app, other.headers, { query: 'To be or not to be.' });
    if (!withVectors()) {
      expect(found).toEqual({ data: [], mode: 'full_text' });
      return;
    }
    expect(found.mode).toBe('hybrid');
    // Found by its vector alone: its passage comes with the nearest chunks, whole.
    const { score, ...hit } = found.data[0]!;
    expect(hit).toEqual({ entry_id: entry.id, filename: 'hamlet.txt', chunk_index: 0, text: 'To be or not to be.', heading_path: [] });
    expect(score).toBeGreaterThan(0);
    // Words full text knows still rank through the fusion.
    await ingested(ctx.app, other.headers, folder.id, { filename: 'coast.txt', content: 'Lighthouses guide ships along rocky coasts at night.' });
    const fused = await search(ctx.app, other.headers, { query: 'lighthouses ships' });
    expect(fused.mode).toBe('hybrid');
    expect(fused.data[0]!.text).toContain('Lighthouses');
    expect(fused.data[0]!.score).toBeGreaterThan(0);
    // Another user's embedded chunks never come back, however near.
    const stranger = await createUser(ctx.app);
    const strangers = await createFolder(ctx.app, stranger.headers);
    await ingested(ctx.app, stranger.headers, strangers.id, { filename: 'mine.txt', content: 'Nothing to see.' });
    expect((await search(ctx.app, stranger.headers, { query: 'To be or not to be.' })).data.map((h) => h.entry_id)).not.toContain(entry.id);
  });

  it('asks whether the caller has chunks embedded by the configured model: none by another model (EMBEDDING_MODEL changed), none of another user\'s', async () => {
    if (!withVectors()) return;
    const owner = await createUser(ctx.app);
    const stranger = await createUser(ctx.app);
    await ingested(ctx.app, owner.headers, (await createFolder(ctx.app, owner.headers)).id, { filename: 'lamp.txt', content: SECTIONS[1]! });
    const of = (someone: TestUser) => sql`knowledge_chunks.owner_id = ${someone.user.id}`;
    // More times than PGlite's prepared statements run before their generic plan.
    for (let round = 0; round < 7; round++) {
      expect(await anyEmbedded(ctx.database.db, 'fake-embed', of(owner))).toBe(true);
      expect(await anyEmbedded(ctx.database.db, 'another-embedding-model', of(owner))).toBe(false);
      expect(await anyEmbedded(ctx.database.db, 'fake-embed', of(stranger))).toBe(false);
    }
  });

  it('runs vector searches on the embedded database with the iterative HNSW scan set for its session (one statement, no SET LOCAL transaction)', async () => {
    if (!withVectors()) return;
    // Searches rely on it to look past the nearest chunks a filter removes (another user's); they wrap
    // the query in a transaction that sets it only where the session does not have it already.
    const [row] = await queryRows<{ value: string }>(ctx.database.db, sql`select current_setting('hnsw.iterative_scan') as value`);
    expect(row?.value).toBe('relaxed_order');
  });

  it('answers with full text alone when the query cannot be embedded', async () => {
    if (!withVectors()) return;
    const other = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, other.headers);
    await ingested(ctx.app, other.headers, folder.id, { filename: 'seals.txt', content: 'Seals rest on sandbanks at low tide.' });
    fake.script('fake-embed', { status: 500 });
    const found = await search(ctx.app, other.headers, { query: 'seals sandbanks' });
    expect(found.mode).toBe('full_text');
    expect(found.data[0]!.text).toContain('Seals');
    // The full-text candidates were looked up for fusion (more than asked): the answer keeps to top_k, best first.
    await ingested(ctx.app, other.headers, folder.id, { filename: 'seals-2.txt', content: 'Grey seals breed on remote beaches.' });
    fake.script('fake-embed', { status: 500 });
    const one = await search(ctx.app, other.headers, { query: 'seals sandbanks', top_k: 1 });
    expect(one).toMatchObject({ mode: 'full_text', data: [{ filename: 'seals.txt' }] });
    expect(one.data).toHaveLength(1);
  });

  it('retries an embedding provider that fails, then fails the entry with an error saying what to do', async () => {
    if (!withVectors()) return;
    const other = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, other.headers);
    fake.script('fake-embed', { status: 500 }, { status: 500 }, { status: 500 });
    const entry = await settled(ctx.app, other.headers, (await uploaded(ctx.app, other.headers, folder.id, { filename: 'x.txt', content: 'Puffins nest in burrows.' })).id);
    expect(entry.status).toBe('failed');
    expect(entry.error).toContain(`after ${ctx.app.settings.KB_INGEST_MAX_ATTEMPTS} attempts`);
    expect(entry.error).toContain('reindex');
    expect(fake.requestsFor('fake-embed')).toHaveLength(3);
    // With the provider back, a reindex succeeds.
    expect((await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, other.headers)).statusCode).toBe(202);
    expect(await settled(ctx.app, other.headers, entry.id)).toMatchObject({ status: 'ready', error: null });
  });

  it('a failed try whose text lands after its entry was deleted meanwhile removes it then: no file is left behind', async () => {
    if (!withVectors()) return;
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // The embedding fails (after a moment, so that the text's write has begun), and the text's
    // write is held until the entry is deleted: the failure is handled while the write is going.
    fake.script('fake-embed', { status: 500, chunkDelayMs: 200 }, { status: 500 }, { status: 500 });
    const backend = ctx.app.storage(KNOWLEDGE_PREFIX).backend;
    const put = backend.put.bind(backend);
    let entryId: Promise<string> | undefined;
    let deleted: Promise<number> | undefined;
    let written: Promise<void> | undefined;
    backend.put = (key, body, mimeType) => {
      if (!key.startsWith(`${KNOWLEDGE_PREFIX}/${user.user.id}/`) || !key.endsWith('.txt')) return put(key, body, mimeType);
      deleted = entryId!.then(async (id) => (await api('DELETE', `/knowledge-base/entries/${id}`, user.headers)).statusCode);
      written = deleted.then(() => put(key, body, mimeType));
      return written;
    };
    try {
      entryId = uploaded(ctx.app, user.headers, folder.id, { filename: 'puffins.txt', content: 'Puffins nest in burrows on cliffs.' }).then((entry) => entry.id);
      await entryId;
      await eventually(async () => deleted !== undefined);
      expect(await deleted).toBe(200);
      // The text lands after the deletion's purge; the failed try, watching its write, takes it away.
      await written;
      await eventually(async () => storedFiles(ctx.app.settings.dataDir, user.user.id).length === 0);
    } finally {
      backend.put = put;
    }
  });

  it("never takes another model's vectors for EMBEDDING_MODEL's: its fallbacks are not tried for chunks or queries", async () => {
    if (!withVectors()) return;
    const admin = await superuserHeaders(ctx.app);
    const created = await api('POST', '/models', admin, { id: 'fake-embed-other', provider: 'fake', capabilities: ['embedding'], pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '0' } });
    expect(created.statusCode, created.body).toBe(200);
    expect((await api('PATCH', '/models/fake-embed', admin, { fallbacks: ['fake-embed-other'] })).statusCode).toBe(200);
    try {
      const other = await createUser(ctx.app);
      const folder = await createFolder(ctx.app, other.headers);
      await ingested(ctx.app, other.headers, folder.id, { filename: 'terns.txt', content: 'Arctic terns migrate from pole to pole.' });
      // The query: full text alone, not a fallback's vector ranked against fake-embed's.
      fake.script('fake-embed', { status: 500 });
      const found = await search(ctx.app, other.headers, { query: 'terns migrate' });
      expect(found.mode).toBe('full_text');
      // The chunks: the entry fails (to be reindexed), rather than storing another model's vectors as fake-embed's.
      fake.script('fake-embed', { status: 500 }, { status: 500 }, { status: 500 });
      const entry = await settled(ctx.app, other.headers, (await uploaded(ctx.app, other.headers, folder.id, { filename: 'auks.txt', content: 'Little auks dive for plankton.' })).id);
      expect(entry.status).toBe('failed');
      expect(fake.requestsFor('fake-embed-other')).toEqual([]);
    } finally {
      expect((await api('PATCH', '/models/fake-embed', admin, { fallbacks: [] })).statusCode).toBe(200);
    }
  });

  it("meters an agent run's knowledge_search query embedding to the run and its agent", async () => {
    if (!withVectors()) return;
    const owner = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, owner.headers);
    const entry = await ingested(ctx.app, owner.headers, folder.id, { filename: 'otters.md', content: '# Otters\n\nSea otters hold hands while they sleep.' });
    const agent = await createAgent(ctx.app, owner.headers, { tools: ['knowledge_search'], knowledge: { folder_ids: [folder.id] } });
    fake.script('fake-precise', { toolCalls: [{ id: 'call_1', name: 'knowledge_search', arguments: JSON.stringify({ query: 'otters sleep' }) }] }, { text: 'They hold hands.' });
    const thread = await createThread(ctx.app, owner.headers);
    const run = await startRun(ctx.app, owner.headers, thread.id, { agent_id: agent.id, input: 'otters?' });
    expect((await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed'])).status).toBe('completed');
    const messages = (await api('GET', `/threads/${thread.id}/messages`, owner.headers)).json<{ data: { metadata: { sources?: { entry_id: string }[] } }[] }>().data;
    expect(messages.at(-1)!.metadata.sources!.map((s) => s.entry_id)).toEqual([entry.id]);
    await eventually(async () => {
      const rows = await ctx.database.db
        .select({ agent_id: usageRecords.agent_id })
        .from(usageRecords)
        .where(and(eq(usageRecords.run_id, run.id), eq(usageRecords.operation, 'embed')));
      return rows.length === 1 && rows[0]!.agent_id === agent.id;
    });
  });

  it('a job taking over an indexing (a worker died, a retry) stores only the chunks missing or not as they are now, and embeds only those; a reindex embeds everything', async () => {
    const other = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, other.headers);
    const entry = await ingested(ctx.app, other.headers, folder.id, { filename: 'lights.md', content: SECTIONS.map((s, i) => `# Part ${i}\n\n${s}`).join('\n\n') });
    const { db } = ctx.database;
    const chunksOf = () =>
      queryRows<{ id: string; chunk_index: number; text: string; tsv_current: boolean }>(
        db,
        sql`select id, chunk_index, text, tsv = to_tsvector('english', text) as tsv_current from knowledge_chunks where entry_id = ${entry.id} order by chunk_index`,
      );
    const before = await chunksOf();
    const texts = before.map((c) => c.text);
    expect(texts).toEqual(SECTIONS);
    // As a worker killed midway leaves it: its claim's lease run out after one attempt, and of what it
    // stored, chunk 1 with another text (cut with other settings), chunk 2 with another language's
    // full-text vector, and a chunk past the document's end.
    await db.execute(
      sql`update knowledge_entries set status = 'processing', attempts = 1, lease_token = gen_random_uuid(), lease_expires_at = now() - interval '1 second' where id = ${entry.id}`,
    );
    await db.execute(sql`update knowledge_chunks set text = 'Stale text', tsv = to_tsvector('english', 'Stale text') where id = ${before[1]!.id}`);
    await db.execute(sql`update knowledge_chunks set tsv = to_tsvector('simple', text) where id = ${before[2]!.id}`);
    await db.execute(
      sql`insert into knowledge_chunks (entry_id, owner_id, chunk_index, text, token_count, tsv) values (${entry.id}, ${other.user.id}, 7, 'Left over', 2, to_tsvector('english', 'Left over'))`,
    );
    // Chunk 3's embedding by another model (EMBEDDING_MODEL changed), chunk 4's missing.
    if (withVectors()) {
      await db.execute(sql`update knowledge_chunk_embeddings set model = 'another-embedding-model' where chunk_id = ${before[3]!.id}`);
      await db.execute(sql`delete from knowledge_chunk_embeddings where chunk_id = ${before[4]!.id}`);
    }
    fake.reset();
    // The stored batch is read with its embeddings in one statement (they were two).
    const reads: string[] = [];
    await intercepting(
      db,
      (text, params) => {
        if (/^\s*select/i.test(text) && (params.includes(entry.id) || text.includes('from knowledge_chunk_embeddings where model'))) reads.push(text);
      },
      async () => {
        expect(await sweepIngestion(db, ctx.app.queue, SWEEP)).toBeGreaterThanOrEqual(1);
        expect(await settled(ctx.app, other.headers, entry.id)).toMatchObject({ status: 'ready', chunk_count: SECTIONS.length, error: null });
      },
    );
    expect(reads.filter((text) => text.includes('between'))).toHaveLength(1);
    expect(reads.filter((text) => text.includes('from knowledge_chunk_embeddings where model'))).toEqual([]);
    const after = await chunksOf();
    expect(after.map((c) => [c.chunk_index, c.text, c.tsv_current])).toEqual(SECTIONS.map((text, i) => [i, text, true]));
    // Chunk 0 was kept as it was.
    expect(after[0]!.id).toBe(before[0]!.id);
    const embedded = () => fake.requestsFor('fake-embed').map((r) => r.body.input);
    if (!withVectors()) {
      expect(embedded()).toEqual([]);
      return;
    }
    expect(embedded()).toEqual([texts.slice(1, 3), texts.slice(3, 5)]);
    const vectors = await queryRows<{ chunk_index: number; model: string }>(
      db,
      sql`select c.chunk_index, e.model
          from knowledge_chunks c join knowledge_chunk_embeddings e on e.chunk_id = c.id where c.entry_id = ${entry.id} order by c.chunk_index`,
    );
    expect(vectors.map((v) => [v.chunk_index, v.model])).toEqual(SECTIONS.map((_, i) => [i, 'fake-embed']));
    for (const [i, text] of texts.entries()) {
      const [own] = await queryRows<{ d: number }>(
        db,
        sql`select e.embedding <=> ${`[${fakeEmbedding(text).join(',')}]`}::vector as d from knowledge_chunk_embeddings e join knowledge_chunks c on c.id = e.chunk_id
            where c.entry_id = ${entry.id} and c.chunk_index = ${i}`,
      );
      expect(Number(own!.d), text).toBeLessThan(1e-6);
    }
    // A reindex, asked for, embeds the whole document again.
    fake.reset();
    expect((await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, other.headers)).statusCode).toBe(202);
    expect(await settled(ctx.app, other.headers, entry.id)).toMatchObject({ status: 'ready', chunk_count: SECTIONS.length });
    expect(embedded()).toEqual([texts.slice(0, 2), texts.slice(2, 4), texts.slice(4)]);
  });
  it("a failed entry keeps its chunks (and their embeddings) but search never shows them, whatever the mode; its reindex resumes from them", async () => {
    const other = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, other.headers);
    const entry = await ingested(ctx.app, other.headers, folder.id, { filename: 'lights.md', content: SECTIONS.map((s, i) => `# Part ${i}\n\n${s}`).join('\n\n') });
    const { db } = ctx.database;
    const query = { query: 'keepers trimmed lamp wicks' };
    const found = await search(ctx.app, other.headers, query);
    expect(found.data.map((hit) => hit.chunk_index)).toContain(1);
    // Its last attempt's worker died: the claim after it fails the entry (out of attempts).
    await db.execute(
      sql`update knowledge_entries set status = 'processing', attempts = ${ctx.app.settings.KB_INGEST_MAX_ATTEMPTS}, lease_token = gen_random_uuid(), lease_expires_at = now() - interval '1 second' where id = ${entry.id}`,
    );
    fake.reset();
    await sweepIngestion(db, ctx.app.queue, SWEEP);
    const failed = await settled(ctx.app, other.headers, entry.id);
    expect(failed).toMatchObject({ status: 'failed', chunk_count: 0 });
    const stored = await queryRows<{ n: number }>(db, sql`select count(*)::int as n from knowledge_chunks where entry_id = ${entry.id}`);
    expect(stored[0]!.n).toBe(SECTIONS.length);
    if (withVectors()) {
      const vectors = await queryRows<{ n: number }>(db, sql`select count(*)::int as n from knowledge_chunk_embeddings e join knowledge_chunks c on c.id = e.chunk_id where c.entry_id = ${entry.id}`);
      expect(vectors[0]!.n).toBe(SECTIONS.length);
    }
    // Not found by full text nor by vectors (another of the owner's entries embedded beside it: hybrid
    // mode), searched everywhere, by its folder or by the entry itself.
    const second = await ingested(ctx.app, other.headers, folder.id, { filename: 'more.md', content: 'Keepers trimmed lamp wicks in the old days.' });
    for (const scope of [{}, { folder_ids: [folder.id] }, { entry_ids: [entry.id] }]) {
      const hits = await search(ctx.app, other.headers, { ...query, ...scope });
      expect(hits.data.map((hit) => hit.entry_id)).not.toContain(entry.id);
    }
    expect((await search(ctx.app, other.headers, query)).data.map((hit) => hit.entry_id)).toEqual([second.id]);
    expect((await search(ctx.app, other.headers, { ...query, entry_ids: [entry.id] })).data).toEqual([]);
    // Nor by the query only its vector finds (stop words: nothing for full text; the same embedding as chunk 4's).
    const byVector = await search(ctx.app, other.headers, { query: SECTIONS[4] });
    expect(byVector.mode).toBe(withVectors() ? 'hybrid' : 'full_text');
    expect(byVector.data.map((hit) => hit.entry_id)).not.toContain(entry.id);
    // Nor once a reindex is asked for, before its job has checked them (they may be another
    // cutting's, or the document may fail again): neither `pending` (as the reindex route leaves
    // it) nor `processing` (as a worker's claim does), only once it is ready again.
    const beforeReady = [
      sql`status = 'pending', error = null, attempts = 0, lease_token = null, lease_expires_at = null, updated_at = now()`,
      sql`status = 'processing', attempts = 1, lease_token = gen_random_uuid(), lease_expires_at = now() + interval '1 minute'`,
    ];
    for (const state of beforeReady) {
      await db.execute(sql`update knowledge_entries set ${state} where id = ${entry.id}`);
      for (const asked of [query, { query: SECTIONS[4] }]) {
        for (const scope of [{}, { folder_ids: [folder.id] }, { entry_ids: [entry.id] }]) {
          const hits = await search(ctx.app, other.headers, { ...asked, ...scope });
          expect(hits.data.map((hit) => hit.entry_id)).not.toContain(entry.id);
        }
      }
    }
    // The reindex embeds nothing again: every chunk is there as it is cut now, with its embedding.
    fake.reset();
    expect((await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, other.headers)).statusCode).toBe(202);
    expect(await settled(ctx.app, other.headers, entry.id)).toMatchObject({ status: 'ready', chunk_count: SECTIONS.length, error: null });
    expect(fake.requestsFor('fake-embed')).toHaveLength(0);
    expect((await search(ctx.app, other.headers, query)).data.map((hit) => hit.entry_id)).toContain(entry.id);
  });
  it('a retry after the chunking changed drops the earlier cutting\'s chunks from its first difference on, so old and new chunks never show side by side', async () => {
    const other = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, other.headers);
    const entry = await ingested(ctx.app, other.headers, folder.id, { filename: 'lights.md', content: SECTIONS.map((s, i) => `# Part ${i}\n\n${s}`).join('\n\n') });
    const { db } = ctx.database;
    const texts = () => queryRows<{ text: string }>(db, sql`select text from knowledge_chunks where entry_id = ${entry.id} order by chunk_index`).then((rows) => rows.map((r) => r.text));
    // As an attempt with smaller chunks left it: section 1 in two chunks, every later one a place further on.
    const [head, tail] = [SECTIONS[1]!.slice(0, 20), SECTIONS[1]!.slice(20)];
    await db.execute(sql`update knowledge_chunks set chunk_index = chunk_index + 100 where entry_id = ${entry.id} and chunk_index >= 2`);
    await db.execute(sql`update knowledge_chunks set chunk_index = chunk_index - 99 where entry_id = ${entry.id} and chunk_index >= 100`);
    await db.execute(sql`update knowledge_chunks set text = ${head}, tsv = to_tsvector('english', ${head}) where entry_id = ${entry.id} and chunk_index = 1`);
    await db.execute(
      sql`insert into knowledge_chunks (entry_id, owner_id, chunk_index, text, heading_path, token_count, tsv) values (${entry.id}, ${other.user.id}, 2, ${tail}, '{Part 1}', 8, to_tsvector('english', ${tail}))`,
    );
    expect(await texts()).toEqual([SECTIONS[0], head, tail, ...SECTIONS.slice(2)]);
    await db.execute(
      sql`update knowledge_entries set status = 'processing', attempts = 1, lease_token = gen_random_uuid(), lease_expires_at = now() - interval '1 second' where id = ${entry.id}`,
    );
    fake.reset();
    if (withVectors()) {
      // The retry's second embedding call answers late: what is stored meanwhile is what search shows.
      fake.script('fake-embed', {}, { chunkDelayMs: 1_500 });
      await sweepIngestion(db, ctx.app.queue, SWEEP);
      await fake.waitFor((log) => log.filter((r) => r.model === 'fake-embed').length === 2);
      await sleep(200);
      expect(await texts()).toEqual(SECTIONS.slice(0, 3));
    } else {
      await sweepIngestion(db, ctx.app.queue, SWEEP);
    }
    expect(await settled(ctx.app, other.headers, entry.id)).toMatchObject({ status: 'ready', chunk_count: SECTIONS.length });
    expect(await texts()).toEqual(SECTIONS);
    if (withVectors()) expect(fake.requestsFor('fake-embed').map((r) => r.body.input)).toEqual([SECTIONS.slice(1, 3), SECTIONS.slice(3, 5)]);
  });
});
