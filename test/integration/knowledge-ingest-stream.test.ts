/**
 * A long PDF is indexed while it is read: its chunks are stored batch by batch while the reader's
 * thread goes on, under the job's claim; a claim starts from no chunks, so an entry never holds two
 * ingestions' chunks at once.
 */
import { randomUUID } from 'node:crypto';

import { eq, sql } from 'drizzle-orm';
import { beforeAll, describe, expect, it } from 'vitest';

import { knowledgeChunks, knowledgeEntries } from '../../src/models/index.js';

import { sweepIngestion } from '../../src/services/knowledge/ingestion.js';
import { useTestApp } from '../helpers/app.js';
import { type Block, madeFile, writePdf } from '../helpers/documents.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { apiOf, eventually } from '../helpers/http.js';
import { createFolder, type EntryBody, ingested, search, settled, SWEEP,uploaded } from '../helpers/knowledge.js';

/** Text past which the reader hands text on as it reads is 250,000 characters (pdf.ts); this test app's limit per document: */
const TEXT_LIMIT = 300_000;
const ctx = useTestApp({
  KB_MAX_FILE_BYTES: String(5 * 1024 * 1024),
  KB_MAX_BYTES_PER_USER: String(50 * 1024 * 1024),
  KB_CHUNK_TOKENS: '64',
  KB_CHUNK_OVERLAP_TOKENS: '8',
  KB_MAX_TEXT_CHARS: String(TEXT_LIMIT),
});
const api = apiOf(ctx);

const WORDS = 'okapi savanna migration herd watering acacia dusk predator grazing calf'.split(' ');
const paragraph = (n: number) => Array.from({ length: 600 }, (_, i) => WORDS[(i * 3 + n) % WORDS.length]).join(' ') + '.';

/** A PDF of `chapters` chapters of ~8,600 characters each, made once per size. */
const pdfs = new Map<number, Promise<Buffer>>();
function longPdf(chapters: number): Promise<Buffer> {
  let made = pdfs.get(chapters);
  if (!made) {
    const blocks: Block[] = [];
    for (let chapter = 1; chapter <= chapters; chapter++) blocks.push({ heading: 1, text: `Chapter ${chapter}` }, { text: paragraph(chapter) }, { text: paragraph(chapter + 1) });
    made = madeFile(`long-${chapters}.pdf`, (path) => writePdf(path, blocks));
    pdfs.set(chapters, made);
  }
  return made;
}

/** The entry's stored chunk numbers, in order. */
async function chunkIndexes(entryId: string): Promise<number[]> {
  const rows = await ctx.database.db.select({ index: knowledgeChunks.chunk_index }).from(knowledgeChunks).where(eq(knowledgeChunks.entry_id, entryId)).orderBy(knowledgeChunks.chunk_index);
  return rows.map((row) => row.index);
}

async function entryRow(entryId: string) {
  const [row] = await ctx.database.db.select().from(knowledgeEntries).where(eq(knowledgeEntries.id, entryId));
  return row!;
}

/** Waits until the entry's ingestion has stored chunks while it is still `processing` (still reading); its claim. */
async function midway(entryId: string): Promise<string> {
  let claim = '';
  await eventually(async () => {
    const row = await entryRow(entryId);
    if (row.status !== 'processing' || !row.lease_token) return false;
    claim = row.lease_token;
    return (await chunkIndexes(entryId)).length > 0;
  }, 60_000);
  return claim;
}

const numbered = (count: number) => Array.from({ length: count }, (_, i) => i);

let user: TestUser;
let folderId: string;
beforeAll(async () => {
  user = await createUser(ctx.app);
  folderId = (await createFolder(ctx.app, user.headers)).id;
});

describe('a PDF indexed while it is read', () => {
  it('stores chunks before the reading ends, and ends with each chunk once, in order, found by search', async () => {
    // ~260,000 characters: past what the reader holds back, so chunks are stored while it reads on.
    const content = await longPdf(30);
    const entry = await uploaded(ctx.app, user.headers, folderId, { filename: 'savanna.pdf', content });
    await midway(entry.id);
    const partial = await chunkIndexes(entry.id);
    const done = await settled(ctx.app, user.headers, entry.id, 60_000);
    expect(done.status, done.error ?? '').toBe('ready');
    expect(done.chunk_count).toBeGreaterThan(partial.length);
    expect(await chunkIndexes(entry.id)).toEqual(numbered(done.chunk_count));
    const found = await search(ctx.app, user.headers, { query: 'okapi acacia', entry_ids: [entry.id] });
    expect(found.data.length).toBeGreaterThan(0);
    expect(found.data[0]!.heading_path[0]).toMatch(/^Chapter \d+$/);

    // Indexed again: the same chunks, once each.
    expect((await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, user.headers)).statusCode).toBe(202);
    const again = await settled(ctx.app, user.headers, entry.id, 60_000);
    expect(again).toMatchObject({ status: 'ready', chunk_count: done.chunk_count, token_count: done.token_count });
    expect(await chunkIndexes(entry.id)).toEqual(numbered(done.chunk_count));
  }, 120_000);

  it('stops a job whose claim a reindex took mid-way: one set of chunks is left, whole', async () => {
    const content = await longPdf(30);
    const entry = await uploaded(ctx.app, user.headers, folderId, { filename: 'taken.pdf', content });
    const firstClaim = await midway(entry.id);
    expect((await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, user.headers)).statusCode).toBe(202);
    const done = await settled(ctx.app, user.headers, entry.id, 60_000);
    expect(done.status, done.error ?? '').toBe('ready');
    expect((await entryRow(entry.id)).attempts).toBe(1); // the reindex's own claim, not the first job's
    expect(firstClaim).not.toBe('');
    // The first job stored nothing after its claim was taken; the second started from no chunks.
    await eventually(async () => JSON.stringify(await chunkIndexes(entry.id)) === JSON.stringify(numbered(done.chunk_count)), 30_000);
  }, 120_000);

  it('fails a PDF that passes the text limit after part of it was stored, and leaves no chunk behind', async () => {
    // ~345,000 characters: chunks are stored from 250,000 on, then the limit (300,000) is passed.
    const content = await longPdf(40);
    // The chunks stored before the limit was passed, counted as their batches commit: polling for
    // them could miss the moment between the first batch and the failure (a fast machine, a slow poll).
    const { db } = ctx.database;
    await db.execute(sql`create table stored_chunks (entry_id uuid not null)`);
    await db.execute(sql.raw(`create function count_stored_chunk() returns trigger language plpgsql as $$ begin insert into stored_chunks values (new.entry_id); return null; end $$`));
    await db.execute(sql`create trigger count_stored_chunk after insert on knowledge_chunks for each row execute function count_stored_chunk()`);
    try {
      const entry = await uploaded(ctx.app, user.headers, folderId, { filename: 'too-long.pdf', content });
      const failed: EntryBody = await settled(ctx.app, user.headers, entry.id, 60_000);
      expect(failed.status).toBe('failed');
      expect(failed.error).toContain('300,000 characters');
      const [stored] = await db.execute(sql`select count(*)::int as count from stored_chunks where entry_id = ${entry.id}`).then((r) => (r as { rows: { count: number }[] }).rows);
      expect(stored!.count).toBeGreaterThan(0);
      expect(await chunkIndexes(entry.id)).toEqual([]);
      expect(failed.chunk_count).toBe(0);
    } finally {
      await db.execute(sql`drop trigger count_stored_chunk on knowledge_chunks`);
    }
  }, 120_000);

  it('drops what a job that died midway stored when the entry is claimed again', async () => {
    const entry = await ingested(ctx.app, user.headers, folderId, { filename: 'pangolin.txt', content: 'Pangolins roll into a ball when threatened.' });
    const { db } = ctx.database;
    // As a worker killed mid-ingestion leaves it: a batch stored, the claim's lease run out.
    await db.insert(knowledgeChunks).values({
      entry_id: entry.id,
      owner_id: user.user.id,
      chunk_index: 7,
      text: 'Half-stored zebra passage.',
      token_count: 5,
      tsv: sql`to_tsvector('english', 'Half-stored zebra passage.')`,
    });
    await db.update(knowledgeEntries).set({ status: 'processing', lease_token: randomUUID(), lease_expires_at: sql`now() - interval '1 second'` }).where(eq(knowledgeEntries.id, entry.id));
    expect(await sweepIngestion(db, ctx.app.queue, SWEEP)).toBeGreaterThanOrEqual(1);
    expect(await settled(ctx.app, user.headers, entry.id)).toMatchObject({ status: 'ready', chunk_count: 1 });
    expect(await chunkIndexes(entry.id)).toEqual([0]);
    expect((await search(ctx.app, user.headers, { query: 'zebra' })).data).toEqual([]);
    expect((await search(ctx.app, user.headers, { query: 'pangolins' })).data).toHaveLength(1);
  });
});
