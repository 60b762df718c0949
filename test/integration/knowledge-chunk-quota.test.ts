/**
 * Every chunk counts at least MIN_CHUNK_CHARGE_BYTES against KB_MAX_BYTES_PER_USER: a chunk never
 * spans two sections, so Markdown of one-character sections (`# h\nx\n` over and over) made one
 * row per 6 bytes of file — 166,666 rows, ~43 MB of table and index, for a 1 MB upload that
 * counted 1 MB — and a quota of 50 MB let one user store ~2 GB of rows. Ordinary documents, whose
 * chunks hold more than the minimum, count as they did.
 */
import { sql } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';

import { MIN_CHUNK_CHARGE_BYTES } from '../../src/modules/knowledge/chunk.js';
import { useTestApp } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { apiOf } from '../helpers/http.js';
import { createFolder, ingested, settled, uploaded } from '../helpers/knowledge.js';
import { lockWaits } from '../helpers/lock-waits.js';

/** As small as the quota can be with a 1 MB file allowed (a file may not exceed it). */
const QUOTA = 1024 * 1024;
/** Rows of one batch of ingestion (CHUNK_ROWS_PER_WRITE): reserved whole before they are stored. */
const BATCH_ROWS = 250;
const ctx = useTestApp({ KB_MAX_BYTES_PER_USER: String(QUOTA), KB_MAX_FILE_BYTES: String(QUOTA) });
const api = apiOf(ctx);
const { rowsOf } = lockWaits(ctx);

const quotaUsed = async (user: TestUser) => (await api('GET', '/knowledge-base/stats', user.headers)).json<{ quota_bytes_used: number }>().quota_bytes_used;

/**
 * Counts the chunk rows inserted for `ownerId` while `work` runs, deleted since or not: a sequence
 * (not rolled back, not undone by a deletion) that a test trigger on knowledge_chunks advances.
 */
async function chunkRowsInserted(ownerId: string, work: () => Promise<void>): Promise<number> {
  const { db } = ctx.app;
  await db.execute(sql.raw('create sequence test_chunk_rows'));
  await db.execute(sql.raw(`create function test_count_chunk_row() returns trigger language plpgsql as $$ begin perform nextval('test_chunk_rows'); return null; end $$`));
  await db.execute(sql.raw(`create trigger test_count_chunk_row after insert on knowledge_chunks for each row when (new.owner_id = '${ownerId}') execute function test_count_chunk_row()`));
  try {
    await work();
    const [row] = await rowsOf<{ last_value: string | number; is_called: boolean }>(sql.raw('select last_value, is_called from test_chunk_rows'));
    return row!.is_called ? Number(row!.last_value) : 0;
  } finally {
    await db.execute(sql.raw('drop trigger if exists test_count_chunk_row on knowledge_chunks'));
    await db.execute(sql.raw('drop function if exists test_count_chunk_row()'));
    await db.execute(sql.raw('drop sequence if exists test_chunk_rows'));
  }
}

describe('each chunk counts at least a minimum against the quota', () => {
  it('fails Markdown of one-character sections over the quota, having stored no more rows than the quota pays for', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // 1 MB; each `# h` heading starts a section whose text is one byte: one chunk each.
    const markdown = '# h\nx\n'.repeat(166_667);
    expect(markdown.length).toBeLessThanOrEqual(QUOTA);
    let entry = { id: '', status: '', error: null as string | null, chunk_count: 0, text_bytes: 0 };
    const rows = await chunkRowsInserted(user.user.id, async () => {
      const { id } = await uploaded(ctx.app, user.headers, folder.id, { filename: 'headings.md', content: markdown });
      entry = await settled(ctx.app, user.headers, id, 120_000);
    });
    expect(entry.status).toBe('failed');
    // The error says why a document of 1 MB takes more than the 1 MiB quota.
    expect(entry.error).toContain('Storage quota exceeded by the extracted text');
    expect(entry.error).toContain(`each passage counts for at least ${MIN_CHUNK_CHARGE_BYTES} bytes`);
    const counted = Number(/counts for at least (\d+) bytes/.exec(entry.error!)?.[1]);
    // Refused at the first batch past the quota: the batches before it fit, each chunk counted in full.
    expect(counted).toBeGreaterThan(QUOTA);
    expect(counted).toBeLessThanOrEqual(QUOTA + BATCH_ROWS * MIN_CHUNK_CHARGE_BYTES);
    // Rows stored before the refusal: what the quota paid for, not the document's 166,667.
    expect(rows).toBeLessThanOrEqual(QUOTA / MIN_CHUNK_CHARGE_BYTES);
    // None of it kept (as any entry over the quota); it counts for its file alone.
    expect(entry).toMatchObject({ chunk_count: 0, text_bytes: 0 });
    const [left] = await rowsOf<{ n: number }>(sql`select count(*)::int as n from knowledge_chunks where entry_id = ${entry.id}`);
    expect(left!.n).toBe(0);
    expect(await quotaUsed(user)).toBe(Buffer.byteLength(markdown));
  }, 180_000);

  it('counts an ordinary document, whose sections hold 500 bytes or more, for its text as before', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // A manual: sections of two to five paragraphs of ~250 bytes each.
    const sentence = (i: number) => `Step ${i}: check that the gripper's torque sensor reads zero with no payload, then calibrate the axis within ten milliseconds. `;
    const sections = Array.from({ length: 60 }, (_, s) => `## Section ${s}\n\n${Array.from({ length: 2 + (s % 4) }, (_, p) => sentence(s * 10 + p).repeat(2)).join('\n\n')}\n`);
    const markdown = `# Manual\n\n${sections.join('\n')}`;
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'manual.md', content: markdown });
    const content = (await api('GET', `/knowledge-base/entries/${entry.id}/content`, user.headers)).body;
    // Its text once: at least its bytes without white space, and within a few % of all of them.
    expect(entry.text_bytes).toBeGreaterThanOrEqual(Buffer.byteLength(content.replace(/\s+/g, '')));
    expect(entry.text_bytes).toBeLessThanOrEqual(Buffer.byteLength(content) * 1.03);
    expect(await quotaUsed(user)).toBe(Math.max(Buffer.byteLength(markdown), entry.text_bytes));
  });
});
