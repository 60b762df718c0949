/**
 * The files of deleted knowledge entries: a DELETE through the API deletes those its own deletion
 * recorded, and leaves every other recorded deletion (another user's backlog, a failed delete) to
 * the sweeper.
 */
import { randomUUID } from 'node:crypto';
import { PassThrough } from 'node:stream';

import { eq, inArray, sql } from 'drizzle-orm';
import type { LightMyRequestResponse } from 'fastify';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';

import { transaction } from '../../src/core/db.js';

import { knowledgeChunks, knowledgeEntries, knowledgeFileDeletions } from '../../src/models/index.js';

import { claimUploadedFile, recordUploadedFile } from '../../src/crud/knowledge.js';
import { uploadInFlightMs } from '../../src/services/knowledge/entry-service.js';
import { uploadGraceMs } from '../../src/services/knowledge/files.js';
import { knowledgeStorage, PURGE_BATCH, purgeDeletedFiles, purgeFilesOf } from '../../src/services/knowledge/files.js';
import { useTestApp } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { apiOf, eventually } from '../helpers/http.js';
import { createFolder, ingested, search, storedFiles as storedFilesIn, upload } from '../helpers/knowledge.js';
import { lockWaits } from '../helpers/lock-waits.js';

// The sweeper's periodic round must not run while a test counts what a request left to it.
const ctx = useTestApp({ KB_SWEEP_INTERVAL_MS: '3600000', KB_MAX_UPLOADS_IN_FLIGHT_PER_USER: '2' });
const api = apiOf(ctx);
const storedFiles = (ownerId: string) => storedFilesIn(ctx.app.settings.dataDir, ownerId);
const deps = () => ({ db: ctx.app.db, settings: ctx.app.settings, log: ctx.app.log });
const recorded = () => ctx.database.db.$count(knowledgeFileDeletions);

// A user of each test's own: the files a test counts are its own.
let user: TestUser;
beforeEach(async () => {
  user = await createUser(ctx.app);
});
afterEach(async () => {
  vi.restoreAllMocks();
  await purgeDeletedFiles(deps());
});

/** Deletions recorded for another user's entries (as a cascade leaves them), files never stored. */
async function backlog(count: number): Promise<void> {
  const other = randomUUID();
  const rows = Array.from({ length: count }, () => ({ storage_key: `knowledge-base/${other}/${other}/${randomUUID()}` }));
  for (let i = 0; i < rows.length; i += 1_000) await ctx.database.db.insert(knowledgeFileDeletions).values(rows.slice(i, i + 1_000));
}

const keyOf = async (entryId: string) =>
  (await ctx.database.db.select({ key: knowledgeEntries.storage_key }).from(knowledgeEntries).where(eq(knowledgeEntries.id, entryId)))[0]!.key;

describe('deleting through the API', () => {
  it("deletes an entry's and a folder's files, and none of the deletions waiting for the sweeper", async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const other = await createFolder(ctx.app, user.headers);
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'a.txt', content: 'Zebras graze at dawn.' });
    await ingested(ctx.app, user.headers, other.id, { filename: 'b.txt', content: 'Herons stand still.' });
    await ingested(ctx.app, user.headers, other.id, { filename: 'c.txt', content: 'Kingfishers dive.' });
    expect(storedFiles(user.user.id)).toHaveLength(6); // each file and its extracted text
    await backlog(2_000);
    expect((await api('DELETE', `/knowledge-base/entries/${entry.id}`, user.headers)).statusCode).toBe(200);
    expect(storedFiles(user.user.id)).toHaveLength(4);
    expect(await recorded()).toBe(2_000);
    expect((await api('DELETE', `/knowledge-base/folders/${other.id}`, user.headers)).statusCode).toBe(200);
    expect(storedFiles(user.user.id)).toEqual([]);
    expect(await recorded()).toBe(2_000);
    // The sweeper's purge works the backlog off.
    expect(await purgeDeletedFiles(deps())).toBe(2_000);
    expect(await recorded()).toBe(0);
  });

  it('keeps a deletion whose file could not be deleted recorded, for the sweeper', async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'keep.txt', content: 'Storage is down for a moment.' });
    const key = await keyOf(entry.id);
    // The backend is the one every knowledge storage service of these settings shares.
    const { backend } = knowledgeStorage(ctx.app.settings);
    const remove = backend.remove.bind(backend);
    vi.spyOn(backend, 'remove').mockImplementation((k) => (k === key ? Promise.reject(new Error('storage unavailable')) : remove(k)));
    expect((await api('DELETE', `/knowledge-base/entries/${entry.id}`, user.headers)).statusCode).toBe(200);
    expect(await ctx.database.db.select({ key: knowledgeFileDeletions.storage_key }).from(knowledgeFileDeletions)).toEqual([{ key }]);
    expect(storedFiles(user.user.id)).toHaveLength(1); // the extracted text went; the file waits
    vi.restoreAllMocks();
    expect(await purgeDeletedFiles(deps())).toBe(1);
    expect(storedFiles(user.user.id)).toEqual([]);
  });

  it("touches only keys whose deletion is recorded: a live entry's file stays", async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'live.txt', content: 'Still here.' });
    const key = await keyOf(entry.id);
    expect(await purgeFilesOf(deps(), [key])).toBe(0);
    expect(storedFiles(user.user.id)).toHaveLength(2);
    expect(await ctx.database.db.select().from(knowledgeEntries).where(inArray(knowledgeEntries.id, [entry.id]))).toHaveLength(1);
  });
});

describe("an upload's file before its entry is written", () => {
  /** An upload whose file part has arrived whole and whose form the client has not finished yet: the server has stored the file and waits. */
  async function uploadHeldOpen(folderId: string, filename = 'held.txt') {
    const storedBefore = storedFiles(user.user.id).length;
    const boundary = '----keelheld';
    const body = new PassThrough();
    const response = ctx.app.inject({
      method: 'POST',
      url: `/api/v1/knowledge-base/folders/${folderId}/upload`,
      headers: { ...user.headers, 'content-type': `multipart/form-data; boundary=${boundary}` },
      payload: body,
    });
    body.write(`--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="${filename}"\r\nContent-Type: text/plain\r\n\r\nHeld open.\r\n--${boundary}\r\n`);
    await eventually(async () => storedFiles(user.user.id).length === storedBefore + 1);
    return { response, finish: () => body.end(`Content-Disposition: form-data; name="note"\r\n\r\nx\r\n--${boundary}--\r\n`) };
  }

  it('is recorded, due only after its grace: the sweeper leaves a running upload alone, and a written entry takes the record away', async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const held = await uploadHeldOpen(folder.id);
    const [row] = await ctx.database.db
      .select({ key: knowledgeFileDeletions.storage_key, graceMs: sql<number>`extract(epoch from ${knowledgeFileDeletions.not_before} - now()) * 1000`.mapWith(Number) })
      .from(knowledgeFileDeletions);
    expect(row!.key).toBe(`knowledge-base/${user.user.id}/${folder.id}/${storedFiles(user.user.id)[0]!.split('/').pop()}`);
    expect(row!.graceMs).toBeGreaterThan(uploadGraceMs(ctx.app.settings) - 60_000);
    expect(await purgeDeletedFiles(deps())).toBe(0);
    expect(storedFiles(user.user.id)).toHaveLength(1);
    held.finish();
    const response = await held.response;
    expect(response.statusCode, response.body).toBe(201);
    expect(await recorded()).toBe(0);
    expect(await keyOf(response.json<{ id: string }>().id)).toBe(row!.key);
  });

  it('outliving its grace, the upload fails and leaves neither entry nor file (the sweeper took the file)', async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const held = await uploadHeldOpen(folder.id);
    await ctx.database.db.update(knowledgeFileDeletions).set({ not_before: sql`now() - interval '1 second'` });
    expect(await purgeDeletedFiles(deps())).toBe(1);
    expect(storedFiles(user.user.id)).toEqual([]);
    held.finish();
    const response = await held.response;
    expect(response.statusCode, response.body).toBe(503);
    expect(await ctx.database.db.$count(knowledgeEntries, eq(knowledgeEntries.folder_id, folder.id))).toBe(0);
    expect(storedFiles(user.user.id)).toEqual([]);
    expect(await recorded()).toBe(0);
  });

  it("finishing just as its grace passes, between the sweeper's read and its deletion of the file, the upload fails (503) rather than leave an entry without a file", async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const held = await uploadHeldOpen(folder.id);
    const [{ key }] = (await ctx.database.db.select({ key: knowledgeFileDeletions.storage_key }).from(knowledgeFileDeletions)) as [{ key: string }];
    await ctx.database.db.update(knowledgeFileDeletions).set({ not_before: sql`now() - interval '1 second'` });
    // The sweeper has read the record as due; before it deletes the file the upload's last part
    // arrives and the upload goes on to write its entry.
    const { backend } = knowledgeStorage(ctx.app.settings);
    const remove = backend.remove.bind(backend);
    let finished: Promise<LightMyRequestResponse> | undefined;
    let recordMeanwhile: unknown;
    vi.spyOn(backend, 'remove').mockImplementation(async (k) => {
      if (k === key && !finished) {
        // Still recorded while its file is deleted (a crash here leaves it to the next sweep), as a deleted entry's now.
        recordMeanwhile = await ctx.database.db.select({ not_before: knowledgeFileDeletions.not_before }).from(knowledgeFileDeletions);
        held.finish();
        finished = held.response;
        await finished;
      }
      return remove(k);
    });
    expect(await purgeDeletedFiles(deps())).toBe(1);
    const response = await finished!;
    expect(response.statusCode, response.body).toBe(503);
    expect(recordMeanwhile).toEqual([{ not_before: null }]);
    expect(await ctx.database.db.$count(knowledgeEntries, eq(knowledgeEntries.folder_id, folder.id))).toBe(0);
    expect(storedFiles(user.user.id)).toEqual([]);
    expect(await recorded()).toBe(0);
  });

  // Two sessions at once: PGlite runs one at a time, so nothing waits there.
  it.runIf(Boolean(process.env.DATABASE_URL))("claimed by its entry's transaction as its grace passes, keeps its file: the sweeper's take waits for the commit and finds nothing to take", async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const storage = knowledgeStorage(ctx.app.settings);
    const id = randomUUID();
    const key = storage.keyFor(id, [user.user.id, folder.id]);
    const record = await recordUploadedFile(ctx.app.db, key, -1_000);
    await storage.saveFile('Claimed in time.', id, undefined, [user.user.id, folder.id]);
    let commit!: () => void;
    const committing = new Promise<void>((resolve) => (commit = resolve));
    let claimed!: () => void;
    const claimHeld = new Promise<void>((resolve) => (claimed = resolve));
    const entryWritten = transaction(ctx.app.db, async (tx) => {
      const won = await claimUploadedFile(tx, record);
      claimed();
      await committing;
      return won;
    });
    await claimHeld;
    const purged = purgeDeletedFiles(deps());
    try {
      await eventually(async () => (await lockWaits(ctx).waitingForLocks()) > 0);
      expect(storedFiles(user.user.id)).toHaveLength(1);
    } finally {
      commit();
    }
    expect(await entryWritten).toBe(true);
    expect(await purged).toBe(0);
    expect(storedFiles(user.user.id)).toHaveLength(1);
    expect(await recorded()).toBe(0);
  });

  it("whose file storage refused to delete once its grace passed, stays recorded for the next sweep, and the upload can no longer claim it", async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const held = await uploadHeldOpen(folder.id);
    await ctx.database.db.update(knowledgeFileDeletions).set({ not_before: sql`now() - interval '1 second'` });
    const { backend } = knowledgeStorage(ctx.app.settings);
    const remove = backend.remove.bind(backend);
    const refusing = vi.spyOn(backend, 'remove').mockRejectedValue(new Error('storage unavailable'));
    expect(await purgeDeletedFiles(deps())).toBe(0);
    expect(await ctx.database.db.select({ not_before: knowledgeFileDeletions.not_before }).from(knowledgeFileDeletions)).toEqual([{ not_before: null }]);
    held.finish();
    const response = await held.response;
    expect(response.statusCode, response.body).toBe(503);
    expect(await ctx.database.db.$count(knowledgeEntries, eq(knowledgeEntries.folder_id, folder.id))).toBe(0);
    expect(storedFiles(user.user.id)).toHaveLength(1);
    refusing.mockImplementation(remove);
    expect(await purgeDeletedFiles(deps())).toBe(1);
    expect(storedFiles(user.user.id)).toEqual([]);
    expect(await recorded()).toBe(0);
  });

  it('at most KB_MAX_UPLOADS_IN_FLIGHT_PER_USER of a user at once: one more is refused (429) before a byte is stored', async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const first = await uploadHeldOpen(folder.id, 'one.txt');
    const second = await uploadHeldOpen(folder.id, 'two.txt');
    const refused = await upload(ctx.app, user.headers, folder.id, { filename: 'three.txt', content: 'Three.' });
    expect(refused.statusCode, refused.body).toBe(429);
    expect(refused.json<{ detail: string }>().detail).toMatch(/^Too many uploads in progress: at most 2 at once per user/);
    expect(refused.headers['retry-after']).toBe('5');
    expect(storedFiles(user.user.id)).toHaveLength(2);
    // Another user's uploads are their own.
    const other = await createUser(ctx.app);
    const theirs = await createFolder(ctx.app, other.headers);
    expect((await upload(ctx.app, other.headers, theirs.id, { filename: 'x.txt', content: 'Theirs.' })).statusCode).toBe(201);
    // A dead process's upload counts only until its grace has passed.
    await ctx.database.db.update(knowledgeFileDeletions).set({ not_before: sql`now() - interval '1 second'` }).where(sql`starts_with(${knowledgeFileDeletions.storage_key}, ${`knowledge-base/${user.user.id}/${folder.id}/`})`);
    expect((await upload(ctx.app, user.headers, folder.id, { filename: 'four.txt', content: 'Four.' })).statusCode).toBe(201);
    await ctx.database.db.update(knowledgeFileDeletions).set({ not_before: sql`now() + interval '1 hour'` }).where(sql`starts_with(${knowledgeFileDeletions.storage_key}, ${`knowledge-base/${user.user.id}/${folder.id}/`})`);
    // Its grace still to run, one recorded longer ago than a live upload can take (its process killed
    // mid-upload) no longer counts either; the sweeper leaves its file until the grace has passed.
    await ctx.database.db
      .update(knowledgeFileDeletions)
      .set({ created_at: sql`now() - ${uploadInFlightMs(ctx.app.settings) + 1_000} * interval '1 millisecond'` })
      .where(sql`starts_with(${knowledgeFileDeletions.storage_key}, ${`knowledge-base/${user.user.id}/${folder.id}/`})`);
    const six = await upload(ctx.app, user.headers, folder.id, { filename: 'six.txt', content: 'Six.' });
    expect(six.statusCode, six.body).toBe(201);
    expect(await purgeDeletedFiles(deps())).toBe(0);
    expect(await recorded()).toBe(2);
    first.finish();
    second.finish();
    expect((await first.response).statusCode).toBe(201);
    expect((await second.response).statusCode).toBe(201);
    // Done: the next one goes through.
    expect((await upload(ctx.app, user.headers, folder.id, { filename: 'five.txt', content: 'Five.' })).statusCode).toBe(201);
  });

  it('a refused upload (too large) leaves no record behind', async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const response = await upload(ctx.app, user.headers, folder.id, { filename: 'big.txt', content: 'x'.repeat(ctx.app.settings.KB_MAX_FILE_BYTES + 1) });
    expect(response.statusCode).toBe(413);
    expect(await recorded()).toBe(0);
    expect(storedFiles(user.user.id)).toEqual([]);
  });
});

describe('deleting a folder of more entries than a request purges', () => {
  it('takes every entry out of listings and search at once; the sweeper deletes the files past the first batch', async () => {
    const folder = await createFolder(ctx.app, user.headers);
    const kept = await createFolder(ctx.app, user.headers);
    // One entry ingested for real (its file, text and chunks), the others written directly: as many as a few uploads would leave.
    const real = await ingested(ctx.app, user.headers, folder.id, { filename: 'real.txt', content: 'Quokkas smile at sunrise.' });
    const storage = knowledgeStorage(ctx.app.settings);
    const extra = PURGE_BATCH + 20;
    const rows = Array.from({ length: extra }, (_, i) => {
      const id = randomUUID();
      return {
        id,
        owner_id: user.user.id,
        folder_id: folder.id,
        filename: `f${i}.txt`,
        mime_type: 'text/plain',
        format: 'text' as const,
        size_bytes: 20,
        sha256: '0'.repeat(64),
        storage_key: storage.keyFor(id, [user.user.id, folder.id]),
        status: 'ready' as const,
        chunk_count: 1,
      };
    });
    for (const row of rows) await storage.saveFile(`Quokkas number ${row.filename}`, row.id, undefined, [user.user.id, folder.id]);
    await ctx.database.db.insert(knowledgeEntries).values(rows);
    await ctx.database.db.insert(knowledgeChunks).values(
      rows.map((row) => ({ entry_id: row.id, owner_id: user.user.id, chunk_index: 0, text: `Quokkas number ${row.filename}`, token_count: 4, tsv: sql`to_tsvector('english', ${`Quokkas number ${row.filename}`})` as unknown as string })),
    );
    const other = await ingested(ctx.app, user.headers, kept.id, { filename: 'other.txt', content: 'Quokkas elsewhere too.' });
    expect((await search(ctx.app, user.headers, { query: 'quokkas', top_k: 50 })).data.length).toBeGreaterThan(2);

    expect((await api('DELETE', `/knowledge-base/folders/${folder.id}`, user.headers)).statusCode).toBe(200);
    // Gone for the user the moment the DELETE answers: the folder, its entries, their chunks.
    expect((await api('GET', `/knowledge-base/folders/${folder.id}`, user.headers)).statusCode).toBe(404);
    expect((await api('GET', `/knowledge-base/entries/${real.id}`, user.headers)).statusCode).toBe(404);
    expect((await api('GET', `/knowledge-base/entries/${rows.at(-1)!.id}/download`, user.headers)).statusCode).toBe(404);
    const listed = (await api('GET', '/knowledge-base/entries?limit=100', user.headers)).json<{ data: { id: string }[]; count: number }>();
    expect([listed.count, listed.data.map((e) => e.id)]).toEqual([1, [other.id]]);
    expect((await api('GET', `/knowledge-base/entries?folder_id=${folder.id}`, user.headers)).json<{ count: number }>().count).toBe(0);
    expect((await search(ctx.app, user.headers, { query: 'quokkas', top_k: 50 })).data.map((hit) => hit.entry_id)).toEqual([other.id]);
    expect((await api('GET', '/knowledge-base/stats', user.headers)).json<{ entry_count: number; folder_count: number }>()).toMatchObject({ entry_count: 1, folder_count: 1 });
    // Files: the request purged a batch; the rest waits for the sweeper, which deletes it.
    expect(await recorded()).toBeGreaterThan(0);
    await purgeDeletedFiles(deps());
    expect(storedFiles(user.user.id).filter((name) => name.startsWith(folder.id))).toEqual([]);
  });
});
