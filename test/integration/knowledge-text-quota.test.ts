/**
 * KB_MAX_BYTES_PER_USER counts each entry for the larger of its file and the text its chunks hold,
 * counted once (`text_bytes`, the chunks' overlap left out, each chunk at least
 * MIN_CHUNK_CHARGE_BYTES; at least 4 KiB): a Flate-compressed PDF of a few KiB extracts to ~100× its size,
 * and the quota of uploaded bytes alone let one user store ~5 GB of text under 50 MB. An ingestion
 * whose text would pass what is left fails the entry and keeps none of the text; two of one user's
 * at once take the owner's lock to count, as uploads do, so they never pass it together.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { eq, sql } from 'drizzle-orm';
import { beforeAll, describe, expect, it } from 'vitest';

import type { Settings } from '../../src/core/config.js';
import { type Db, type SqlSession, transaction } from '../../src/core/db.js';

import { knowledgeChunks, knowledgeEntries } from '../../src/models/index.js';

import { unfinishedWithoutJob } from '../../src/crud/knowledge.js';
import { chargedChunkBytes, ChunkCutter, chunkOptionsFrom, MIN_CHUNK_CHARGE_BYTES, ownTextBytes } from '../../src/modules/knowledge/chunk.js';
import { extractDocument, extractLimitsFrom } from '../../src/modules/knowledge/extract.js';
import type { DocumentChunk } from '../../src/modules/knowledge/types.js';
import { ingestEntry } from '../../src/services/knowledge/ingestion.js';
import { useTestApp } from '../helpers/app.js';
import { madeFile, writeTextPdf } from '../helpers/documents.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, eventually } from '../helpers/http.js';
import { createFolder, type EntryBody, ingested, settled, storedFiles, upload, uploaded } from '../helpers/knowledge.js';
import { lockWaits } from '../helpers/lock-waits.js';
import { addFakeModels } from '../helpers/metered-models.js';

const QUOTA = 200_000;
// Embedded where pgvector is (PGlite): text over the quota is refused before it is embedded, and paid for.
// A retry waits 3 s, the next 6 s (JOB_BACKOFF_MS, doubled each try; 2 s by default): the retry
// tests read what a try kept, and lift the fault, before the next try starts, which a loaded CI
// machine must have time for. What they read it against, the PDF's cut (an extraction), they cut
// before the first try (documentOf keeps it): between tries only queries are left (at 2 s, the
// cut made between them, they raced the retry). No sweep but the start's: the tests of a dead
// worker hand its entry on themselves.
const ctx = useTestApp({
  KB_MAX_BYTES_PER_USER: String(QUOTA),
  KB_MAX_FILE_BYTES: String(QUOTA / 2),
  EMBEDDING_MODEL: 'fake-embed',
  MODEL_MAX_RETRIES: '0',
  JOB_BACKOFF_MS: '3000',
  KB_SWEEP_INTERVAL_MS: '3600000',
});
const api = apiOf(ctx);
const { rowsOf, waitingForLocks } = lockWaits(ctx);
const onServer = !!process.env.DATABASE_URL;

let fake: FakeModelServer;
beforeAll(async () => {
  fake = await FakeModelServer.start();
  await addFakeModels(ctx.app, await superuserHeaders(ctx.app), fake.url);
  return () => fake.close();
});
const embeddingCalls = () => fake.requestsFor('fake-embed').length;

const LINE = 'The refund policy applies to every order placed through the online shop, whatever the currency';

/** A Flate PDF of ~1 KiB per thousand lines whose text is ~100 KB per thousand (~115 KB in chunks, which repeat an overlap each): one batch of chunks up to ~2,000. */
const textPdf = (lines: number) => madeFile('doc.pdf', (path) => writeTextPdf(path, Array.from({ length: lines }, (_, i) => `${LINE} (${i % 7}).`)));

/** What the database holds of the entry's text: its chunks and their UTF-8 bytes; its row's count and attempts. */
async function heldText(entryId: string) {
  const [chunks] = await ctx.app.db
    .select({ n: sql<number>`count(*)`.mapWith(Number), bytes: sql<number>`coalesce(sum(octet_length(${knowledgeChunks.text})), 0)`.mapWith(Number) })
    .from(knowledgeChunks)
    .where(eq(knowledgeChunks.entry_id, entryId));
  const [row] = await ctx.app.db.select({ text_bytes: knowledgeEntries.text_bytes, attempts: knowledgeEntries.attempts }).from(knowledgeEntries).where(eq(knowledgeEntries.id, entryId));
  return { chunks: chunks!.n, chunkBytes: chunks!.bytes, ...row! };
}

/** documentOf's cuts by file, settings and name: a test reads one file's several times, and a cut is an extraction. */
const cuts = new WeakMap<Buffer, Map<Settings, Map<string, Promise<DocumentChunk[]>>>>();

/** The chunks ingestion cuts of `file` (a PDF unless named otherwise), with `settings` (this app's unless given); cut once for each. */
function documentOf(file: Buffer, settings: Settings = ctx.app.settings, filename = 'doc.pdf'): Promise<DocumentChunk[]> {
  const bySettings = cuts.get(file) ?? new Map<Settings, Map<string, Promise<DocumentChunk[]>>>();
  cuts.set(file, bySettings);
  const byName = bySettings.get(settings) ?? new Map<string, Promise<DocumentChunk[]>>();
  bySettings.set(settings, byName);
  let cut = byName.get(filename);
  if (!cut) {
    cut = cutDocument(file, settings, filename);
    byName.set(filename, cut);
  }
  return cut;
}

async function cutDocument(file: Buffer, settings: Settings, filename: string): Promise<DocumentChunk[]> {
  const dir = await mkdtemp(join(tmpdir(), 'keel-quota-'));
  try {
    const path = join(dir, filename);
    await writeFile(path, file);
    const document = await extractDocument({ path, filename }, extractLimitsFrom(settings));
    return [...new ChunkCutter(chunkOptionsFrom(settings)).cut(document.sections)];
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * What the entry's stored chunks count for, each chunk's lead (the overlap) left out and each at
 * least MIN_CHUNK_CHARGE_BYTES: they are the first of `file` as `settings` cut it (checked), and
 * `bytes` is what its text_bytes should say.
 */
async function storedTextOf(entryId: string, file: Buffer, settings: Settings = ctx.app.settings): Promise<{ chunks: number; bytes: number }> {
  const kept = await rowsOf<{ text: string }>(sql`select text from knowledge_chunks where entry_id = ${entryId} order by chunk_index`);
  const cut = (await documentOf(file, settings)).slice(0, kept.length);
  expect(cut.map((chunk) => chunk.text)).toEqual(kept.map((row) => row.text));
  return { chunks: kept.length, bytes: cut.reduce((sum, chunk) => sum + chargedChunkBytes(chunk), 0) };
}

/** The text of all of `file`'s chunks as `settings` cut it, counted once (each chunk at least MIN_CHUNK_CHARGE_BYTES): a ready entry's text_bytes. */
const wholeTextOf = async (file: Buffer, settings: Settings = ctx.app.settings) => (await documentOf(file, settings)).reduce((sum, chunk) => sum + chargedChunkBytes(chunk), 0);

/** What counting each of `file`'s chunks for at least MIN_CHUNK_CHARGE_BYTES adds to its text counted once (its last chunk, short, rounded up). */
const minimumAddedTo = async (file: Buffer, settings: Settings = ctx.app.settings, filename?: string) =>
  (await documentOf(file, settings, filename)).reduce((sum, chunk) => sum + chargedChunkBytes(chunk) - ownTextBytes(chunk), 0);

/** Ingestion's dependencies as the app's worker has them, with `settings` (this app's unless given): for a job run by the test. */
const ingestionDeps = (settings: Settings = ctx.app.settings) => ({ db: ctx.app.db, settings, log: ctx.app.log, models: ctx.app.models });

/**
 * Runs `work` with a test trigger that raises `raise` (a plpgsql RAISE's arguments) before each
 * row of `table` it is `on` (e.g. insert) whose `when` holds; dropped after, whatever happens.
 */
async function withFault<T>(fault: { table: string; on: string; when: string; raise: string }, work: () => Promise<T>): Promise<T> {
  await ctx.app.db.execute(sql.raw(`create function test_fault() returns trigger language plpgsql as $$ begin raise ${fault.raise}; end $$`));
  await ctx.app.db.execute(sql.raw(`create trigger test_fault before ${fault.on} on ${fault.table} for each row when (${fault.when}) execute function test_fault()`));
  try {
    return await work();
  } finally {
    await dropFault(fault.table);
  }
}

/** Drops withFault's trigger (if still there) before its work ends: the fault passes. */
async function dropFault(table: string): Promise<void> {
  await ctx.app.db.execute(sql.raw(`drop trigger if exists test_fault on ${table}`));
  await ctx.app.db.execute(sql.raw('drop function if exists test_fault()'));
}

/** A PDF of `lines` lines, ~100 KB of text per thousand, then one line with POISON (which a fault can refuse to store); its chunk is the last. */
const poisonedPdf = (lines: number) => madeFile('doc.pdf', (path) => writeTextPdf(path, [...Array.from({ length: lines }, (_, i) => `${LINE} (${i % 7}).`), 'POISON']));

/** Refuses to store the chunk holding POISON: with `raise` (by default an internal error, failing the entry for good). */
const poisonedChunk = (raise = `exception 'poisoned chunk'`) => ({ table: 'knowledge_chunks', on: 'insert', when: `new.text like '%POISON%'`, raise });

/** A serialization failure (40001): a transient conflict, which the job's write runs again, then hands to the queue's next try. */
const CONFLICT = `exception 'test conflict' using errcode = '40001'`;

/** Waits until the entry's `attempts`-th try has handed it back for the next one (pending, its count written). */
async function releasedAfter(entryId: string, attempts: number): Promise<void> {
  await eventually(async () => {
    const [row] = await ctx.app.db.select({ status: knowledgeEntries.status, attempts: knowledgeEntries.attempts }).from(knowledgeEntries).where(eq(knowledgeEntries.id, entryId));
    expect(row!.attempts).toBeLessThanOrEqual(attempts);
    return row!.status === 'pending' && row!.attempts === attempts;
  }, 15_000);
}

/**
 * The entry's extracted text (`GET …/content`): `text_bytes` counts it once, from its UTF-8 bytes
 * without white space (trimmed between chunks) up to all of them, plus `minimum`: what counting
 * its short chunks for MIN_CHUNK_CHARGE_BYTES adds (`minimumAddedTo`).
 */
async function expectTextCountedOnce(user: TestUser, entryId: string, textBytes: number, minimum: number) {
  const content = (await api('GET', `/knowledge-base/entries/${entryId}/content`, user.headers)).body;
  expect(textBytes - minimum).toBeLessThanOrEqual(Buffer.byteLength(content));
  expect(textBytes - minimum).toBeGreaterThanOrEqual(Buffer.byteLength(content.replace(/\s+/g, '')));
}

async function quotaUsed(user: TestUser): Promise<number> {
  return (await api('GET', '/knowledge-base/stats', user.headers)).json<{ quota_bytes_used: number }>().quota_bytes_used;
}

const overQuota = (textAtLeast: string, file: number, left: number, others: number) =>
  `Storage quota exceeded by the extracted text: the document's text counts for at least ${textAtLeast} (each passage counts for at least ${MIN_CHUNK_CHARGE_BYTES} bytes, ` +
  `so many short sections count for more than their text; its file ${file} bytes (0.0 MiB); an entry counts for the larger) ` +
  `but only ${left} bytes (0.2 MiB) of your ${QUOTA} bytes (0.2 MiB) are left for it (${others} bytes (0.0 MiB) used by your other entries); ` +
  'delete entries to make room and reindex this one, or upload a shorter document or one of fewer, longer sections';

describe('the storage quota counts extracted text', () => {
  it('fails a small compressed PDF whose text is more than the quota, with the figures, keeping none of its text, and does not retry it', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const pdf = await textPdf(2_500);
    expect(pdf.length).toBeLessThan(4096);
    const calls = embeddingCalls();
    const entry = await settled(ctx.app, user.headers, (await uploaded(ctx.app, user.headers, folder.id, { filename: 'refunds.pdf', content: pdf })).id);
    expect(entry.status).toBe('failed');
    // Refused before any of it was embedded.
    expect(embeddingCalls()).toBe(calls);
    const textAtLeast = /at least (\d+ bytes \(\d+\.\d MiB\))/.exec(entry.error ?? '')?.[1];
    expect(Number.parseInt(textAtLeast ?? '0')).toBeGreaterThan(QUOTA);
    expect(entry.error).toBe(overQuota(textAtLeast!, pdf.length, QUOTA, 0));
    // Nothing of its text: no chunks, no extracted text file (the content route says why); it counts for its file alone, once.
    expect(await heldText(entry.id)).toEqual({ chunks: 0, chunkBytes: 0, text_bytes: 0, attempts: 1 });
    expect(entry).toMatchObject({ chunk_count: 0, text_bytes: 0 });
    await eventually(async () => !storedFiles(ctx.app.settings.dataDir, user.user.id).some((name) => name.endsWith('.txt')));
    expect((await api('GET', `/knowledge-base/entries/${entry.id}/content`, user.headers)).json<{ detail: string }>().detail).toContain('Storage quota exceeded by the extracted text');
    expect(await quotaUsed(user)).toBe(4096);
  });

  it('counts a ready entry for its text where more than its file: in the stats and at the next upload; deleting it frees that', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const pdf = await textPdf(1_200);
    const calls = embeddingCalls();
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'refunds.pdf', content: pdf });
    // Embedded where pgvector is: the path the refusal above did not take.
    if (ctx.database.kind === 'pglite') expect(embeddingCalls()).toBeGreaterThan(calls);
    // The UTF-8 bytes of its text, once: less than its chunks hold, which repeat an overlap each.
    const held = await heldText(entry.id);
    expect(held.text_bytes).toBeGreaterThan(50 * pdf.length);
    expect(held.text_bytes).toBeLessThan(held.chunkBytes);
    await expectTextCountedOnce(user, entry.id, held.text_bytes, await minimumAddedTo(pdf));
    expect(entry.text_bytes).toBe(held.text_bytes);
    expect(await quotaUsed(user)).toBe(held.text_bytes);
    // An upload past what the text leaves is refused, the text counted as used.
    const left = QUOTA - held.text_bytes;
    const refused = await upload(ctx.app, user.headers, folder.id, { filename: 'more.txt', content: 'x'.repeat(left + 1) });
    expect(refused.statusCode).toBe(413);
    expect(refused.json<{ detail: string }>().detail).toContain(`only ${left} bytes (0.1 MiB) of your ${QUOTA} bytes (0.2 MiB) are left (${held.text_bytes} bytes`);
    await api('DELETE', `/knowledge-base/entries/${entry.id}`, user.headers);
    expect(await quotaUsed(user)).toBe(0);
  });

  it('counts an entry indexed before text was counted for its file until a reindex records its text', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const pdf = await textPdf(1_000);
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'refunds.pdf', content: pdf });
    // As migration 0023 leaves an entry ready before it: text_bytes 0.
    await ctx.app.db.update(knowledgeEntries).set({ text_bytes: 0 }).where(eq(knowledgeEntries.id, entry.id));
    expect(await quotaUsed(user)).toBe(4096);
    expect((await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, user.headers)).statusCode).toBe(202);
    expect((await settled(ctx.app, user.headers, entry.id)).status).toBe('ready');
    const held = await heldText(entry.id);
    await expectTextCountedOnce(user, entry.id, held.text_bytes, await minimumAddedTo(pdf));
    expect(await quotaUsed(user)).toBe(held.text_bytes);
  });

  it('counts a plain-text file for its size: its text once, not the overlap its chunks repeat', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const text = Array.from({ length: 400 }, (_, i) => `${LINE} (${i}).`).join('\n');
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'refunds.txt', content: text });
    const held = await heldText(entry.id);
    expect(entry.chunk_count).toBeGreaterThan(5);
    // The chunks hold more (each repeats the end of the one before); the entry counts its text once.
    expect(held.chunkBytes).toBeGreaterThan(Buffer.byteLength(text) * 1.05);
    await expectTextCountedOnce(user, entry.id, held.text_bytes, await minimumAddedTo(Buffer.from(text), ctx.app.settings, 'refunds.txt'));
    expect(await quotaUsed(user)).toBe(Buffer.byteLength(text));
  });

  it('counts a failed entry for the text of the chunks it keeps, not for the batch it failed in', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // The chunk holding the last line cannot be stored. The batch's text (~130 KB, past its file and
    // 4 KiB; one batch) is reserved, counted, whole before it is embedded and stored; then, where
    // pgvector is (PGlite), its first embedding call's chunks (KB_EMBED_BATCH) are stored and the
    // call with that chunk fails to, kept as after a 402; without, the batch's one write fails.
    await withFault(poisonedChunk(), async () => {
      const pdf = await poisonedPdf(1_300);
      const entry = await settled(ctx.app, user.headers, (await uploaded(ctx.app, user.headers, folder.id, { filename: 'refunds.pdf', content: pdf })).id);
      expect(entry.status).toBe('failed');
      expect(entry.error).toContain('internal error');
      const kept = await storedTextOf(entry.id, pdf);
      expect(kept.chunks).toBe(ctx.database.kind === 'pglite' ? ctx.app.settings.KB_EMBED_BATCH : 0);
      expect((await heldText(entry.id)).text_bytes).toBe(kept.bytes);
      expect(await quotaUsed(user)).toBe(Math.max(4096, kept.bytes));
    });
  });

  it('counts an entry retried after a passing fault for the chunks each try keeps, and once ready for its whole text once', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const pdf = await poisonedPdf(1_300);
    // Cut now, not in the short time between the tries.
    await documentOf(pdf);
    let entryId = '';
    await withFault(poisonedChunk(CONFLICT), async () => {
      entryId = (await uploaded(ctx.app, user.headers, folder.id, { filename: 'refunds.pdf', content: pdf })).id;
      // The first try's chunks up to the poisoned one's write (where pgvector is: its embedding
      // call's; without, the whole batch's one write, so none) are kept for the retry, and count for
      // what they hold, not for the batch reserved whole.
      await releasedAfter(entryId, 1);
      const kept = await storedTextOf(entryId, pdf);
      expect(kept.chunks).toBe(ctx.database.kind === 'pglite' ? ctx.app.settings.KB_EMBED_BATCH : 0);
      expect((await heldText(entryId)).text_bytes).toBe(kept.bytes);
      expect(await quotaUsed(user)).toBe(Math.max(4096, kept.bytes));
      // The conflict passes before the queue's retry (JOB_BACKOFF_MS).
      await dropFault('knowledge_chunks');
    });
    const entry = await settled(ctx.app, user.headers, entryId);
    expect(entry.status, entry.error ?? '').toBe('ready');
    // The retry resumed from the kept chunks and stored the rest: every chunk once, its text counted once.
    const whole = await wholeTextOf(pdf);
    const held = await heldText(entryId);
    expect(held).toMatchObject({ attempts: 2, text_bytes: whole, chunks: (await documentOf(pdf)).length });
    expect((await storedTextOf(entryId, pdf)).bytes).toBe(whole);
    expect(entry.text_bytes).toBe(whole);
    await expectTextCountedOnce(user, entryId, whole, await minimumAddedTo(pdf));
    expect(await quotaUsed(user)).toBe(whole);
  }, 60_000);

  it('counts an entry retried and then failed for good for the chunks it keeps, at each try', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const pdf = await poisonedPdf(1_300);
    // Cut now, not in the short time between the tries.
    await documentOf(pdf);
    await withFault(poisonedChunk(CONFLICT), async () => {
      const entryId = (await uploaded(ctx.app, user.headers, folder.id, { filename: 'refunds.pdf', content: pdf })).id;
      const expectKeptCounted = async () => {
        const kept = await storedTextOf(entryId, pdf);
        expect(kept.chunks).toBe(ctx.database.kind === 'pglite' ? ctx.app.settings.KB_EMBED_BATCH : 0);
        expect((await heldText(entryId)).text_bytes).toBe(kept.bytes);
        expect(await quotaUsed(user)).toBe(Math.max(4096, kept.bytes));
      };
      await releasedAfter(entryId, 1);
      await expectKeptCounted();
      // The second try resumes from those chunks (found stored, not stored again) and stops where the first did.
      await releasedAfter(entryId, 2);
      await expectKeptCounted();
      // The third, the last KB_INGEST_MAX_ATTEMPTS allows, fails the entry keeping them (no try is left), saying why.
      const entry = await settled(ctx.app, user.headers, entryId);
      expect(entry).toMatchObject({ status: 'failed', chunk_count: 0 });
      expect(entry.error).toBe('Ingestion stopped: a database write kept conflicting with another (after 3 attempts; the database was busy with other changes to the same rows); reindex the entry to try again');
      expect((await heldText(entryId)).attempts).toBe(3);
      await expectKeptCounted();
    });
  }, 60_000);

  it("counts a resumed entry whose chunk settings changed for this cutting's chunks alone once the earlier one's are dropped", async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const pdf = await poisonedPdf(1_300);
    // Smaller chunks: each chunk's text differs from the first cutting's from the first on.
    const recut = { ...ctx.app.settings, KB_CHUNK_TOKENS: 250 };
    const reindexWith = async (settings: Settings) => {
      // As a reindex leaves a failed entry (its queued job run here, with these settings).
      await ctx.app.db.update(knowledgeEntries).set({ status: 'pending', attempts: 0, lease_token: null, lease_expires_at: null }).where(eq(knowledgeEntries.id, entryId));
      await ingestEntry(ingestionDeps(settings), entryId);
      return heldText(entryId);
    };
    // 1. Every chunk stored, the end refused: failed, keeping them all (on both databases), counted for all of the text.
    const entryId = await withFault({ table: 'knowledge_entries', on: 'update', when: `new.status = 'ready'`, raise: `exception 'refused end'` }, async () => {
      const entry = await settled(ctx.app, user.headers, (await uploaded(ctx.app, user.headers, folder.id, { filename: 'refunds.pdf', content: pdf })).id);
      expect(entry.status).toBe('failed');
      return entry.id;
    });
    const first = await wholeTextOf(pdf);
    expect(await storedTextOf(entryId, pdf)).toEqual({ chunks: (await documentOf(pdf)).length, bytes: first });
    expect((await heldText(entryId)).text_bytes).toBe(first);
    expect(await quotaUsed(user)).toBe(first);

    // 2. Resumed under the new settings, failing at the poisoned chunk again. Where pgvector is, its
    // first embedding call's chunks are stored, the first cutting's dropped with them: the entry
    // holds, and counts for, those alone. Without, the one batch's write failed whole, so the first
    // cutting's chunks are all still there, and still count.
    await withFault(poisonedChunk(), async () => {
      const held = await reindexWith(recut);
      if (ctx.database.kind === 'pglite') {
        const kept = await storedTextOf(entryId, pdf, recut);
        // The embedding calls' before the poisoned (last) chunk's.
        const batch = ctx.app.settings.KB_EMBED_BATCH;
        expect(kept.chunks).toBe(Math.floor(((await documentOf(pdf, recut)).length - 1) / batch) * batch);
        expect(kept.chunks).toBeGreaterThan(0);
        expect(held.text_bytes).toBe(kept.bytes);
        expect(kept.bytes).toBeLessThan(first);
      } else {
        expect(await storedTextOf(entryId, pdf)).toEqual({ chunks: (await documentOf(pdf)).length, bytes: first });
        expect(held.text_bytes).toBe(first);
      }
      expect((await api('GET', `/knowledge-base/entries/${entryId}`, user.headers)).json<EntryBody>().status).toBe('failed');
      expect(await quotaUsed(user)).toBe(Math.max(4096, held.text_bytes));
    });

    // 3. Resumed again, the fault gone: ready, every chunk the new cutting's, its text counted once.
    const held = await reindexWith(recut);
    const whole = await wholeTextOf(pdf, recut);
    expect(await storedTextOf(entryId, pdf, recut)).toEqual({ chunks: (await documentOf(pdf, recut)).length, bytes: whole });
    expect(held.text_bytes).toBe(whole);
    expect((await api('GET', `/knowledge-base/entries/${entryId}`, user.headers)).json<EntryBody>().status).toBe('ready');
    await expectTextCountedOnce(user, entryId, whole, await minimumAddedTo(pdf, recut));
    expect(await quotaUsed(user)).toBe(whole);
  }, 60_000);

  it("counts a resumed entry that fails before reaching the earlier attempt's chunks for those chunks, which it keeps", async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const pdf = await textPdf(1_300);
    // Every chunk stored, the end refused: failed, keeping them all, counted for all of the text.
    const entryId = await withFault({ table: 'knowledge_entries', on: 'update', when: `new.status = 'ready'`, raise: `exception 'refused end'` }, async () => {
      const entry = await settled(ctx.app, user.headers, (await uploaded(ctx.app, user.headers, folder.id, { filename: 'refunds.pdf', content: pdf })).id);
      expect(entry.status).toBe('failed');
      return entry.id;
    });
    const whole = await wholeTextOf(pdf);
    expect((await heldText(entryId)).text_bytes).toBe(whole);
    // Its reindex resumes from them and fails at its first batch's comparison with them (a full-text
    // configuration the database does not have), having checked none: the chunks stay, and count
    // for what the earlier attempt recorded (ChunkWriter.keptTextBytes), not for the none it reached.
    await ctx.app.db.update(knowledgeEntries).set({ status: 'pending', attempts: 0, lease_token: null, lease_expires_at: null }).where(eq(knowledgeEntries.id, entryId));
    await ingestEntry(ingestionDeps({ ...ctx.app.settings, KB_SEARCH_LANGUAGE: 'no_such_language' as Settings['KB_SEARCH_LANGUAGE'] }), entryId);
    const entry = (await api('GET', `/knowledge-base/entries/${entryId}`, user.headers)).json<EntryBody>();
    expect(entry).toMatchObject({ status: 'failed', chunk_count: 0 });
    expect(entry.error).toContain('internal error');
    expect(await storedTextOf(entryId, pdf)).toEqual({ chunks: (await documentOf(pdf)).length, bytes: whole });
    expect(await heldText(entryId)).toMatchObject({ text_bytes: whole, attempts: 1 });
    expect(await quotaUsed(user)).toBe(whole);
  }, 60_000);

  it("never lets two ingestions of one user pass the quota together: each counts under the owner's lock", async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // Each text fits alone (~120 KB of 200 KB), not both.
    const pdf = await textPdf(1_200);
    const entries = await Promise.all(['a.pdf', 'b.pdf'].map((filename) => uploaded(ctx.app, user.headers, folder.id, { filename, content: pdf })));
    const expectOneOverQuota = async () => {
      const ended = await Promise.all(entries.map((entry) => settled(ctx.app, user.headers, entry.id)));
      const [ready, failed] = [ended.filter((entry) => entry.status === 'ready'), ended.filter((entry) => entry.status === 'failed')] as [EntryBody[], EntryBody[]];
      expect([ready.length, failed.length]).toEqual([1, 1]);
      expect(failed[0]!.error).toContain('Storage quota exceeded by the extracted text');
      expect(await heldText(failed[0]!.id)).toMatchObject({ chunks: 0, text_bytes: 0 });
      const { text_bytes } = await heldText(ready[0]!.id);
      expect(await quotaUsed(user)).toBe(text_bytes + 4096);
    };
    // As their jobs run them, at once.
    await expectOneOverQuota();

    // Both again (as a reindex leaves them: the ready one's chunks cleared at its claim), their
    // counts made to meet: on the server the owner's lock is held until both wait for it.
    await ctx.app.db.update(knowledgeEntries).set({ status: 'pending', attempts: 0, lease_token: null, lease_expires_at: null }).where(eq(knowledgeEntries.folder_id, folder.id));
    const ingest = () => Promise.all(entries.map((entry) => ingestEntry(ingestionDeps(), entry.id)));
    if (!onServer) await ingest();
    else {
      let ingesting: Promise<unknown> | undefined;
      try {
        await ctx.database.withSession(async (session: SqlSession) => {
          await session.exec('begin');
          await session.query('select id from users where id = $1 for no key update', [user.user.id]);
          ingesting = ingest();
          try {
            // Both wait: the first for this transaction, the second behind it (for the row's tuple lock).
            await eventually(async () => (await waitingForLocks()) === 2, 20_000);
          } finally {
            await session.exec('commit');
          }
        });
      } finally {
        await ingesting;
      }
    }
    await expectOneOverQuota();
  }, 60_000);
});

// ==================== A worker that dies mid-indexing ====================

/** Stands for anything a dead process would have done next: every call on it, and what it returns, never settles. */
const stalled: unknown = new Proxy(() => undefined, { get: (_target, key) => (key === 'then' ? () => undefined : stalled), apply: () => stalled });

/**
 * `db` for a job that dies (as under `kill -9`) once a transaction it committed makes `diesNow`
 * true: from then on it never reaches the database again — no write, no renewal of its claim, no
 * failure recorded — and its lease runs out. `died` resolves then.
 */
function dyingDb(db: Db, diesNow: () => Promise<boolean>): { db: Db; died: Promise<void> } {
  let dead = false;
  let die = () => {};
  const died = new Promise<void>((resolve) => (die = resolve));
  const dying: Db = new Proxy(db, {
    get(target, key) {
      if (dead) return stalled;
      if (key === 'transaction') {
        return async (work: (tx: Db) => Promise<unknown>) => {
          const result = await transaction(target, work);
          if (await diesNow()) {
            dead = true;
            die();
          }
          return result;
        };
      }
      const value: unknown = Reflect.get(target, key, target);
      return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
    },
  });
  return { db: dying, died };
}

/**
 * Chunks small enough that the document below takes several batches (250 chunks each), and a lease
 * that runs out in a second. And a larger quota for the jobs run with these settings: each of these
 * chunks counts for MIN_CHUNK_CHARGE_BYTES (their text is less), so a batch alone counts for 128 KB
 * of this app's 200 KB, and the whole document for ~4 times it. Uploads are checked against the
 * app's quota.
 */
const smallChunks = (): Settings => ({ ...ctx.app.settings, KB_CHUNK_TOKENS: 32, KB_CHUNK_OVERLAP_TOKENS: 8, KB_INGEST_LEASE_MS: 1_000, KB_MAX_BYTES_PER_USER: 10 * QUOTA });

async function entryRow(entryId: string) {
  const [row] = await ctx.app.db
    .select({ status: knowledgeEntries.status, attempts: knowledgeEntries.attempts, text_bytes: knowledgeEntries.text_bytes, lease_expires_at: knowledgeEntries.lease_expires_at })
    .from(knowledgeEntries)
    .where(eq(knowledgeEntries.id, entryId));
  return row!;
}

/**
 * The reservation after which the job below dies: enough text stored and reserved that the
 * reservation alone keeps out an upload that fits beside what is stored (one batch stored, 128 KB
 * of the app's 200 KB; two reserved).
 */
const DIES_AT_BATCH = 2;

/**
 * A user's PDF whose indexing (with `smallChunks`) was killed just after its job reserved the text
 * of batch DIES_AT_BATCH: the batches before it stored, that one counted but never written, the
 * lease run out.
 */
async function killedAfterReservation() {
  const user = await createUser(ctx.app);
  const folder = await createFolder(ctx.app, user.headers);
  const pdf = await textPdf(1_500);
  const settings = smallChunks();
  const cut = await documentOf(pdf, settings);
  expect(cut.length).toBeGreaterThan(DIES_AT_BATCH * 250);
  // Indexed once as the app does; then reindexed (as the route leaves it) by a job that dies.
  const { id: entryId } = await ingested(ctx.app, user.headers, folder.id, { filename: 'refunds.pdf', content: pdf });
  await ctx.app.db.update(knowledgeEntries).set({ status: 'pending', attempts: 0, lease_token: null, lease_expires_at: null }).where(eq(knowledgeEntries.id, entryId));
  let counted = 0;
  let reservations = 0;
  const dying = dyingDb(ctx.app.db, async () => {
    const { text_bytes } = await entryRow(entryId);
    if (text_bytes > counted) reservations++;
    counted = text_bytes;
    return reservations === DIES_AT_BATCH;
  });
  void ingestEntry({ ...ingestionDeps(settings), db: dying.db }, entryId);
  await dying.died;
  const stored = await storedTextOf(entryId, pdf, settings);
  expect(stored.chunks).toBe((DIES_AT_BATCH - 1) * 250);
  const reserved = cut.slice(0, DIES_AT_BATCH * 250).reduce((sum, chunk) => sum + chargedChunkBytes(chunk), 0);
  // The dead job's count: up to its last batch, which it never stored.
  expect(await entryRow(entryId)).toMatchObject({ status: 'processing', attempts: 1, text_bytes: reserved });
  expect(await quotaUsed(user)).toBe(reserved);
  await eventually(async () => (await entryRow(entryId)).lease_expires_at! < new Date(Date.now() - 100), 10_000);
  return { user, folder, entryId, pdf, settings, stored: stored.bytes, reserved };
}

describe('a worker killed mid-indexing', () => {
  it("counts the entry for the text it stored, not for the dead job's reservation, once another job claims it: an upload that fits is accepted", async () => {
    const { user, folder, entryId, pdf, settings, stored, reserved } = await killedAfterReservation();
    // An upload that fits beside the stored text, and not beside the reservation.
    const fits = Math.min(QUOTA - stored, ctx.app.settings.KB_MAX_FILE_BYTES);
    expect(reserved + fits).toBeGreaterThan(QUOTA);

    // Another job claims the entry (its lease ran out) and dies too, at once: the claim alone counts the entry anew.
    const claimed = dyingDb(ctx.app.db, async () => true);
    void ingestEntry({ ...ingestionDeps(settings), db: claimed.db }, entryId);
    await claimed.died;
    expect(await entryRow(entryId)).toMatchObject({ status: 'processing', attempts: 2, text_bytes: stored });
    expect(await quotaUsed(user)).toBe(stored);
    const fitted = await uploaded(ctx.app, user.headers, folder.id, { filename: 'fits.txt', content: 'x'.repeat(fits) });
    expect(await quotaUsed(user)).toBe(stored + fits);
    await api('DELETE', `/knowledge-base/entries/${fitted.id}`, user.headers);

    // A third job resumes from the stored chunks and ends ready, counting the whole text once.
    await eventually(async () => (await entryRow(entryId)).lease_expires_at! < new Date(Date.now() - 100), 10_000);
    await ingestEntry(ingestionDeps(settings), entryId);
    const whole = await wholeTextOf(pdf, settings);
    expect(await entryRow(entryId)).toMatchObject({ status: 'ready', attempts: 3, text_bytes: whole });
    expect(await quotaUsed(user)).toBe(whole);
  }, 90_000);

  it("counts the entry for the text it stored once the sweep hands it back, while its job waits its turn", async () => {
    const { user, entryId, pdf, settings, stored } = await killedAfterReservation();
    expect((await unfinishedWithoutJob(ctx.app.db, { pendingAgeMs: 0, markMs: 300_000, ignoreMarks: false, limit: 100 })).map((entry) => entry.id)).toContain(entryId);
    expect(await entryRow(entryId)).toMatchObject({ status: 'pending', text_bytes: stored });
    expect(await quotaUsed(user)).toBe(stored);
    // Its job (run here) resumes from the stored chunks and ends ready.
    await ingestEntry(ingestionDeps(settings), entryId);
    expect(await entryRow(entryId)).toMatchObject({ status: 'ready', attempts: 2, text_bytes: await wholeTextOf(pdf, settings) });
  }, 90_000);
});
