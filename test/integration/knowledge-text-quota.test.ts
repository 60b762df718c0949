/**
 * KB_MAX_BYTES_PER_USER counts each entry for the larger of its file and the text its chunks hold,
 * counted once (`text_bytes`, the chunks' overlap left out; at least 4 KiB): a Flate-compressed PDF of a few KiB extracts to ~100× its size,
 * and the quota of uploaded bytes alone let one user store ~5 GB of text under 50 MB. An ingestion
 * whose text would pass what is left fails the entry and keeps none of the text; two of one user's
 * at once take the owner's lock to count, as uploads do, so they never pass it together.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { eq, sql } from 'drizzle-orm';
import { beforeAll, describe, expect, it } from 'vitest';

import type { SqlSession } from '../../src/core/db.js';

import { knowledgeChunks, knowledgeEntries } from '../../src/models/index.js';

import { ChunkCutter, chunkOptionsFrom, ownTextBytes } from '../../src/modules/knowledge/chunk.js';
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
const ctx = useTestApp({ KB_MAX_BYTES_PER_USER: String(QUOTA), KB_MAX_FILE_BYTES: String(QUOTA / 2), EMBEDDING_MODEL: 'fake-embed', MODEL_MAX_RETRIES: '0' });
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

/** The chunks ingestion cuts of `file` (a PDF), with this app's settings. */
async function documentOf(file: Buffer): Promise<DocumentChunk[]> {
  const dir = await mkdtemp(join(tmpdir(), 'keel-quota-'));
  try {
    const path = join(dir, 'doc.pdf');
    await writeFile(path, file);
    const document = await extractDocument({ path, filename: 'doc.pdf' }, extractLimitsFrom(ctx.app.settings));
    return [...new ChunkCutter(chunkOptionsFrom(ctx.app.settings)).cut(document.sections)];
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** The entry's extracted text (`GET …/content`): `text_bytes` counts it once, from its UTF-8 bytes without white space (trimmed between chunks) up to all of them. */
async function expectTextCountedOnce(user: TestUser, entryId: string, textBytes: number) {
  const content = (await api('GET', `/knowledge-base/entries/${entryId}/content`, user.headers)).body;
  expect(textBytes).toBeLessThanOrEqual(Buffer.byteLength(content));
  expect(textBytes).toBeGreaterThanOrEqual(Buffer.byteLength(content.replace(/\s+/g, '')));
}

async function quotaUsed(user: TestUser): Promise<number> {
  return (await api('GET', '/knowledge-base/stats', user.headers)).json<{ quota_bytes_used: number }>().quota_bytes_used;
}

const overQuota = (textAtLeast: string, file: number, left: number, others: number) =>
  `Storage quota exceeded by the extracted text: the document's text takes at least ${textAtLeast} (its file ${file} bytes (0.0 MiB); an entry counts for the larger) ` +
  `but only ${left} bytes (0.2 MiB) of your ${QUOTA} bytes (0.2 MiB) are left for it (${others} bytes (0.0 MiB) used by your other entries); delete entries to make room and reindex this one, or upload a shorter document`;

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
    await expectTextCountedOnce(user, entry.id, held.text_bytes);
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
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'refunds.pdf', content: await textPdf(1_000) });
    // As migration 0023 leaves an entry ready before it: text_bytes 0.
    await ctx.app.db.update(knowledgeEntries).set({ text_bytes: 0 }).where(eq(knowledgeEntries.id, entry.id));
    expect(await quotaUsed(user)).toBe(4096);
    expect((await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, user.headers)).statusCode).toBe(202);
    expect((await settled(ctx.app, user.headers, entry.id)).status).toBe('ready');
    const held = await heldText(entry.id);
    await expectTextCountedOnce(user, entry.id, held.text_bytes);
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
    await expectTextCountedOnce(user, entry.id, held.text_bytes);
    expect(await quotaUsed(user)).toBe(Buffer.byteLength(text));
  });

  it('counts a failed entry for the text of the chunks it keeps, not for the batch it failed in', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // The chunk holding the last line cannot be stored. The batch's text (~130 KB, past its file and
    // 4 KiB; one batch) is reserved, counted, whole before it is embedded and stored; then, where
    // pgvector is (PGlite), its first embedding call's chunks (KB_EMBED_BATCH) are stored and the
    // call with that chunk fails to, kept as after a 402; without, the batch's one write fails.
    await ctx.app.db.execute(sql.raw(`create function test_poisoned_chunk() returns trigger language plpgsql as $$ begin raise exception 'poisoned chunk'; end $$`));
    await ctx.app.db.execute(sql.raw(`create trigger test_poisoned_chunk before insert on knowledge_chunks for each row when (new.text like '%POISON%') execute function test_poisoned_chunk()`));
    try {
      const pdf = await madeFile('doc.pdf', (path) => writeTextPdf(path, [...Array.from({ length: 1_300 }, (_, i) => `${LINE} (${i % 7}).`), 'POISON']));
      const entry = await settled(ctx.app, user.headers, (await uploaded(ctx.app, user.headers, folder.id, { filename: 'refunds.pdf', content: pdf })).id);
      expect(entry.status).toBe('failed');
      expect(entry.error).toContain('internal error');
      const kept = await rowsOf<{ text: string }>(sql`select text from knowledge_chunks where entry_id = ${entry.id} order by chunk_index`);
      expect(kept.length).toBe(ctx.database.kind === 'pglite' ? ctx.app.settings.KB_EMBED_BATCH : 0);
      // What those chunks hold, each chunk's lead (the overlap) left out: the document cut as the job cuts it.
      const cut = (await documentOf(pdf)).slice(0, kept.length);
      expect(cut.map((chunk) => chunk.text)).toEqual(kept.map((row) => row.text));
      const keptBytes = cut.reduce((sum, chunk) => sum + ownTextBytes(chunk), 0);
      expect((await heldText(entry.id)).text_bytes).toBe(keptBytes);
      expect(await quotaUsed(user)).toBe(Math.max(4096, keptBytes));
    } finally {
      await ctx.app.db.execute(sql.raw('drop trigger test_poisoned_chunk on knowledge_chunks'));
      await ctx.app.db.execute(sql.raw('drop function test_poisoned_chunk()'));
    }
  });

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
    const deps = { db: ctx.app.db, settings: ctx.app.settings, log: ctx.app.log, models: ctx.app.models };
    const ingest = () => Promise.all(entries.map((entry) => ingestEntry(deps, entry.id)));
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
