/**
 * Every chunk under a heading stores it again as its heading_path (ingestion.ts ChunkWriter.store):
 * a heading as long as its document made the database hold its size times its chunk count, which
 * the per-user quota (the uploaded bytes) does not bound. A heading path keeps at most
 * MAX_HEADING_CHARS of each heading (the document's text keeps it whole).
 */
import { randomBytes } from 'node:crypto';

import { sql } from 'drizzle-orm';
import { beforeAll, describe, expect, it } from 'vitest';

import { queryRows } from '../../src/crud/owned.js';
import { useTestApp } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { createFolder, ingested } from '../helpers/knowledge.js';

const ctx = useTestApp({ KB_CHUNK_TOKENS: '64', KB_CHUNK_OVERLAP_TOKENS: '0' });
let alice: TestUser;
beforeAll(async () => {
  alice = await createUser(ctx.app);
});

/** Words that do not compress away (TOAST would hide a repeated heading). */
const words = (chars: number) => randomBytes(chars).toString('base64').replace(/[+/=]/g, 'x').match(/.{1,7}/g)!.join(' ').slice(0, chars);

describe('heading paths', () => {
  it('keep what the chunks store in proportion to the document', async () => {
    const folder = await createFolder(ctx.app, alice.headers);
    const markdown = `# ${words(40_000)}\n\n${Array.from({ length: 200 }, () => words(200)).join('\n\n')}\n`;
    const entry = await ingested(ctx.app, alice.headers, folder.id, { filename: 'long-heading.md', content: markdown });
    const [row] = await queryRows<{ chunks: number; bytes: string }>(
      ctx.database.db,
      sql`select count(*)::int as chunks, sum(pg_column_size(heading_path))::bigint as bytes from knowledge_chunks where entry_id = ${entry.id}`,
    );
    // A ~80 KB upload; its chunks' heading paths alone hold (chunks x 40 KB).
    expect(Number(row!.bytes)).toBeLessThan(10 * Buffer.byteLength(markdown));
  }, 120_000);
});
