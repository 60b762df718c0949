/**
 * A long PDF is indexed while it is read: its chunks are stored batch by batch as a generation of
 * their own, which search does not show until the entry is switched over to it whole.
 */
import { randomUUID } from 'node:crypto';

import { and, eq, sql } from 'drizzle-orm';
import { beforeAll, describe, expect, it } from 'vitest';

import { knowledgeChunks, knowledgeEntries } from '../../src/models/index.js';

import { sweepIngestion } from '../../src/services/knowledge/ingestion.js';
import { useTestApp } from '../helpers/app.js';
import { type Block, madeFile, writePdf } from '../helpers/documents.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { apiOf, eventually } from '../helpers/http.js';
import { createFolder, type EntryBody, ingested, search, settled, uploaded } from '../helpers/knowledge.js';

/** Text the PDF holds past which the reader hands text on as it reads (pdf.ts holds back 250,000 characters). */
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

async function chunksOf(entryId: string): Promise<{ generation: string | null; count: number }[]> {
  const rows = await ctx.database.db
    .select({ generation: knowledgeChunks.generation, count: sql<number>`count(*)::int` })
    .from(knowledgeChunks)
    .where(eq(knowledgeChunks.entry_id, entryId))
    .groupBy(knowledgeChunks.generation);
  return rows;
}

async function entryRow(entryId: string) {
  const [row] = await ctx.database.db.select().from(knowledgeEntries).where(eq(knowledgeEntries.id, entryId));
  return row!;
}

/** Waits until the entry's current ingestion has stored chunks while the entry is still `processing`; its claim. */
async function midway(entryId: string): Promise<string> {
  let claim = '';
  await eventually(async () => {
    const row = await entryRow(entryId);
    if (row.status !== 'processing' || !row.lease_token) return false;
    const [stored] = await ctx.database.db
      .select({ count: sql<number>`count(*)::int` })
      .from(knowledgeChunks)
      .where(and(eq(knowledgeChunks.entry_id, entryId), eq(knowledgeChunks.generation, row.lease_token)));
    claim = row.lease_token;
    return stored!.count > 0;
  }, 60_000);
  return claim;
}

let user: TestUser;
let folderId: string;
beforeAll(async () => {
  user = await createUser(ctx.app);
  folderId = (await createFolder(ctx.app, user.headers)).id;
});

describe('a PDF indexed while it is read', () => {
  it('stores chunks before the reading ends, shows the old ones until the new ones are whole, then only those', async () => {
    // ~260,000 characters: past what the reader holds back, so chunks are stored while it reads on.
    const content = await longPdf(30);
    const first = await ingested(ctx.app, user.headers, folderId, { filename: 'savanna.pdf', content });
    expect(first.chunk_count).toBeGreaterThan(300);
    const shown = await entryRow(first.id);
    expect(await chunksOf(first.id)).toEqual([{ generation: shown.chunk_generation, count: first.chunk_count }]);
    const before = await search(ctx.app, user.headers, { query: 'okapi acacia', entry_ids: [first.id], top_k: 50 });
    expect(before.data.length).toBeGreaterThan(0);

    expect((await api('POST', `/knowledge-base/entries/${first.id}/reindex`, user.headers)).statusCode).toBe(202);
    const claim = await midway(first.id);
    // Mid-way: the new generation is partly stored, and search still answers from the old one, whole.
    const during = await chunksOf(first.id);
    expect(during.find((row) => row.generation === shown.chunk_generation)?.count).toBe(first.chunk_count);
    expect(during.find((row) => row.generation === claim)!.count).toBeLessThan(first.chunk_count);
    const meanwhile = await search(ctx.app, user.headers, { query: 'okapi acacia', entry_ids: [first.id], top_k: 50 });
    expect(meanwhile.data).toEqual(before.data);

    const done = await settled(ctx.app, user.headers, first.id, 60_000);
    expect(done).toMatchObject({ status: 'ready', chunk_count: first.chunk_count, token_count: first.token_count });
    const after = await entryRow(first.id);
    expect(after.chunk_generation).toBe(claim);
    // Only the new generation is left; the same passages, found again.
    expect(await chunksOf(first.id)).toEqual([{ generation: claim, count: first.chunk_count }]);
    const found = await search(ctx.app, user.headers, { query: 'okapi acacia', entry_ids: [first.id], top_k: 50 });
    expect(found.data.map(({ text, chunk_index, heading_path }) => ({ text, chunk_index, heading_path }))).toEqual(
      before.data.map(({ text, chunk_index, heading_path }) => ({ text, chunk_index, heading_path })),
    );
  }, 120_000);

  it('drops what a job stored once a reindex took its claim mid-way: one generation is left, whole', async () => {
    const content = await longPdf(30);
    const entry = await uploaded(ctx.app, user.headers, folderId, { filename: 'taken.pdf', content });
    const firstClaim = await midway(entry.id);
    expect((await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, user.headers)).statusCode).toBe(202);
    const done = await settled(ctx.app, user.headers, entry.id, 60_000);
    expect(done.status, done.error ?? '').toBe('ready');
    const row = await entryRow(entry.id);
    expect(row.chunk_generation).not.toBe(firstClaim);
    // The first job stopped at its next batch; whatever it stored went when the second switched over.
    await eventually(async () => JSON.stringify(await chunksOf(entry.id)) === JSON.stringify([{ generation: row.chunk_generation, count: done.chunk_count }]), 30_000);
  }, 120_000);

  it('fails a PDF that passes the text limit after part of it was stored, and leaves no chunk behind', async () => {
    // ~345,000 characters: chunks are stored from 250,000 on, then the limit (300,000) is passed.
    const content = await longPdf(40);
    const entry = await uploaded(ctx.app, user.headers, folderId, { filename: 'too-long.pdf', content });
    await midway(entry.id);
    const failed: EntryBody = await settled(ctx.app, user.headers, entry.id, 60_000);
    expect(failed.status).toBe('failed');
    expect(failed.error).toContain('300,000 characters');
    expect(await chunksOf(entry.id)).toEqual([]);
    expect(failed.chunk_count).toBe(0);
  }, 120_000);

  it('never shows what a job that died midway stored, and drops it when the entry is indexed again', async () => {
    const entry = await ingested(ctx.app, user.headers, folderId, { filename: 'pangolin.txt', content: 'Pangolins roll into a ball when threatened.' });
    const { db } = ctx.database;
    // As a worker killed mid-ingestion leaves it: part of a generation stored, the claim's lease run out.
    const dead = randomUUID();
    await db.insert(knowledgeChunks).values({
      entry_id: entry.id,
      owner_id: user.user.id,
      generation: dead,
      chunk_index: 0,
      text: 'Half-stored zebra passage.',
      token_count: 5,
      tsv: sql`to_tsvector('english', 'Half-stored zebra passage.')`,
    });
    await db.update(knowledgeEntries).set({ status: 'processing', lease_token: dead, lease_expires_at: sql`now() - interval '1 second'` }).where(eq(knowledgeEntries.id, entry.id));
    expect((await search(ctx.app, user.headers, { query: 'zebra' })).data).toEqual([]);
    expect((await search(ctx.app, user.headers, { query: 'pangolins' })).data).toHaveLength(1);

    expect(await sweepIngestion(db, ctx.app.queue, 60_000)).toBeGreaterThanOrEqual(1);
    expect(await settled(ctx.app, user.headers, entry.id)).toMatchObject({ status: 'ready', chunk_count: 1 });
    const row = await entryRow(entry.id);
    expect(await chunksOf(entry.id)).toEqual([{ generation: row.chunk_generation, count: 1 }]);
    expect((await search(ctx.app, user.headers, { query: 'pangolins' })).data).toHaveLength(1);
  });
});
