import { randomUUID } from 'node:crypto';
import { getEventListeners } from 'node:events';
import type { AddressInfo } from 'node:net';
import { connect } from 'node:net';
import { PassThrough } from 'node:stream';

import { count, eq, type SQL, sql } from 'drizzle-orm';
import { PgDialect } from 'drizzle-orm/pg-core';
import type { LightMyRequestResponse } from 'fastify';
import { beforeAll, describe, expect, it, vi } from 'vitest';

import { knowledgeChunks, knowledgeEntries, knowledgeFileDeletions, knowledgeFolders } from '../../src/models/index.js';

import { queryRows } from '../../src/crud/owned.js';
import { contentDisposition } from '../../src/routers/knowledge.js';
import { KNOWLEDGE_PREFIX, purgeDeletedFiles } from '../../src/services/knowledge/files.js';
import { sweepIngestion } from '../../src/services/knowledge/ingestion.js';
import { boundedQuestion, fullTextQuery, fullTextStatement, MAX_EXCLUDED_WORDS, MAX_QUESTION_WORD_TOKENS, MAX_QUESTION_WORDS, questionLexemes, questionQuery, type Scope } from '../../src/services/knowledge/search.js';
import { buildTestApp, useTestApp } from '../helpers/app.js';
import { madeFile, markdownBlocks, writeDocx, writePdf } from '../helpers/documents.js';
import { createProject, createUser, type TestUser } from '../helpers/factories.js';
import { apiOf, call, createKey, eventually, expectValidationError, type ListBody, sleep, xApiKey } from '../helpers/http.js';
import { createFolder, type EntryBody, ingested, multipartBody, search, settled, storedFiles as storedFilesIn, SWEEP,upload, uploaded } from '../helpers/knowledge.js';
import { backendPid, lockWaits } from '../helpers/lock-waits.js';
import { captureLogs, LEVEL } from '../helpers/logs.js';

const FILE_LIMIT = 100_000;
const USER_QUOTA = 250_000;
// The ingestion jobs' lines, for a test to see where a job ended.
const logs = captureLogs('info');
const ctx = useTestApp({ KB_MAX_FILE_BYTES: String(FILE_LIMIT), KB_MAX_BYTES_PER_USER: String(USER_QUOTA), KB_CHUNK_TOKENS: '64', KB_CHUNK_OVERLAP_TOKENS: '8' }, { logger: logs.logger });
const api = apiOf(ctx);

/** Files under the user's part of the knowledge-base storage (local backend). */
const storedFiles = (ownerId: string) => storedFilesIn(ctx.app.settings.dataDir, ownerId);

/**
 * Invisible format characters beyond the bidi overrides and zero-width spaces: the Arabic letter
 * mark (a bidi mark like U+200F), the word joiner, the soft hyphen, a tag character, a line
 * separator. Each lets two names that look the same on screen be different files.
 */
const INVISIBLE_IN_NAMES = ['a\u061Cb.pdf', 'a\u2060b.pdf', 'in\u00ADvoice.pdf', 'a\u{E0041}b.pdf', 'a\u2028b.pdf'];

async function entryCount(user: TestUser): Promise<number> {
  return (await api('GET', '/knowledge-base/entries', user.headers)).json<ListBody<EntryBody>>().count;
}

const MARKDOWN = `# Handbook

Introduction to the handbook.

## Billing

Invoices are sent on the first working day of every month. Refunds take ten days.

## Security

Passwords are hashed with Argon2id and never logged.
`;

let alice: TestUser;
let bob: TestUser;
beforeAll(async () => {
  alice = await createUser(ctx.app);
  bob = await createUser(ctx.app);
});

describe('folders', () => {
  it('numbers a name the owner already has, on creation and rename; other users keep their own names', async () => {
    const user = await createUser(ctx.app);
    const first = await createFolder(ctx.app, user.headers, { name: 'Reports' });
    const second = await createFolder(ctx.app, user.headers, { name: 'Reports' });
    const third = await createFolder(ctx.app, user.headers, { name: ' Reports ' });
    expect([first.name, second.name, third.name]).toEqual(['Reports', 'Reports (1)', 'Reports (2)']);
    expect((await createFolder(ctx.app, bob.headers, { name: 'Reports' })).name).toMatch(/^Reports/);
    const renamed = await api('PATCH', `/knowledge-base/folders/${third.id}`, user.headers, { name: 'Reports' });
    expect(renamed.json()).toMatchObject({ name: 'Reports (2)' }); // its own name is free to keep
    expect((await api('PATCH', `/knowledge-base/folders/${first.id}`, user.headers, { name: 'Reports (1)' })).json()).toMatchObject({ name: 'Reports (1) (1)' });
  });

  it('numbers a long name within 255 characters without cutting a character in two, however long its extension', async () => {
    const user = await createUser(ctx.app);
    const loneHalf = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
    // 255 characters: the numbered names' stem is shortened; an "extension" of 126 emoji (252 UTF-16 units): they cut into it.
    for (const [name, starts] of [
      [`${'x'.repeat(251)}.txt`, [`${'x'.repeat(247)} (1).txt`, `${'x'.repeat(247)} (2).txt`]],
      [`a.${'😀'.repeat(126)}`, ['a (1).😀', 'a (2).😀']],
    ] as const) {
      const names: string[] = [];
      for (let i = 0; i < 3; i++) {
        const created = await api('POST', '/knowledge-base/folders', user.headers, { name });
        expect(created.statusCode, created.body).toBe(200);
        names.push(created.json<{ name: string }>().name);
      }
      expect(names[0]).toBe(name);
      expect(names.slice(1).map((n) => n.slice(0, starts[0].length))).toEqual(starts);
      for (const numbered of names) {
        expect(numbered.length).toBeLessThanOrEqual(255);
        expect(numbered).not.toMatch(/\uFFFD/);
        expect(numbered).not.toMatch(loneHalf);
      }
    }
  });

  it('refuses names that are empty, dots, or carry separators, controls or invisible marks (422)', async () => {
    for (const name of ['', '   ', '.', '..', 'a/b', 'a\\b', 'a\u0000b', 'tab\there', 'exe\u202Etxt.pdf', 'a\u200Bb', 'n'.repeat(256), ...INVISIBLE_IN_NAMES]) {
      expectValidationError(await api('POST', '/knowledge-base/folders', alice.headers, { name }), ['body', 'name']);
    }
  });

  it('deletes its entries, their index and their stored files with it', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'a.txt', content: 'Zebras graze at dawn.' });
    expect(storedFiles(user.user.id)).toHaveLength(2); // the file and its extracted text
    expect((await api('DELETE', `/knowledge-base/folders/${folder.id}`, user.headers)).statusCode).toBe(200);
    expect((await api('GET', `/knowledge-base/entries/${entry.id}`, user.headers)).statusCode).toBe(404);
    expect(await ctx.database.db.select().from(knowledgeChunks).where(eq(knowledgeChunks.entry_id, entry.id))).toEqual([]);
    expect(storedFiles(user.user.id)).toEqual([]);
  });
  it('deletes the files of entries that a deleted project or user took with it (by the sweep)', async () => {
    const user = await createUser(ctx.app);
    const project = await createProject(ctx.app, user.headers);
    const inProject = await createFolder(ctx.app, user.headers, { name: 'P', project_id: project.id });
    const loose = await createFolder(ctx.app, user.headers, { name: 'L' });
    await ingested(ctx.app, user.headers, inProject.id, { filename: 'p.txt', content: 'Project file.' });
    await ingested(ctx.app, user.headers, loose.id, { filename: 'l.txt', content: 'Loose file.' });
    expect(storedFiles(user.user.id)).toHaveLength(4);
    const purge = () => purgeDeletedFiles({ db: ctx.app.db, settings: ctx.app.settings, log: ctx.app.log });
    expect((await api('DELETE', `/projects/${project.id}`, user.headers)).statusCode).toBe(200);
    expect(await purge()).toBe(1);
    expect(storedFiles(user.user.id)).toHaveLength(2);
    expect((await api('DELETE', '/users/me', user.headers)).statusCode).toBe(200);
    expect(await purge()).toBe(1);
    expect(storedFiles(user.user.id)).toEqual([]);
    expect(await purge()).toBe(0);
  });
});

describe('MAX_KNOWLEDGE_FOLDERS_PER_USER', () => {
  const LIMIT = 2;
  const detail = `Knowledge folder limit reached (${LIMIT} per user)`;

  it('answers 409 beyond the limit, per user, concurrent creations (same name: numbered) included; deleting one makes room', async () => {
    const limited = await buildTestApp(ctx.database, { MAX_KNOWLEDGE_FOLDERS_PER_USER: String(LIMIT) });
    try {
      const [user, other] = [await createUser(limited), await createUser(limited)];
      const create = (headers: Record<string, string>, name: string) => call(limited, 'POST', '/knowledge-base/folders', headers, { name });
      // Side by side, half of them under one name: the name's retries take the owner's lock again.
      const responses = await Promise.all(Array.from({ length: 6 }, (_, i) => create(user.headers, i % 2 ? 'Same' : `F${i}`)));
      expect(responses.filter((r) => r.statusCode === 200)).toHaveLength(LIMIT);
      for (const refused of responses.filter((r) => r.statusCode !== 200)) {
        expect(refused.statusCode).toBe(409);
        expect(refused.json()).toEqual({ detail });
      }
      const [row] = await limited.db.select({ value: count() }).from(knowledgeFolders).where(eq(knowledgeFolders.owner_id, user.user.id));
      expect(row?.value).toBe(LIMIT);
      expect((await create(other.headers, 'Theirs')).statusCode).toBe(200);
      const first = responses.find((r) => r.statusCode === 200)!.json<{ id: string }>();
      expect((await call(limited, 'DELETE', `/knowledge-base/folders/${first.id}`, user.headers)).statusCode).toBe(200);
      expect((await create(user.headers, 'Again')).statusCode).toBe(200);
      expect((await create(user.headers, 'Over')).json()).toEqual({ detail });
    } finally {
      await limited.close();
    }
  });
});

describe('upload', () => {
  it('stores the file and answers 201 with a pending entry and its Location; ingestion makes it ready', async () => {
    const folder = await createFolder(ctx.app, alice.headers);
    const response = await upload(ctx.app, alice.headers, folder.id, { filename: 'notes.txt', content: 'Otters hold hands while they sleep.', type: 'text/plain' });
    expect(response.statusCode, response.body).toBe(201);
    const entry = response.json<EntryBody>();
    expect(response.headers.location).toBe(`/api/v1/knowledge-base/entries/${entry.id}`);
    expect(entry).toMatchObject({ folder_id: folder.id, owner_id: alice.user.id, filename: 'notes.txt', size_bytes: 35, mime_type: 'text/plain', format: 'text' });
    expect(['pending', 'processing', 'ready']).toContain(entry.status);
    expect(entry.sha256).toMatch(/^[0-9a-f]{64}$/);
    const done = await settled(ctx.app, alice.headers, entry.id);
    expect(done).toMatchObject({ status: 'ready', error: null, format: 'text' });
    expect(done.chunk_count).toBe(1);
    const content = await api('GET', `/knowledge-base/entries/${entry.id}/content`, alice.headers);
    expect(content.statusCode).toBe(200);
    expect(content.headers['content-type']).toBe('text/plain; charset=utf-8');
    expect(content.body).toBe('Otters hold hands while they sleep.');
  });

  it('gives a clashing name a number, race-free', async () => {
    const folder = await createFolder(ctx.app, alice.headers);
    const file = { filename: 'report.txt', content: 'quarterly figures' };
    const entries = await Promise.all([0, 1, 2, 3].map(() => uploaded(ctx.app, alice.headers, folder.id, file)));
    expect(entries.map((e) => e.filename).sort()).toEqual(['report (1).txt', 'report (2).txt', 'report (3).txt', 'report.txt']);
    const other = await uploaded(ctx.app, alice.headers, folder.id, { filename: 'other.txt', content: 'x' });
    const renamed = await api('PATCH', `/knowledge-base/entries/${other.id}`, alice.headers, { filename: 'report.txt' });
    expect(renamed.statusCode).toBe(200);
    expect(renamed.json<EntryBody>().filename).toBe('report (4).txt');
    // An entry keeps its own name when renamed to it.
    const same = await api('PATCH', `/knowledge-base/entries/${entries[0]!.id}`, alice.headers, { filename: entries[0]!.filename });
    expect(same.json<EntryBody>().filename).toBe(entries[0]!.filename);
    expectValidationError(await api('PATCH', `/knowledge-base/entries/${other.id}`, alice.headers, { filename: '../x' }), ['body', 'filename']);
  });

  it('answers 422 for a body without a file, a non-multipart body, another field name and bad file names', async () => {
    const folder = await createFolder(ctx.app, alice.headers);
    const url = `/api/v1/knowledge-base/folders/${folder.id}/upload`;
    const onlyField = multipartBody([{ field: 'note', value: 'no file here' }]);
    const noFile = await ctx.app.inject({ method: 'POST', url, headers: { ...alice.headers, 'content-type': onlyField.contentType }, payload: onlyField.body });
    expect(expectValidationError(noFile, ['body', 'file'], 'missing').detail[0]!.msg).toContain('"file"');
    expectValidationError(await api('POST', `/knowledge-base/folders/${folder.id}/upload`, alice.headers, { file: 'x' }), ['body', 'file'], 'missing');
    expectValidationError(await upload(ctx.app, alice.headers, folder.id, { field: 'document', filename: 'a.txt', content: 'x' }), ['body', 'file'], 'missing');
    for (const filename of ['..', 'a\u0001b.txt', 'exe\u202Etxt.pdf', `${'n'.repeat(256)}.txt`, '   ', ...INVISIBLE_IN_NAMES]) {
      expectValidationError(await upload(ctx.app, alice.headers, folder.id, { filename, content: 'x' }), ['body', 'file']);
    }
    expect(await entryCount(alice)).toBeGreaterThanOrEqual(0);
    expect((await api('GET', `/knowledge-base/entries?folder_id=${folder.id}`, alice.headers)).json<ListBody<EntryBody>>().count).toBe(0);
  });

  it('answers 400 for a malformed form (no closing boundary, no boundary, garbage) and logs no error', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const url = `/api/v1/knowledge-base/folders/${folder.id}/upload`;
    const head = '--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.md"\r\nContent-Type: text/markdown\r\n\r\n';
    const forms: [string, string][] = [
      ['multipart/form-data; boundary=xyz', `${head}hello`], // the file's part never ends
      ['multipart/form-data; boundary=xyz', `${head}hello\r\n--xyz\r\nContent-Disp`], // a second part cut in its header
      ['multipart/form-data; boundary=xyz', 'garbage'],
      ['multipart/form-data', `${head}hello\r\n--xyz--\r\n`],
      ['multipart/form-data; boundary=', `${head}hello\r\n--xyz--\r\n`],
    ];
    const from = logs.lines().length;
    for (const [contentType, payload] of forms) {
      const response = await ctx.app.inject({ method: 'POST', url, headers: { ...user.headers, 'content-type': contentType }, payload });
      expect(response.statusCode, `${contentType}: ${payload}`).toBe(400);
      expect(response.json<{ detail: string }>().detail).toMatch(/^Malformed multipart\/form-data body: /);
    }
    expect(logs.lines().slice(from).filter((line) => (line.level as number) >= LEVEL.error)).toEqual([]);
    expect(await entryCount(user)).toBe(0);
    expect(storedFiles(user.user.id)).toEqual([]);
  });

  it('refuses a file over the per-file limit with 413 and the figures, storing nothing', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // Declared far over the limit: refused from Content-Length alone.
    const declared = await upload(ctx.app, user.headers, folder.id, { filename: 'big.txt', content: 'x'.repeat(FILE_LIMIT * 2 + 70_000) });
    expect(declared.statusCode).toBe(413);
    expect(declared.json<{ detail: string }>().detail).toMatch(new RegExp(`File too large: more than \\d+ bytes .*; the limit is ${FILE_LIMIT} bytes \\(0\\.1 MiB\\) per file`));
    // Just over: found out while the file streams in.
    const streamed = await upload(ctx.app, user.headers, folder.id, { filename: 'big.txt', content: 'x'.repeat(FILE_LIMIT + 1) });
    expect(streamed.statusCode).toBe(413);
    expect(streamed.json<{ detail: string }>().detail).toContain(`the limit is ${FILE_LIMIT} bytes`);
    // Exactly the limit is fine.
    expect((await upload(ctx.app, user.headers, folder.id, { filename: 'edge.txt', content: 'y'.repeat(FILE_LIMIT) })).statusCode).toBe(201);
    expect(await entryCount(user)).toBe(1);
    expect(storedFiles(user.user.id).filter((name) => !name.endsWith('.txt'))).toHaveLength(1);
  });

  it('refuses an upload over what is left of the per-user total with 413 and the figures', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // Text whose passages hold more than the least a passage counts for (512 bytes: runs of dashes
    // are long tokens), so each entry counts for its file once indexed too. A letter repeated is
    // cut into ~120-byte passages at this app's 64 tokens, ~380 KB counted a file.
    const content = '-'.repeat(90_000);
    for (const name of ['a.txt', 'b.txt']) await uploaded(ctx.app, user.headers, folder.id, { filename: name, content });
    const response = await upload(ctx.app, user.headers, folder.id, { filename: 'c.txt', content });
    expect(response.statusCode).toBe(413);
    const { detail } = response.json<{ detail: string }>();
    expect(detail).toContain('Storage quota exceeded');
    expect(detail).toContain(`only 70000 bytes`);
    expect(detail).toContain(`of your ${USER_QUOTA} bytes`);
    expect(detail).toContain('(180000 bytes');
    const stats = (await api('GET', '/knowledge-base/stats', user.headers)).json<Record<string, unknown>>();
    expect(stats).toMatchObject({ size_bytes: 180_000, quota_bytes_used: 180_000, max_bytes_per_user: USER_QUOTA, max_file_bytes: FILE_LIMIT, folder_count: 1, entry_count: 2 });
    // Freeing space makes room again.
    const [first] = (await api('GET', '/knowledge-base/entries', user.headers)).json<ListBody<EntryBody>>().data;
    await api('DELETE', `/knowledge-base/entries/${first!.id}`, user.headers);
    expect((await upload(ctx.app, user.headers, folder.id, { filename: 'c.txt', content })).statusCode).toBe(201);
  });

  it('counts each entry for at least 4 KiB against the total: tiny files cannot pile up without bound', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const fits = Math.floor(USER_QUOTA / 4096); // 61
    const rows = Array.from({ length: fits - 1 }, (_, i) => ({
      owner_id: user.user.id,
      folder_id: folder.id,
      filename: `tiny-${i}.txt`,
      mime_type: 'text/plain',
      size_bytes: 1,
      sha256: '0'.repeat(64),
      storage_key: `${KNOWLEDGE_PREFIX}/${user.user.id}/${folder.id}/${randomUUID()}`,
      status: 'failed' as const,
    }));
    await ctx.database.db.insert(knowledgeEntries).values(rows);
    expect((await upload(ctx.app, user.headers, folder.id, { filename: 'last.txt', content: 'x' })).statusCode).toBe(201);
    const refused = await upload(ctx.app, user.headers, folder.id, { filename: 'one-more.txt', content: 'x' });
    expect(refused.statusCode).toBe(413);
    expect(refused.json<{ detail: string }>().detail).toBe(
      `Storage quota exceeded: the file is 1 bytes (0.0 MiB) (each file counts for at least 4096 bytes (0.0 MiB)) but only ${USER_QUOTA - fits * 4096} bytes (0.0 MiB) of your ${USER_QUOTA} bytes (0.2 MiB) are left (${fits * 4096} bytes (0.2 MiB) used); delete entries to make room`,
    );
    expect(storedFiles(user.user.id).filter((name) => name.startsWith(folder.id) && !name.endsWith('.txt'))).toHaveLength(1);
    // The stats say what the files hold, and what they count for against the quota.
    expect((await api('GET', '/knowledge-base/stats', user.headers)).json()).toMatchObject({ size_bytes: fits, quota_bytes_used: fits * 4096, max_bytes_per_user: USER_QUOTA });
  });

  it('never lets concurrent uploads overrun the per-user total together', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // Dashes: their passages hold more than the 512 bytes a passage counts for at least, so no
    // ingestion that starts meanwhile reserves more than its file (a letter repeated: ~330 KB) and
    // takes an upload's room.
    const responses = await Promise.all([0, 1, 2, 3].map((i) => upload(ctx.app, user.headers, folder.id, { filename: `${i}.txt`, content: '-'.repeat(80_000) })));
    const statuses = responses.map((r) => r.statusCode).sort();
    expect(statuses).toEqual([201, 201, 201, 413]);
    const used = (await api('GET', '/knowledge-base/stats', user.headers)).json<{ size_bytes: number }>().size_bytes;
    expect(used).toBe(240_000);
    expect(storedFiles(user.user.id).filter((name) => !name.endsWith('.txt'))).toHaveLength(3);
  });

  it('documents the form (a binary `file`) in the OpenAPI document, with every answer', async () => {
    const document = (await ctx.app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).json<{ paths: Record<string, Record<string, Record<string, unknown>>> }>();
    const operation = document.paths['/api/v1/knowledge-base/folders/{folder_id}/upload']!.post!;
    expect(operation.operationId).toBe('upload_knowledge_entry');
    expect(operation.requestBody).toMatchObject({
      content: { 'multipart/form-data': { schema: { type: 'object', required: ['file'], properties: { file: { type: 'string', format: 'binary' } } } } },
    });
    expect(Object.keys(operation.responses as object).sort()).toEqual(['201', '400', '401', '402', '403', '404', '413', '422', '429', '503']);
  });

  it('refuses a form with a second file with 422 (one file per upload), keeping nothing: no entry, no stored file, no job', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const url = `/api/v1/knowledge-base/folders/${folder.id}/upload`;
    const queued = vi.spyOn(ctx.app.queue, 'add');
    try {
      for (const second of [
        { filename: 'b.txt', content: 'The second file.' },
        { field: 'other', filename: 'c.txt', content: 'A file in another field.' },
      ]) {
        const form = multipartBody([{ field: 'note', value: 'before' }, { filename: 'a.txt', content: 'The first file.', type: 'text/plain' }, second, { field: 'tail', value: 'after' }]);
        const response = await ctx.app.inject({ method: 'POST', url, headers: { ...user.headers, 'content-type': form.contentType }, payload: form.body });
        expect(expectValidationError(response, ['body', 'file'], 'value_error').detail[0]!.msg).toContain('One file per upload');
      }
      expect(queued.mock.calls.filter(([name]) => name === 'ingest-entry')).toEqual([]);
    } finally {
      queued.mockRestore();
    }
    expect(await entryCount(user)).toBe(0);
    expect(storedFiles(user.user.id)).toEqual([]);
    expect((await api('GET', '/knowledge-base/stats', user.headers)).json()).toMatchObject({ size_bytes: 0, entry_count: 0 });
  });

  it('takes a file with text fields before and after it (201), as the one file it is; more than 10 fields: 413, nothing kept', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const form = multipartBody([{ field: 'note', value: 'before' }, { filename: 'a.txt', content: 'Only this file.', type: 'text/plain' }, { field: 'comment', value: 'after' }]);
    const response = await ctx.app.inject({
      method: 'POST',
      url: `/api/v1/knowledge-base/folders/${folder.id}/upload`,
      headers: { ...user.headers, 'content-type': form.contentType },
      payload: form.body,
    });
    expect(response.statusCode, response.body).toBe(201);
    expect(response.json<EntryBody>()).toMatchObject({ filename: 'a.txt', size_bytes: 15, format: 'text' });
    expect(await entryCount(user)).toBe(1);
    expect(storedFiles(user.user.id).filter((name) => !name.endsWith('.txt'))).toHaveLength(1);
    // More fields than a form may carry (10), after the file: 413 with what to do, and the file is not kept.
    const crowded = multipartBody([{ filename: 'b.txt', content: 'Crowded.', type: 'text/plain' }, ...Array.from({ length: 11 }, (_, i) => ({ field: `f${i}`, value: 'v' }))]);
    const refused = await ctx.app.inject({
      method: 'POST',
      url: `/api/v1/knowledge-base/folders/${folder.id}/upload`,
      headers: { ...user.headers, 'content-type': crowded.contentType },
      payload: crowded.body,
    });
    expect(refused.statusCode).toBe(413);
    expect(refused.json()).toEqual({ detail: 'Form has too many fields: send the file with at most 10 other fields' });
    expect(await entryCount(user)).toBe(1);
    expect(storedFiles(user.user.id).filter((name) => !name.endsWith('.txt'))).toHaveLength(1);
  });

  it('answers 404 for another user\'s folder and a missing one, storing nothing', async () => {
    const folder = await createFolder(ctx.app, alice.headers);
    for (const id of [folder.id, randomUUID()]) {
      const response = await upload(ctx.app, bob.headers, id, { filename: 'x.txt', content: 'intruder' });
      expect(response.statusCode).toBe(404);
      expect(response.json()).toEqual({ detail: 'Folder not found' });
    }
    expect(storedFiles(bob.user.id)).toEqual([]);
  });
});

describe('uploads over a real connection', () => {
  let port = 0;
  beforeAll(async () => {
    await ctx.app.listen({ host: '127.0.0.1', port: 0 });
    port = (ctx.app.server.address() as AddressInfo).port;
  });

  /** Sends `head` and then `body` in pieces until the answer arrives; what was answered and how much of the body had gone. */
  function rawUpload(head: string, pieces: Iterable<Buffer>, pauseMs = 5): Promise<{ answer: string; sent: number; total: number }> {
    return new Promise((resolve, reject) => {
      const socket = connect(port, '127.0.0.1');
      let answer = '';
      let sent = 0;
      let total = 0;
      const all = [...pieces];
      for (const piece of all) total += piece.length;
      socket.on('data', (data) => {
        answer += data.toString();
        if (answer.includes('\r\n\r\n') && /content-length: (\d+)/i.test(answer)) {
          const length = Number(/content-length: (\d+)/i.exec(answer)![1]);
          if (answer.length >= answer.indexOf('\r\n\r\n') + 4 + length) {
            socket.destroy();
            resolve({ answer, sent, total });
          }
        }
      });
      socket.on('error', (error) => (answer ? resolve({ answer, sent, total }) : reject(error)));
      socket.write(head);
      void (async () => {
        for (const piece of all) {
          if (socket.destroyed || answer) return;
          socket.write(piece);
          sent += piece.length;
          await sleep(pauseMs);
        }
      })();
    });
  }

  function requestHead(folderId: string, headers: Record<string, string>, extra: string): string {
    const auth = Object.entries(headers)
      .map(([k, v]) => `${k}: ${v}\r\n`)
      .join('');
    return `POST /api/v1/knowledge-base/folders/${folderId}/upload HTTP/1.1\r\nHost: x\r\n${auth}${extra}\r\n`;
  }

  it('answers 413 from Content-Length before the body is sent, and from the stream before it ends', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const { body, contentType } = multipartBody([{ filename: 'huge.txt', content: 'h'.repeat(2_000_000) }]);
    const pieces = Array.from({ length: Math.ceil(body.length / 16_384) }, (_, i) => body.subarray(i * 16_384, (i + 1) * 16_384));
    const declared = await rawUpload(requestHead(folder.id, user.headers, `Content-Type: ${contentType}\r\nContent-Length: ${body.length}\r\n`), pieces);
    expect(declared.answer).toMatch(/^HTTP\/1\.1 413/);
    expect(declared.sent).toBeLessThan(declared.total);
    // Chunked: no length up front; refused once the stream passes the limit.
    const chunked = pieces.map((piece) => Buffer.concat([Buffer.from(`${piece.length.toString(16)}\r\n`), piece, Buffer.from('\r\n')]));
    const streamed = await rawUpload(requestHead(folder.id, user.headers, `Content-Type: ${contentType}\r\nTransfer-Encoding: chunked\r\n`), chunked);
    expect(streamed.answer).toMatch(/^HTTP\/1\.1 413/);
    expect(streamed.answer).toContain(`the limit is ${FILE_LIMIT} bytes`);
    expect(streamed.sent).toBeLessThan(streamed.total);
    expect(await entryCount(user)).toBe(0);
    expect(storedFiles(user.user.id)).toEqual([]);
  });

  it('refuses a second file arriving after the first was stored (422), deleting the first: no entry, no file', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const { body, contentType } = multipartBody([
      { filename: 'first.txt', content: 'f'.repeat(90_000), type: 'text/plain' },
      { filename: 'second.txt', content: 's'.repeat(1_000), type: 'text/plain' },
    ]);
    // Up to the second part's boundary: the first file is complete (its end is that boundary), the second not yet begun.
    const boundary = contentType.slice(contentType.indexOf('boundary=') + 'boundary='.length);
    const cut = body.indexOf(`\r\n--${boundary}\r\n`, 1) + `\r\n--${boundary}\r\n`.length;
    const answer = await new Promise<string>((resolve, reject) => {
      let received = '';
      const socket = connect(port, '127.0.0.1', () => {
        socket.write(requestHead(folder.id, user.headers, `Content-Type: ${contentType}\r\nContent-Length: ${body.length}\r\n`));
        socket.write(body.subarray(0, cut));
        void (async () => {
          // The first file streamed to storage, and no entry for it while the form goes on.
          await eventually(async () => storedFiles(user.user.id).length === 1);
          await sleep(100);
          expect(await entryCount(user)).toBe(0);
          socket.write(body.subarray(cut));
        })().catch(reject);
      });
      socket.on('data', (data) => {
        received += data.toString();
        const length = /content-length: (\d+)/i.exec(received);
        if (length && received.includes('\r\n\r\n') && received.length >= received.indexOf('\r\n\r\n') + 4 + Number(length[1])) {
          socket.destroy();
          resolve(received);
        }
      });
      socket.on('error', reject);
    });
    expect(answer).toMatch(/^HTTP\/1\.1 422/);
    expect(answer).toContain('One file per upload');
    expect(await entryCount(user)).toBe(0);
    expect(await ctx.database.db.$count(knowledgeFileDeletions, sql`starts_with(${knowledgeFileDeletions.storage_key}, ${`${KNOWLEDGE_PREFIX}/${user.user.id}/`})`)).toBe(0);
    expect(storedFiles(user.user.id)).toEqual([]);
  });

  it('leaves neither row nor file when the client goes away midway', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const { body, contentType } = multipartBody([{ filename: 'cut.txt', content: 'c'.repeat(90_000) }]);
    await new Promise<void>((resolve) => {
      const socket = connect(port, '127.0.0.1', () => {
        socket.write(requestHead(folder.id, user.headers, `Content-Type: ${contentType}\r\nContent-Length: ${body.length}\r\n`));
        socket.write(body.subarray(0, 50_000), () => setTimeout(() => socket.destroy(), 100));
      });
      socket.on('close', () => resolve());
      socket.on('error', () => undefined);
    });
    await sleep(300);
    expect(await entryCount(user)).toBe(0);
    expect(storedFiles(user.user.id)).toEqual([]);
    // Nor the record of its key (an upload's mark, which would count it in progress until its grace passed).
    expect(await ctx.database.db.$count(knowledgeFileDeletions, sql`starts_with(${knowledgeFileDeletions.storage_key}, ${`${KNOWLEDGE_PREFIX}/${user.user.id}/`})`)).toBe(0);
    // The connection's end left the server fine.
    expect((await upload(ctx.app, user.headers, folder.id, { filename: 'ok.txt', content: 'fine' })).statusCode).toBe(201);
  });

  it("reads a client gone midway as the client's doing, not as the database out of reach (no error logged)", async () => {
    // A fresh app: the database-unavailable line is written once in a window, which an earlier test may have used.
    const appLogs = captureLogs('info');
    const app = await buildTestApp(ctx.database, {}, { logger: appLogs.logger, closeDatabase: false });
    try {
      await app.listen({ port: 0, host: '127.0.0.1' });
      const user = await createUser(app);
      const folder = await createFolder(app, user.headers);
      const { body, contentType } = multipartBody([{ filename: 'cut.txt', content: 'c'.repeat(90_000) }]);
      await new Promise<void>((resolve) => {
        const socket = connect((app.server.address() as AddressInfo).port, '127.0.0.1', () => {
          socket.write(requestHead(folder.id, user.headers, `Content-Type: ${contentType}\r\nContent-Length: ${body.length}\r\n`));
          socket.write(body.subarray(0, 50_000), () => setTimeout(() => socket.destroy(), 100));
        });
        socket.on('close', () => resolve());
        socket.on('error', () => undefined);
      });
      await sleep(500);
      // Its ECONNRESET ("aborted") was taken for the database's: an error line any client could write,
      // which also used up the window's one line from a real outage.
      expect(appLogs.lines().filter((line) => line.msg === 'database unavailable')).toEqual([]);
      expect(appLogs.lines().filter((line) => (line.level as number) >= LEVEL.error)).toEqual([]);
    } finally {
      await app.close();
    }
  });
});

describe('entries', () => {
  it('downloads the file as uploaded, with its type and an RFC 5987 name', async () => {
    const folder = await createFolder(ctx.app, alice.headers);
    const bytes = 'Grüße aus Köln — naïve café';
    const entry = await uploaded(ctx.app, alice.headers, folder.id, { filename: 'Grüße Köln (1).md', content: bytes, type: 'text/markdown' });
    const response = await api('GET', `/knowledge-base/entries/${entry.id}/download`, alice.headers);
    expect(response.statusCode).toBe(200);
    expect(response.body).toBe(bytes);
    expect(response.headers['content-type']).toBe('text/markdown');
    expect(Number(response.headers['content-length'])).toBe(Buffer.byteLength(bytes));
    expect(response.headers['content-disposition']).toBe(`attachment; filename="Gr__e K_ln (1).md"; filename*=UTF-8''Gr%C3%BC%C3%9Fe%20K%C3%B6ln%20%281%29.md`);
    expect(contentDisposition('a "quoted" \\ 100%.txt')).toBe(`attachment; filename="a _quoted_ _ 100_.txt"; filename*=UTF-8''a%20%22quoted%22%20%5C%20100%25.txt`);
  });

  it('sniffs the type from the bytes, not the name or the client', async () => {
    const folder = await createFolder(ctx.app, alice.headers);
    const html = await uploaded(ctx.app, alice.headers, folder.id, { filename: 'page', content: '<!doctype html><html><body><p>Hi</p></body></html>', type: 'application/pdf' });
    expect(html).toMatchObject({ format: 'html', mime_type: 'text/html' });
    const binary = await uploaded(ctx.app, alice.headers, folder.id, { filename: 'binary.txt', content: Buffer.from([0, 1, 2, 3, 0, 255, 254, 0]), type: 'text/plain' });
    expect(binary).toMatchObject({ format: null, mime_type: 'application/octet-stream' });
    const failed = await settled(ctx.app, alice.headers, binary.id);
    expect(failed.status).toBe('failed');
    expect(failed.error).toMatch(/binary/);
    expect((await api('GET', `/knowledge-base/entries/${binary.id}/content`, alice.headers)).statusCode).toBe(409);
  });

  it('fails an empty file with an error the user can act on', async () => {
    const folder = await createFolder(ctx.app, alice.headers);
    const entry = await settled(ctx.app, alice.headers, (await uploaded(ctx.app, alice.headers, folder.id, { filename: 'empty.txt', content: '' })).id);
    expect(entry).toMatchObject({ status: 'failed', chunk_count: 0 });
    expect(entry.error).toContain('empty');
  });

  it('moves into another of the owner\'s folders (numbering a clash, taking its project), never into another user\'s', async () => {
    const project = await createProject(ctx.app, alice.headers);
    const from = await createFolder(ctx.app, alice.headers);
    const to = await createFolder(ctx.app, alice.headers, { name: 'Target', project_id: project.id });
    await uploaded(ctx.app, alice.headers, to.id, { filename: 'same.txt', content: 'one' });
    const entry = await uploaded(ctx.app, alice.headers, from.id, { filename: 'same.txt', content: 'two' });
    const moved = await api('PUT', `/knowledge-base/entries/${entry.id}/move`, alice.headers, { folder_id: to.id });
    expect(moved.statusCode, moved.body).toBe(200);
    expect(moved.json()).toMatchObject({ folder_id: to.id, filename: 'same (1).txt', project_id: project.id });
    // The stored file stays where it was put: still downloadable.
    expect((await api('GET', `/knowledge-base/entries/${entry.id}/download`, alice.headers)).body).toBe('two');
    const bobs = await createFolder(ctx.app, bob.headers);
    const refused = await api('PUT', `/knowledge-base/entries/${entry.id}/move`, alice.headers, { folder_id: bobs.id });
    expect(refused.statusCode).toBe(404);
    expect(refused.json()).toEqual({ detail: 'Folder not found' });
  });

  // The move read its target folder's project before its write: a change of that project committed
  // in between left the entry under the old one, where a key scoped to that project still read it.
  // PGlite runs one session at a time, so only the server can hold the move at its write.
  it.skipIf(!process.env.DATABASE_URL)("keeps a moved entry in its folder's project when the folder changes project during the move", async () => {
    const [first, second] = [await createProject(ctx.app, alice.headers, 'First'), await createProject(ctx.app, alice.headers, 'Second')];
    const [from, to] = [await createFolder(ctx.app, alice.headers, { name: 'From', project_id: first.id }), await createFolder(ctx.app, alice.headers, { name: 'To', project_id: first.id })];
    const entry = await ingested(ctx.app, alice.headers, from.id, { filename: 'moving.md', content: MARKDOWN });
    const firstKey = xApiKey((await createKey(ctx.app, alice, { name: 'first', project_id: first.id })).key);
    const { blockedBy, waitingForLocks } = lockWaits(ctx);
    let moved!: Promise<LightMyRequestResponse>;
    let patched!: Promise<LightMyRequestResponse>;
    await ctx.database.withSession(async (side) => {
      await side.exec('begin');
      try {
        // Holds the move at its write to the entry.
        await side.query('select id from knowledge_entries where id = $1 for update', [entry.id]);
        const sidePid = await backendPid(side);
        moved = api('PUT', `/knowledge-base/entries/${entry.id}/move`, alice.headers, { folder_id: to.id });
        await eventually(async () => (await blockedBy(sidePid)) > 0);
        let patchDone = false;
        patched = api('PATCH', `/knowledge-base/folders/${to.id}`, alice.headers, { project_id: second.id }).finally(() => {
          patchDone = true;
        });
        // The change of project either commits now or waits for the move (two waiting then).
        await eventually(async () => patchDone || (await waitingForLocks()) >= 2);
      } finally {
        await side.exec('commit');
      }
    });
    expect((await moved).statusCode, (await moved).body).toBe(200);
    expect((await patched).statusCode, (await patched).body).toBe(200);
    const now = (await api('GET', `/knowledge-base/entries/${entry.id}`, alice.headers)).json<EntryBody>();
    expect(now).toMatchObject({ folder_id: to.id, project_id: second.id });
    expect((await api('GET', `/knowledge-base/entries/${entry.id}`, firstKey)).statusCode).toBe(404);
  });

  // The upload read its folder's project in a subquery that waits for nothing: a change of project
  // still moving the folder's entries (here held at one of them) did not see the new entry, which
  // kept the old project.
  it.skipIf(!process.env.DATABASE_URL)("keeps an uploaded entry in its folder's project when the folder changes project during the upload", async () => {
    const [first, second] = [await createProject(ctx.app, alice.headers, 'First'), await createProject(ctx.app, alice.headers, 'Second')];
    const folder = await createFolder(ctx.app, alice.headers, { name: 'Moving', project_id: first.id });
    const resident = await ingested(ctx.app, alice.headers, folder.id, { filename: 'resident.md', content: MARKDOWN });
    const firstKey = xApiKey((await createKey(ctx.app, alice, { name: 'first', project_id: first.id })).key);
    const { blockedBy, waitingForLocks } = lockWaits(ctx);
    let patched!: Promise<LightMyRequestResponse>;
    let uploading!: Promise<LightMyRequestResponse>;
    await ctx.database.withSession(async (side) => {
      await side.exec('begin');
      try {
        // Holds the change of project at the folder's entries, its folder row already changed.
        await side.query('select id from knowledge_entries where id = $1 for update', [resident.id]);
        const sidePid = await backendPid(side);
        patched = api('PATCH', `/knowledge-base/folders/${folder.id}`, alice.headers, { project_id: second.id });
        await eventually(async () => (await blockedBy(sidePid)) > 0);
        let uploadDone = false;
        uploading = upload(ctx.app, alice.headers, folder.id, { filename: 'arriving.md', content: MARKDOWN }).finally(() => {
          uploadDone = true;
        });
        // The upload either commits now or waits for the change of project (two waiting then).
        await eventually(async () => uploadDone || (await waitingForLocks()) >= 2);
      } finally {
        await side.exec('commit');
      }
    });
    expect((await patched).statusCode, (await patched).body).toBe(200);
    const arrived = await uploading;
    expect(arrived.statusCode, arrived.body).toBe(201);
    const entry = await settled(ctx.app, alice.headers, arrived.json<EntryBody>().id);
    expect(entry).toMatchObject({ folder_id: folder.id, project_id: second.id });
    expect((await api('GET', `/knowledge-base/entries/${entry.id}`, firstKey)).statusCode).toBe(404);
  });

  // An upload checks its folder at its start and writes its entry once the bytes have come: a key
  // scoped to the folder's project put its entry in the folder's new project, outside its own,
  // when the owner moved the folder to another project while the bytes arrived.
  it("refuses a scoped key's upload (404) whose folder moved to another project while its bytes arrived, keeping no file", async () => {
    const user = await createUser(ctx.app);
    const [first, second] = [await createProject(ctx.app, user.headers, 'First'), await createProject(ctx.app, user.headers, 'Second')];
    const folder = await createFolder(ctx.app, user.headers, { name: 'Moving', project_id: first.id });
    const firstKey = xApiKey((await createKey(ctx.app, user, { name: 'first', project_id: first.id })).key);
    const { body, contentType } = multipartBody([{ filename: 'arriving.md', content: MARKDOWN }]);
    const payload = new PassThrough();
    const uploading = ctx.app.inject({ method: 'POST', url: `/api/v1/knowledge-base/folders/${folder.id}/upload`, headers: { ...firstKey, 'content-type': contentType }, payload });
    payload.write(body.subarray(0, 200));
    // The upload has begun (its file recorded, to be stored) before the folder moves.
    const recorded = async () => (await ctx.app.db.select({ key: knowledgeFileDeletions.storage_key }).from(knowledgeFileDeletions)).filter((row) => row.key.includes(user.user.id));
    await eventually(async () => (await recorded()).length > 0);
    expect((await api('PATCH', `/knowledge-base/folders/${folder.id}`, user.headers, { project_id: second.id })).statusCode).toBe(200);
    payload.end(body.subarray(200));
    const refused = await uploading;
    expect(refused.statusCode, refused.body).toBe(404);
    expect(refused.json()).toEqual({ detail: 'Folder not found' });
    expect((await api('GET', `/knowledge-base/entries?folder_id=${folder.id}`, user.headers)).json<ListBody<EntryBody>>().count).toBe(0);
    await eventually(async () => storedFiles(user.user.id).length === 0 && (await recorded()).length === 0);
  });

  // The same for a move into a folder that left the key's project after the move checked it.
  it.skipIf(!process.env.DATABASE_URL)("refuses a scoped key's move (404) into a folder that moved to another project during the move", async () => {
    const [first, second] = [await createProject(ctx.app, alice.headers, 'First'), await createProject(ctx.app, alice.headers, 'Second')];
    const [from, to] = [await createFolder(ctx.app, alice.headers, { name: 'From', project_id: first.id }), await createFolder(ctx.app, alice.headers, { name: 'To', project_id: first.id })];
    const entry = await ingested(ctx.app, alice.headers, from.id, { filename: 'staying.md', content: MARKDOWN });
    const firstKey = xApiKey((await createKey(ctx.app, alice, { name: 'first', project_id: first.id })).key);
    const { blockedBy } = lockWaits(ctx);
    let moved!: Promise<LightMyRequestResponse>;
    await ctx.database.withSession(async (side) => {
      await side.exec('begin');
      try {
        // Holds the move at its read of the target folder's project, after its checks; the folder changes project meanwhile.
        await side.query('select id from knowledge_folders where id = $1 for update', [to.id]);
        const sidePid = await backendPid(side);
        moved = api('PUT', `/knowledge-base/entries/${entry.id}/move`, firstKey, { folder_id: to.id });
        await eventually(async () => (await blockedBy(sidePid)) > 0);
        await side.query('update knowledge_folders set project_id = $1 where id = $2', [second.id, to.id]);
      } finally {
        await side.exec('commit');
      }
    });
    expect((await moved).statusCode, (await moved).body).toBe(404);
    expect((await api('GET', `/knowledge-base/entries/${entry.id}`, firstKey)).json<EntryBody>()).toMatchObject({ folder_id: from.id, project_id: first.id });
  });

  it('answers another user\'s entry exactly as a missing one (404) on every route', async () => {
    const folder = await createFolder(ctx.app, alice.headers);
    const entry = await ingested(ctx.app, alice.headers, folder.id, { filename: 'private.txt', content: 'Private pangolin notes.' });
    const bobsFolder = await createFolder(ctx.app, bob.headers);
    const routes = [
      ['GET', ''],
      ['PATCH', '', { filename: 'mine.txt' }],
      ['GET', '/download'],
      ['GET', '/content'],
      ['PUT', '/move', { folder_id: bobsFolder.id }],
      ['POST', '/reindex'],
      ['DELETE', ''],
    ] as const;
    for (const [method, suffix, body] of routes) {
      const foreign = await api(method, `/knowledge-base/entries/${entry.id}${suffix}`, bob.headers, body);
      const missing = await api(method, `/knowledge-base/entries/${randomUUID()}${suffix}`, bob.headers, body);
      expect(foreign.statusCode, `${method} ${suffix}`).toBe(404);
      expect(foreign.body).toBe(missing.body);
      expect(foreign.json()).toEqual({ detail: 'Entry not found' });
      expect((await api(method, `/knowledge-base/entries/${entry.id}${suffix}`, {}, body)).statusCode).toBe(401);
    }
    expect((await api('GET', `/knowledge-base/entries/${entry.id}`, alice.headers)).json()).toMatchObject({ status: 'ready', filename: 'private.txt' });
  });

  it('deletes the stored file, its text and its chunks', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'gone.md', content: MARKDOWN });
    expect(storedFiles(user.user.id)).toHaveLength(2);
    expect((await api('DELETE', `/knowledge-base/entries/${entry.id}`, user.headers)).json()).toEqual({ message: 'Entry deleted successfully' });
    expect(storedFiles(user.user.id)).toEqual([]);
    expect(await ctx.database.db.select().from(knowledgeChunks).where(eq(knowledgeChunks.entry_id, entry.id))).toEqual([]);
    expect((await search(ctx.app, user.headers, { query: 'invoices' })).data).toEqual([]);
  });

  it('never lets an ingestion bring back the chunks (or the text) of an entry deleted meanwhile', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const text = Array.from({ length: 400 }, (_, i) => `Paragraph ${i} about capybaras and their habits.`).join('\n\n');
    const backend = ctx.app.storage(KNOWLEDGE_PREFIX).backend;
    const { open, put } = { open: backend.open.bind(backend), put: backend.put.bind(backend) };
    const ofUser = (key: string) => key.startsWith(`${KNOWLEDGE_PREFIX}/${user.user.id}/`);
    let uploading: Promise<EntryBody> | undefined;
    let deleted: Promise<number> | undefined;
    let textWritten: Promise<void> | undefined;
    const dropped = (entryId: string) => logs.lines().some((line) => line.entryId === entryId && line.msg === 'ingestion dropped: the entry was deleted or reindexed meanwhile');
    // The entry is deleted (through the API, its files purged) once its ingestion has claimed it
    // and opened the stored file, before it reads it: the job then cuts, stores and finishes an
    // entry that is gone, whatever the machine's load. (The upload opens no file: its job is the first.)
    backend.open = async (key, range) => {
      const opened = await open(key, range);
      if (ofUser(key)) {
        backend.open = open;
        deleted = uploading!.then(async (entry) => (await api('DELETE', `/knowledge-base/entries/${entry.id}`, user.headers)).statusCode);
        await deleted;
      }
      return opened;
    };
    // The extracted text lands only after the deletion's purge, as late as a busy event loop or a
    // slow disk may make it: still, it must not stay.
    backend.put = (key, body, mimeType) => {
      if (!ofUser(key) || !key.endsWith('.txt')) return put(key, body, mimeType);
      textWritten = deleted!.then(() => put(key, body, mimeType));
      return textWritten;
    };
    logs.clear();
    try {
      uploading = uploaded(ctx.app, user.headers, folder.id, { filename: 'long.txt', content: text });
      const entry = await uploading;
      await eventually(async () => deleted !== undefined);
      expect(await deleted).toBe(200);
      // The job's end: it found its claim gone, and removes the text written after the purge.
      await eventually(async () => dropped(entry.id));
      await textWritten;
      await eventually(async () => storedFiles(user.user.id).length === 0);
      expect(await ctx.database.db.select().from(knowledgeChunks).where(eq(knowledgeChunks.entry_id, entry.id))).toEqual([]);
      expect(logs.lines().filter((line) => line.entryId === entry.id && Number(line.level) >= LEVEL.warn)).toEqual([]);
    } finally {
      Object.assign(backend, { open, put });
    }
  });

  it('reindexes: 202 pending, then ready again with the same chunks', async () => {
    const folder = await createFolder(ctx.app, alice.headers);
    const entry = await ingested(ctx.app, alice.headers, folder.id, { filename: 'again.md', content: MARKDOWN });
    const response = await api('POST', `/knowledge-base/entries/${entry.id}/reindex`, alice.headers);
    expect(response.statusCode).toBe(202);
    expect(response.json<EntryBody>().status).toBe('pending');
    const done = await settled(ctx.app, alice.headers, entry.id);
    expect(done).toMatchObject({ status: 'ready', chunk_count: entry.chunk_count, token_count: entry.token_count });
  });

  it('lists the caller\'s entries, narrowed by folder and status', async () => {
    const user = await createUser(ctx.app);
    const a = await createFolder(ctx.app, user.headers);
    const b = await createFolder(ctx.app, user.headers);
    await ingested(ctx.app, user.headers, a.id, { filename: '1.txt', content: 'one' });
    await ingested(ctx.app, user.headers, b.id, { filename: '2.txt', content: 'two' });
    expect((await api('GET', `/knowledge-base/entries?folder_id=${a.id}`, user.headers)).json<ListBody<EntryBody>>().data.map((e) => e.filename)).toEqual(['1.txt']);
    expect((await api('GET', '/knowledge-base/entries?status=ready', user.headers)).json<ListBody<EntryBody>>().count).toBe(2);
    expect((await api('GET', '/knowledge-base/entries?status=failed', user.headers)).json<ListBody<EntryBody>>().count).toBe(0);
    expectValidationError(await api('GET', '/knowledge-base/entries?status=done', user.headers), ['query', 'status']);
    expect((await api('POST', '/knowledge-base/entries', user.headers, {})).statusCode).toBe(405);
  });
});

describe('ingestion', () => {
  it('splits Markdown by its headings and finds passages with their heading path', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'handbook.md', content: MARKDOWN });
    expect(entry).toMatchObject({ format: 'markdown', mime_type: 'text/markdown' });
    expect(entry.chunk_count).toBeGreaterThanOrEqual(2);
    const found = await search(ctx.app, user.headers, { query: 'refunds invoices' });
    expect(found.mode).toBe('full_text');
    expect(found.data[0]).toMatchObject({ entry_id: entry.id, filename: 'handbook.md', heading_path: ['Handbook', 'Billing'] });
    expect(found.data[0]!.text).toContain('Refunds take ten days');
    expect(found.data[0]!.score).toBeGreaterThan(0);
    const content = await api('GET', `/knowledge-base/entries/${entry.id}/content`, user.headers);
    expect(content.body).toContain('Passwords are hashed with Argon2id');
  });

  it('re-queues entries left pending or with a stale claim (a restart), and fails one that keeps dying', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const [left, stalled, dying] = await Promise.all(
      ['left.txt', 'stalled.txt', 'dying.txt'].map((filename) => ingested(ctx.app, user.headers, folder.id, { filename, content: `Wombat ${filename}` })),
    );
    const { db } = ctx.database;
    // As a process killed mid-ingestion leaves them: one never started, one claimed with a lease run out.
    await db.update(knowledgeEntries).set({ status: 'pending', updated_at: sql`now() - interval '1 hour'` }).where(eq(knowledgeEntries.id, left!.id));
    await db.update(knowledgeEntries).set({ status: 'processing', lease_token: randomUUID(), lease_expires_at: sql`now() - interval '1 second'` }).where(eq(knowledgeEntries.id, stalled!.id));
    await db
      .update(knowledgeEntries)
      .set({ status: 'processing', attempts: ctx.app.settings.KB_INGEST_MAX_ATTEMPTS, lease_token: randomUUID(), lease_expires_at: sql`now() - interval '1 second'` })
      .where(eq(knowledgeEntries.id, dying!.id));
    expect(await sweepIngestion(db, ctx.app.queue, SWEEP)).toBeGreaterThanOrEqual(3);
    expect(await settled(ctx.app, user.headers, left!.id)).toMatchObject({ status: 'ready' });
    expect(await settled(ctx.app, user.headers, stalled!.id)).toMatchObject({ status: 'ready' });
    const failed = await settled(ctx.app, user.headers, dying!.id);
    expect(failed.status).toBe('failed');
    expect(failed.error).toContain(`did not finish in ${ctx.app.settings.KB_INGEST_MAX_ATTEMPTS} attempts`);
    // A process starting up sweeps at once: an entry left pending with no job anywhere is picked up.
    await db.update(knowledgeEntries).set({ status: 'pending' }).where(eq(knowledgeEntries.id, stalled!.id));
    const restarted = await buildTestApp(ctx.database, { DATA_DIR: ctx.app.settings.DATA_DIR });
    try {
      // (Read through this file's app: the restarted one signs tokens with its own key.)
      expect(await settled(ctx.app, user.headers, stalled!.id)).toMatchObject({ status: 'ready' });
    } finally {
      await restarted.close();
    }
    // A claim still running is left alone.
    await db.update(knowledgeEntries).set({ status: 'processing', lease_token: randomUUID(), lease_expires_at: sql`now() + interval '1 hour'` }).where(eq(knowledgeEntries.id, left!.id));
    expect(await sweepIngestion(db, ctx.app.queue, SWEEP)).toBe(0);
  });
});

describe('formats', () => {
  const blocks = markdownBlocks('# Field guide\n\n## Herons\n\nGrey herons stand motionless in shallow water.\n\n## Kingfishers\n\nKingfishers dive from low branches.');


  it('ingests a PDF and a DOCX written by their libraries, and HTML, CSV and JSON, each found by search with its headings', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const files = [
      { filename: 'guide.pdf', content: await madeFile('guide.pdf', (path) => writePdf(path, blocks)), format: 'pdf', mime: 'application/pdf' },
      { filename: 'guide.docx', content: await madeFile('guide.docx', (path) => writeDocx(path, blocks)), format: 'docx', mime: 'application/vnd.openxmlformats-officedocument.wordprocessingml.document' },
      { filename: 'page.html', content: '<html><body><h1>Field guide</h1><h2>Herons</h2><p>Grey herons stand motionless in shallow water.</p></body></html>', format: 'html', mime: 'text/html' },
      { filename: 'birds.csv', content: 'bird,habit\nheron,stands motionless in shallow water\n', format: 'csv', mime: 'text/csv' },
      { filename: 'birds.json', content: JSON.stringify({ heron: { habit: 'stands motionless in shallow water' } }), format: 'json', mime: 'application/json' },
    ];
    for (const file of files) {
      const entry = await ingested(ctx.app, user.headers, folder.id, { filename: file.filename, content: file.content });
      expect(entry, file.filename).toMatchObject({ format: file.format, mime_type: file.mime });
      const hits = await search(ctx.app, user.headers, { query: 'motionless shallow', entry_ids: [entry.id] });
      expect(hits.data.length, file.filename).toBeGreaterThan(0);
      expect(hits.data[0]!.text.replace(/\s+/g, ' '), file.filename).toMatch(/motionless in shallow water/);
      if (['pdf', 'docx', 'html'].includes(file.format)) expect(hits.data[0]!.heading_path, file.filename).toEqual(['Field guide', 'Herons']);
    }
  });

  it("ingests UTF-16 text with its byte-order mark (Windows' \"Unicode\"), served as uploaded and its text as UTF-8", async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const text = 'Grey herons stand motionless in shallow water. Größe: 1 m 😀';
    const bytes = Buffer.concat([Buffer.from([0xff, 0xfe]), Buffer.from(text, 'utf16le')]);
    const entry = await ingested(ctx.app, user.headers, folder.id, { filename: 'herons.txt', content: bytes, type: 'text/plain' });
    expect(entry).toMatchObject({ format: 'text', mime_type: 'text/plain', size_bytes: bytes.length });
    expect((await api('GET', `/knowledge-base/entries/${entry.id}/content`, user.headers)).body).toBe(text);
    expect((await api('GET', `/knowledge-base/entries/${entry.id}/download`, user.headers)).rawPayload.equals(bytes)).toBe(true);
    const hits = await search(ctx.app, user.headers, { query: 'motionless shallow', entry_ids: [entry.id] });
    expect(hits.data.map((hit) => hit.text)).toEqual([text]);
  });

  it('fails an encrypted PDF with what to do, within the time limit', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const locked = await madeFile('locked.pdf', (path) => writePdf(path, blocks, { userPassword: 'secret' }));
    const entry = await settled(ctx.app, user.headers, (await uploaded(ctx.app, user.headers, folder.id, { filename: 'locked.pdf', content: locked })).id);
    expect(entry).toMatchObject({ status: 'failed', format: 'pdf' });
    expect(entry.error).toContain('password');
  });
});

/**
 * `statement`'s plan (EXPLAIN ANALYZE VERBOSE, no costs: each node's output too) and rows as PostgreSQL runs it from a generic plan:
 * prepared in a session with plan_cache_mode = force_generic_plan, its parameters as literals.
 */
async function underGenericPlan(statement: SQL): Promise<{ plan: string[]; rows: Record<string, unknown>[] }> {
  const { sql: text, params } = new PgDialect().sqlToQuery(statement);
  const literals = params.map((value) => (typeof value === 'number' ? String(value) : `'${String(value).replaceAll("'", "''")}'`)).join(', ');
  return ctx.database.withSession(async (session) => {
    let prepared = false;
    try {
      await session.exec('set plan_cache_mode = force_generic_plan');
      await session.exec(`prepare generic_search as ${text}`);
      prepared = true;
      const plan = await session.query<{ 'QUERY PLAN': string }>(`explain (analyze, verbose, costs off, timing off, summary off) execute generic_search(${literals})`);
      const rows = await session.query(`execute generic_search(${literals})`);
      return { plan: plan.map((row) => row['QUERY PLAN']), rows };
    } finally {
      // The session goes back to the pool as it came.
      await session.exec(`${prepared ? 'deallocate generic_search; ' : ''}reset plan_cache_mode`);
    }
  });
}

describe('search', () => {
  it('searches only the caller\'s documents, narrowed by folders and entries', async () => {
    const carol = await createUser(ctx.app);
    const dave = await createUser(ctx.app);
    const carols = await createFolder(ctx.app, carol.headers);
    const other = await createFolder(ctx.app, carol.headers, { name: 'Other' });
    const daves = await createFolder(ctx.app, dave.headers);
    const mine = await ingested(ctx.app, carol.headers, carols.id, { filename: 'okapi.txt', content: 'The okapi is a relative of the giraffe.' });
    const second = await ingested(ctx.app, carol.headers, other.id, { filename: 'okapi2.txt', content: 'Okapi stripes help calves follow their mothers.' });
    await ingested(ctx.app, dave.headers, daves.id, { filename: 'okapi.txt', content: 'Dave\'s okapi notes: the okapi eats leaves.' });
    const all = await search(ctx.app, carol.headers, { query: 'okapi' });
    expect(all.data.map((hit) => hit.entry_id).sort()).toEqual([mine.id, second.id].sort());
    expect((await search(ctx.app, carol.headers, { query: 'okapi', folder_ids: [other.id] })).data.map((h) => h.entry_id)).toEqual([second.id]);
    expect((await search(ctx.app, carol.headers, { query: 'okapi', entry_ids: [mine.id] })).data.map((h) => h.entry_id)).toEqual([mine.id]);
    // Another user's folder or entry named in the filters finds nothing of theirs.
    expect((await search(ctx.app, carol.headers, { query: 'okapi', folder_ids: [daves.id] })).data).toEqual([]);
    expect((await search(ctx.app, carol.headers, { query: 'okapi', folder_ids: [], entry_ids: [] })).data).toEqual([]);
    expect((await search(ctx.app, carol.headers, { query: 'okapi', top_k: 1 })).data).toHaveLength(1);
    expect((await search(ctx.app, carol.headers, { query: 'zzzunknownword' })).data).toEqual([]);
  });

  it('fills up with chunks holding only some of the words, ranked below those holding all, unless a word is excluded', async () => {
    const erin = await createUser(ctx.app);
    const frank = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, erin.headers);
    const both = await ingested(ctx.app, erin.headers, folder.id, { filename: 'both.txt', content: 'The quokka lives beside the wombat.' });
    const quokka = await ingested(ctx.app, erin.headers, folder.id, { filename: 'quokka.txt', content: 'A quokka smiles for photographs.' });
    const wombat = await ingested(ctx.app, erin.headers, folder.id, { filename: 'wombat.txt', content: 'Wombat droppings are cube shaped.' });
    await ingested(ctx.app, erin.headers, folder.id, { filename: 'other.txt', content: 'Koalas sleep most of the day.' });
    await ingested(ctx.app, frank.headers, (await createFolder(ctx.app, frank.headers)).id, { filename: 'franks.txt', content: 'Frank saw a quokka and a wombat.' });

    const found = (await search(ctx.app, erin.headers, { query: 'Where does the quokka live with a wombat?' })).data;
    expect(found[0]?.entry_id).toBe(both.id);
    expect(found.slice(1).map((hit) => hit.entry_id).sort()).toEqual([quokka.id, wombat.id].sort());
    // Scores keep the order: a partial match never outscores one holding every word.
    expect(found[1]!.score).toBeLessThan(found[0]!.score);
    expect(found[2]!.score).toBeLessThanOrEqual(found[1]!.score);
    expect((await search(ctx.app, erin.headers, { query: 'quokka wombat', top_k: 1 })).data.map((hit) => hit.entry_id)).toEqual([both.id]);
    // `-word` is honoured: no fallback brings back the excluded word.
    expect((await search(ctx.app, erin.headers, { query: 'quokka -wombat' })).data.map((hit) => hit.entry_id)).toEqual([quokka.id]);
    // Quotes, backslashes and tsquery syntax in the question are words, not operators.
    expect((await search(ctx.app, erin.headers, { query: "quokka's \\ o'wombat & | ! ( :* \"cube" })).data.length).toBeGreaterThan(0);
  });

  it('finds the chunk holding a question\'s rare word however many chunks hold its common one', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // 90 chunks holding "platypus" (more than search ranks at once; two files under the tests' size limit), and one holding "wombat".
    const filler = 'The river bank is muddy and the water runs cold over the stones. '.repeat(15);
    let chunks = 0;
    for (const part of [0, 1]) {
      const content = Array.from({ length: 45 }, (_, i) => `Platypus note ${part}-${i}. ${filler}`).join('\n\n');
      chunks += (await ingested(ctx.app, user.headers, folder.id, { filename: `platypus-${part}.txt`, content })).chunk_count;
    }
    expect(chunks).toBeGreaterThan(80);
    const rare = await ingested(ctx.app, user.headers, folder.id, { filename: 'wombat.txt', content: 'A wombat digs burrows at night.' });
    // No chunk holds both words: the OR fallback answers, and takes the rare word's chunks first.
    const found = (await search(ctx.app, user.headers, { query: 'Do platypus and wombat dig burrows?' })).data;
    expect(found.map((hit) => hit.entry_id)).toContain(rare.id);
  });

  it("takes the OR fallback's words among those a chunk in scope holds (nonsense words before them take none of its places), asked only when the fallback runs", async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const quetzal = await ingested(ctx.app, user.headers, folder.id, { filename: 'quetzal.txt', content: 'The quetzal nests in cloud forests.' });
    // Ten words no chunk holds, each before `quetzal` and `nest` in code-point order: the statistics
    // do not list them, so they count as rarest (ties in that order) and took all 8 places.
    const junk = Array.from({ length: 10 }, (_, i) => `aqz${i}x`);
    const question = `${junk.join(' ')} where does the quetzal nest?`;
    const db = ctx.database.db;
    const lexemes = await questionLexemes(db, 'english', question);
    expect(lexemes.slice(0, 8).map((lexeme) => lexeme.lexeme)).toEqual(junk.slice(0, 8));
    expect((await search(ctx.app, user.headers, { query: question })).data.map((hit) => hit.entry_id)).toEqual([quetzal.id]);
    // The asks are part of the search statement, run where the fallback runs only: not when the
    // AND part finds `limit` chunks, nor when the question excludes a word (no fallback then).
    const scope: Scope = { where: sql`knowledge_chunks.owner_id = ${user.user.id}`, readsEntries: false };
    const asked = async (text: string, limit: number) => {
      const plan = (await queryRows<{ 'QUERY PLAN': string }>(db, sql`explain (analyze, costs off, timing off, summary off) ${await fullTextStatement(db, 'english', text, scope, limit)}`)).map(
        (row) => row['QUERY PLAN'],
      );
      const held = plan.findIndex((line) => line.includes('CTE held'));
      expect(held, plan.join('\n')).toBeGreaterThanOrEqual(0);
      return !plan[held + 1]!.includes('never executed');
    };
    expect(await asked(question, 5)).toBe(true);
    expect(await asked(`${question} -newt`, 5)).toBe(false);
    await ingested(ctx.app, user.headers, folder.id, { filename: 'all.txt', content: `${junk.join(' ')} Where does the quetzal nest?` });
    expect(await asked(question, 1)).toBe(false);
    expect(await asked(question, 5)).toBe(true);
  });

  it('reads a question\'s first words only (MAX_QUESTION_WORDS distinct, MAX_QUESTION_WORD_TOKENS in all): a 2,000-character question still finds its passage', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const axolotl = await ingested(ctx.app, user.headers, folder.id, { filename: 'axolotl.txt', content: 'The axolotl regenerates its limbs within weeks.' });
    await ingested(ctx.app, user.headers, folder.id, { filename: 'newt.txt', content: 'A newt loses its tail to escape.' });
    // Words as PostgreSQL's parser splits lexemes: `_` and numbers that are not digits (`½`) split them.
    const words = (text: string) => text.match(/[\p{L}\p{M}\p{Nd}\p{Nl}]+/gu) ?? [];
    const question = 'How does the axolotl regenerate its limbs?';
    // Repeated words (the statement ANDed and ranked each one): its first 64 are read.
    const repeated = `${question} ${'axolotl limbs regenerate '.repeat(100)}`.slice(0, 2_000);
    expect((await search(ctx.app, user.headers, { query: repeated })).data[0]?.entry_id).toBe(axolotl.id);
    expect(words(boundedQuestion(repeated).start)).toHaveLength(MAX_QUESTION_WORD_TOKENS);
    // Hundreds of distinct words after it: its first 32 distinct words are read, the question whole.
    const hostile = `${question} ${Array.from({ length: 400 }, (_, i) => `zy${i.toString(36)}q`).join(' ')}`.slice(0, 2_000);
    const bounded = boundedQuestion(hostile).start;
    expect(bounded.startsWith(question)).toBe(true);
    expect(new Set(words(bounded)).size).toBe(MAX_QUESTION_WORDS);
    expect(new Set(words(boundedQuestion(hostile.toUpperCase()).start)).size).toBe(MAX_QUESTION_WORDS);
    const db = ctx.database.db;
    const { params } = new PgDialect().sqlToQuery(await fullTextStatement(db, 'english', hostile, { where: sql`knowledge_chunks.owner_id = ${user.user.id}`, readsEntries: false }, 5));
    expect(params).toContain(bounded);
    expect(params).not.toContain(hostile);
    expect((await questionLexemes(db, 'english', bounded)).length).toBeLessThanOrEqual(MAX_QUESTION_WORDS);
    // Without spaces (a comma between words): cut the same way.
    expect(new Set(words(boundedQuestion(words(hostile).join(',')).start))).toEqual(new Set(words(bounded)));
    // Joined by `_` or `½` (the parser splits lexemes there: `a_b_c` is a phrase of 3): cut the same
    // way, not one word read whole (340 lexemes searched as a phrase).
    for (const joiner of ['_', '½']) {
      const joined = `${question} ${words(hostile.slice(question.length)).join(joiner)}`;
      const cut = boundedQuestion(joined).start;
      expect(cut.length, joiner).toBeLessThan(joined.length);
      expect(new Set(words(cut)), joiner).toEqual(new Set(words(bounded)));
      expect((await questionLexemes(db, 'english', cut)).length, joiner).toBeLessThanOrEqual(MAX_QUESTION_WORDS);
    }
    // Digits of any script and letter numbers stay inside a word, as in a lexeme: 40 such words, 32 read.
    const kept = Array.from({ length: 40 }, (_, i) => `zy${i.toString(36)}٣q１Ⅻ`);
    expect(boundedQuestion(kept.join(' ')).start.trim().split(' ')).toEqual(kept.slice(0, MAX_QUESTION_WORDS));
    // A normal question, quotes and exclusions included, is whole.
    for (const normal of [question, '"regenerates its limbs" axolotl -newt', 'axolotl or newt']) expect(boundedQuestion(normal)).toEqual({ start: normal, exclusions: '' });
    expect((await search(ctx.app, user.headers, { query: 'axolotl or newt' })).data).toHaveLength(2);
  });

  it("honours a long question's exclusions past its cut (up to MAX_EXCLUDED_WORDS of their words), read apart from its start and ANDed onto it", async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const axolotl = await ingested(ctx.app, user.headers, folder.id, { filename: 'axolotl.txt', content: 'The axolotl regenerates its limbs within weeks.' });
    const newt = await ingested(ctx.app, user.headers, folder.id, { filename: 'newt.txt', content: 'Unlike the axolotl, a newt regenerates its limbs slowly.' });
    const found = async (query: string) => (await search(ctx.app, user.headers, { query })).data.map((hit) => hit.entry_id).sort();
    // 90 words, past the 64 read: the exclusion after them is still the user's word.
    const long = 'axolotl regenerates limbs '.repeat(30);
    expect(await found(long)).toEqual([axolotl.id, newt.id].sort());
    expect(await found(`${long} -newt`)).toEqual([axolotl.id]);
    expect(await found(`${long} -"newt regenerates"`)).toEqual([axolotl.id]);
    // As PostgreSQL reads the statement's query: its text, and the terms it excludes.
    const db = ctx.database.db;
    const reading = async (question: string) => {
      const [row] = await queryRows<{ query: string }>(db, sql`select ${questionQuery('english', boundedQuestion(question))}::text as query`);
      return row!.query;
    };
    const excluded = async (question: string) => (await reading(question)).match(/!\(?[^&|]+/g)?.map((term) => term.trim()) ?? [];
    expect(await excluded(`${long} -"newt regenerates"`)).toEqual(["!( 'newt' <-> 'regener' )"]);
    // The start ends in an `or` and what gives no lexeme (a stop word, a comma, a quote the cut falls
    // in), the cut right before zzz, the 33rd word: appended to that start as text, `-newt` was read
    // as `… | !'newt'`, every passage without newt.
    const words = (n: number) => Array.from({ length: n }, (_, i) => `w${i}a`).join(' ');
    for (const question of [`${words(30)} or the zzz -newt`, `${words(31)} or, zzz -newt`, `${words(31)} or "zzz yyy" -newt`]) {
      expect(boundedQuestion(question).exclusions, question).toBe('-newt');
      const query = await reading(question);
      expect(query, question).not.toContain('|');
      expect(query, question).toMatch(/^'w0a' & .* & !'newt'$/);
    }
    // The cut right after the `-` of an exclusion: taken whole.
    expect(boundedQuestion(`${words(32)} -newt`).exclusions).toBe('-newt');
    // Not an exclusion where PostgreSQL reads none (inside quotes, `--`: a double negation), nor
    // after an `or` (ORed), nor a form that is more than a NOT on its own (`-newt:ab` is
    // `!'newt' & 'ab'`, `-c|d` is `!'c' & 'd'`) or whose spaces depend on the server's locale
    // (an em space is one to PostgreSQL in C.UTF-8, none to PGlite).
    for (const none of [`${long} "x -newt"`, `${long} --newt`, `${long} or -newt`, `${long} or, -newt`, `${long} or "" -newt`, `${long} -newt:ab`, `${long} -newt|toad`, `${long} -newt\u2003or\u2003toad`]) {
      expect(boundedQuestion(none).exclusions, none).toBe('');
      expect(await excluded(none), none).toEqual([]);
    }
    // Exclusions that give no lexeme (stop words): `&&` with the empty tsquery is the start's query; the search runs as without them.
    expect(boundedQuestion(`${long} -the -"a an"`).exclusions).toBe('-the -"a an"');
    expect(await reading(`${long} -the -"a an"`)).toBe(await reading(long));
    expect(await found(`${long} -the -"a an"`)).toEqual([axolotl.id, newt.id].sort());
    // Bounded: MAX_EXCLUDED_WORDS words of exclusions at most; one that would pass the cap is left out, later ones still fit.
    const many = Array.from({ length: 20 }, (_, i) => `-zx${i.toString(36)}q`);
    expect(await excluded(`${long} ${many.join(' ')}`)).toHaveLength(MAX_EXCLUDED_WORDS);
    const phrase = Array.from({ length: MAX_EXCLUDED_WORDS + 1 }, (_, i) => `zx${i.toString(36)}q`).join('_');
    expect(boundedQuestion(`${long} -${phrase} -newt`).exclusions).toBe('-newt');
    // A question within the caps is read as it always was: the same SQL, the same parameters.
    const dialect = new PgDialect();
    for (const normal of ['"regenerates its limbs" axolotl -newt', `${words(20)} or, zzz -newt`]) {
      const { sql: text, params } = dialect.sqlToQuery(questionQuery('english', boundedQuestion(normal)));
      expect({ text, params }).toEqual({ text: 'websearch_to_tsquery($1::regconfig, $2)', params: ['english', normal] });
    }
  });

  it('drops from a long question\'s start a negated operand its cut falls in, rather than excluding a part of it (`-"newt regenerates` excluded every chunk holding newt)', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const axolotl = await ingested(ctx.app, user.headers, folder.id, { filename: 'axolotl.txt', content: 'The axolotl regenerates its limbs within weeks.' });
    const newt = await ingested(ctx.app, user.headers, folder.id, { filename: 'newt.txt', content: 'Unlike the axolotl, a newt regenerates its limbs slowly.' });
    const cousin = await ingested(ctx.app, user.headers, folder.id, { filename: 'cousin.txt', content: 'The axolotl regenerates limbs; the newt is its cousin.' });
    const found = async (query: string) => (await search(ctx.app, user.headers, { query })).data.map((hit) => hit.entry_id).sort();
    const db = ctx.database.db;
    const reading = async (question: string) => {
      const [row] = await queryRows<{ query: string }>(db, sql`select ${questionQuery('english', boundedQuestion(question))}::text as query`);
      return row!.query;
    };
    // 63 words: the 64th (newt) is read, the 65th (regenerates) is past the cut — inside the negated operand.
    const long = 'axolotl regenerates limbs '.repeat(21);
    // A quoted phrase: taken whole past the cut (`!( 'newt' <-> 'regener' )`), and not also as `!'newt'` from the start.
    const quoted = `${long}-"newt regenerates"`;
    expect(await found(quoted)).toEqual([axolotl.id, cousin.id].sort());
    expect(boundedQuestion(quoted)).toEqual({ start: long, exclusions: '-"newt regenerates"' });
    expect(await reading(quoted)).not.toContain("!'newt'");
    // A hyphenated word (`!( 'newt-regener' <-> 'newt' <-> 'regener' )`): the same.
    expect(boundedQuestion(`${long}-newt-regenerates`)).toEqual({ start: long, exclusions: '-newt-regenerates' });
    expect(await found(`${long}-newt-regenerates`)).toEqual([axolotl.id, newt.id, cousin.id].sort());
    // Forms past the cut keeps no exclusion of (a parenthesis, a NOT after an operator): dropped, searched as without them.
    for (const question of [`${long}-(newt-regenerates slowly)`, `${long}-("newt regenerates" slowly)`, `${long}&-"newt regenerates"`, `${long}--newt-regenerates`]) {
      expect(boundedQuestion(question).start, question).not.toContain('newt');
      expect(await reading(question), question).not.toContain('newt');
    }
    expect(await found(`${long}-(newt-regenerates slowly)`)).toEqual([axolotl.id, newt.id, cousin.id].sort());
    // A negation whose operand ends before the cut is the start's, as the user wrote it.
    expect(boundedQuestion(`${long}-newt regenerates`).start).toBe(`${long}-newt `);
    expect(await found(`${long}-newt regenerates`)).toEqual([axolotl.id]);
  });

  it("keeps a long question's OR fallback when its exclusions past the cut are NOTs only, and filters the fallback's hits by them", async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const axolotl = await ingested(ctx.app, user.headers, folder.id, { filename: 'axolotl.txt', content: 'The axolotl regenerates its limbs within weeks.' });
    const newt = await ingested(ctx.app, user.headers, folder.id, { filename: 'newt.txt', content: 'Unlike the axolotl, a newt regenerates its limbs slowly.' });
    const flagged = await ingested(ctx.app, user.headers, folder.id, { filename: 'flag.txt', content: 'Install it with npm install -g and watch the axolotl regenerate limbs.' });
    const found = async (query: string) => (await search(ctx.app, user.headers, { query })).data.map((hit) => hit.entry_id).sort();
    // 120 words, past the 64 read, whose AND part finds nothing (no chunk holds zqxv): only the fallback answers.
    const missed = 'axolotl regenerates limbs zqxv '.repeat(30);
    expect(await found(missed)).toEqual([axolotl.id, newt.id, flagged.id].sort());
    // A pasted command past the cut (`-g`, `-la`): the fallback still answers, without the chunks holding the excluded word.
    expect(await found(`${missed} then run npm install -g keel`)).toEqual([axolotl.id, newt.id].sort());
    expect(await found(`${missed} -newt`)).toEqual([axolotl.id, flagged.id].sort());
    // And in the AND part (a start every chunk matches) too.
    expect(await found(`${'axolotl regenerates limbs '.repeat(30)} -newt`)).toEqual([axolotl.id, flagged.id].sort());
    // Exclusions of stop words only: the fallback as without them.
    expect(await found(`${missed} -the`)).toEqual([axolotl.id, newt.id, flagged.id].sort());
    // A `-` in the start still turns the fallback off: an OR of lexemes cannot honour it.
    expect(await found(`-newt ${missed}`)).toEqual([]);
    // A start of stop words: nothing, not every chunk without the excluded word.
    expect(await found(`${'the '.repeat(70)} -newt`)).toEqual([]);
  });

  it("asks whether a chunk in scope holds a word through the GIN index while the index's pending list is long, not by a scan of every owner's chunks", async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const quetzal = await ingested(ctx.app, user.headers, folder.id, { filename: 'quetzal.txt', content: 'The quetzal nests in cloud forests.' });
    // Two other owners: the chunks are theirs and the user's in turn, as uploads at the same time
    // interleave them. Written as two runs of one owner's chunks each, the owner index's cost
    // turned on which of their random ids sorted first (the column's correlation with the rows'
    // order, +1 or -0.5): the asks took that index whatever their form, or scanned the table
    // whatever their form, so run alone the test failed half its runs (on PGlite and PostgreSQL
    // alike) and told the two forms apart in none.
    const entries = [quetzal.id];
    const owners = [user.user.id];
    for (let i = 0; i < 2; i++) {
      const other = await createUser(ctx.app);
      entries.push((await ingested(ctx.app, other.headers, (await createFolder(ctx.app, other.headers)).id, { filename: 'theirs.txt', content: 'Their note.' })).id);
      owners.push(other.user.id);
    }
    const db = ctx.database.db;
    // The i-th row's entry and owner: the user's, the others', in turn.
    const nth = (ids: string[]) => sql`(array[${sql.join(ids.map((id) => sql`${id}::uuid`), sql`, `)}])[i % ${ids.length}::int + 1]`;
    const write = (from: number, to: number) =>
      db.execute(sql`insert into knowledge_chunks (entry_id, owner_id, chunk_index, text, heading_path, token_count, tsv)
        select ${nth(entries)}, ${nth(owners)}, i, words.text, '{}', 80, to_tsvector('english', words.text) from generate_series(${from}::int, ${to}::int) as i,
          lateral (select string_agg('word' || ((i * 7919 + w * 104729) % 20000), ' ') as text from generate_series(1, 60) as w) as words`);
    // The pending list as this test writes it, on PostgreSQL as on PGlite: no autovacuum of the
    // table (PostgreSQL's, due after these inserts; PGlite has none) merges it into the index
    // before the plans are read — both forms then take the index, and the test guarded nothing.
    await db.execute(sql`alter table knowledge_chunks set (autovacuum_enabled = false)`);
    try {
      // 8,000 chunks in the index, then 1,000 written since its last clean-up: the pending list
      // holds them (under 4 MB, gin_pending_list_limit), which the index's look-ups read and the
      // planner counts. The sizes leave each plan below about twice as cheap as the next one (the
      // former ask's scan against the index, the asks' index against the scan), with the earlier
      // tests' chunks in the table or without them.
      await write(1, 8000);
      await db.execute(sql`select gin_clean_pending_list('ix_knowledge_chunks_tsv'::regclass)`);
      await write(8001, 9000);
      await db.execute(sql`analyze knowledge_chunks`);
      // What the fix is about holds here, on either database: an ask planned for its first row
      // (the former form, `limit 1`) scans the table, so the asks' plan below tells the forms apart.
      const firstRow = await queryRows<{ 'QUERY PLAN': string }>(
        db,
        sql`explain select id from knowledge_chunks where tsv @@ 'aqz0x'::tsquery and owner_id = ${user.user.id} limit 1`,
      );
      expect(firstRow.map((row) => row['QUERY PLAN']).join('\n')).toContain('Seq Scan on knowledge_chunks');
      // Ten words no chunk holds come first (rarest): the fallback asks about each.
      const question = `${Array.from({ length: 10 }, (_, i) => `aqz${i}x`).join(' ')} where does the quetzal nest?`;
      const statement = await fullTextStatement(db, 'english', question, { where: sql`knowledge_chunks.owner_id = ${user.user.id}`, readsEntries: false }, 5);
      const plan = (await queryRows<{ 'QUERY PLAN': string }>(db, sql`explain (analyze, costs off, timing off, summary off) ${statement}`)).map((row) => row['QUERY PLAN']);
      const asks = plan.slice(plan.findIndex((line) => line.includes('CTE held')), plan.findIndex((line) => line.includes('CTE and_hits'))).join('\n');
      expect(asks, plan.join('\n')).not.toContain('Seq Scan on knowledge_chunks');
      expect(asks).toContain('Index Scan');
      expect((await queryRows<{ entry_id: string }>(db, statement)).map((row) => row.entry_id)).toEqual([quetzal.id]);
    } finally {
      await db.execute(sql`alter table knowledge_chunks reset (autovacuum_enabled)`);
      // The 9,000 chunks go (the entries' own are at index 0), and the statistics with them, so
      // that later plan tests plan the table they wrote.
      await db.execute(sql`delete from knowledge_chunks where entry_id in (${sql.join(entries.map((id) => sql`${id}::uuid`), sql`, `)}) and chunk_index > 0`);
      await db.execute(sql`analyze knowledge_chunks`);
    }
  });

  it("looks up an owner's entries whose chunks search leaves out (failed ones, reindexes of failed ones) by the partial index, not by reading every entry the owner has", async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const db = ctx.database.db;
    // 3,000 entries, 10 of them with hidden chunks; the planner's statistics know them.
    await db.execute(sql`insert into knowledge_entries (owner_id, folder_id, filename, mime_type, size_bytes, sha256, storage_key, status, chunks_hidden)
      select ${user.user.id}, ${folder.id}, 'e' || i || '.txt', 'text/plain', 1, 'x', 'hidden-index-' || i,
        (case when i <= 10 then 'failed' else 'ready' end)::knowledge_entry_status, i <= 10 from generate_series(1, 3000) as i`);
    await db.execute(sql`analyze knowledge_entries`);
    // The look-up as search.ts's hiddenChunks writes it.
    const plan = await queryRows<{ 'QUERY PLAN': string }>(
      db,
      sql`explain select array(select hidden.id from knowledge_entries as hidden where hidden.owner_id = ${user.user.id} and hidden.chunks_hidden)`,
    );
    expect(plan.map((row) => row['QUERY PLAN']).join('\n')).toMatch(/Index (Only )?Scan using ix_knowledge_entries_owner_id_chunks_hidden/);
  });

  it('looks for the matches of a question of common words among the first rows in scope, and answers as the index does', async () => {
    const owner = await createUser(ctx.app);
    const other = await createUser(ctx.app);
    const filler = 'The river bank is muddy and the water runs cold over the stones. '.repeat(15);
    // Another user's chunks holding the same words come first in the table: the probe must pass them by.
    await ingested(ctx.app, other.headers, (await createFolder(ctx.app, other.headers)).id, { filename: 'theirs.txt', content: `Their note. ${filler}` });
    const folder = await createFolder(ctx.app, owner.headers);
    await ingested(ctx.app, owner.headers, folder.id, { filename: 'wombat-first.txt', content: 'A wombat swims across the muddy river.' });
    for (const part of [0, 1]) {
      const content = Array.from({ length: 45 }, (_, i) => `Platypus note ${part}-${i}. ${filler}`).join('\n\n');
      await ingested(ctx.app, owner.headers, folder.id, { filename: `platypus-${part}.txt`, content });
    }
    await ingested(ctx.app, owner.headers, folder.id, { filename: 'wombat.txt', content: 'A wombat swims in the muddy river water.' });
    const db = ctx.database.db;
    const [{ matches } = { matches: 0 }] = await queryRows<{ matches: number }>(
      db,
      sql`select count(*)::int as matches from knowledge_chunks where owner_id = ${owner.user.id} and tsv @@ websearch_to_tsquery('english', 'muddy river water')`,
    );
    // More matches than search ranks (60 for top 5): the probe finds all it wants among the first rows.
    expect(matches).toBeGreaterThan(60);
    const scopes: Scope[] = [
      { where: sql`knowledge_chunks.owner_id = ${owner.user.id}`, readsEntries: false },
      { where: sql`knowledge_chunks.owner_id = ${owner.user.id} and knowledge_entries.folder_id = ${folder.id}`, readsEntries: true },
    ];
    // The same lexemes, told rare (the GIN index answers) and common (the rows are probed first; for
    // the wombat, in the first chunk and the last, the probe falls short and the index answers after all).
    for (const scope of scopes) {
      for (const question of ['muddy river water', 'Does a wombat swim in the muddy river?']) {
        const lexemes = await questionLexemes(db, 'english', question);
        const answer = (frequency: number) => queryRows<{ id: string }>(db, fullTextQuery('english', { start: question, exclusions: '' }, lexemes.map((l) => ({ ...l, frequency })), scope, 5));
        const viaIndex = await answer(0);
        expect(viaIndex).toHaveLength(5);
        expect(await answer(0.5)).toEqual(viaIndex);
        // Under a generic plan (PGlite's cached statements from their sixth run), the same answer,
        // and the probe tests its rows against the question parsed once, not parsed again for each.
        const generic = await underGenericPlan(fullTextQuery('english', { start: question, exclusions: '' }, lexemes.map((l) => ({ ...l, frequency: 0.5 })), scope, 5));
        expect(generic.rows.map((row) => row.id)).toEqual(viaIndex.map((row) => row.id));
        const probeFilter = generic.plan.find((line) => line.includes('ts_match_vq(probe.tsv'));
        expect(probeFilter, generic.plan.join('\n')).toBeDefined();
        expect(probeFilter).not.toContain('to_tsquery');
        // So does the score of each candidate (the question and the OR of its lexemes).
        const score = generic.plan.find((line) => line.includes('ts_rank_cd('));
        expect(score, generic.plan.join('\n')).toBeDefined();
        expect(score).not.toMatch(/to_tsquery|::tsquery/);
      }
    }
  });

  it('limits a project-scoped key to its project\'s folders, entries and search', async () => {
    const user = await createUser(ctx.app);
    const project = await createProject(ctx.app, user.headers);
    const inside = await createFolder(ctx.app, user.headers, { name: 'In', project_id: project.id });
    const outside = await createFolder(ctx.app, user.headers, { name: 'Out' });
    const insideEntry = await ingested(ctx.app, user.headers, inside.id, { filename: 'in.txt', content: 'Narwhal tusks are teeth.' });
    const outsideEntry = await ingested(ctx.app, user.headers, outside.id, { filename: 'out.txt', content: 'Narwhal pods travel far.' });
    const key = xApiKey((await createKey(ctx.app, user, { name: 'scoped', project_id: project.id })).key);
    expect((await search(ctx.app, key, { query: 'narwhal' })).data.map((h) => h.entry_id)).toEqual([insideEntry.id]);
    expect((await api('GET', `/knowledge-base/entries/${outsideEntry.id}`, key)).statusCode).toBe(404);
    expect((await api('GET', `/knowledge-base/entries/${insideEntry.id}/content`, key)).statusCode).toBe(200);
    expect((await upload(ctx.app, key, outside.id, { filename: 'x.txt', content: 'x' })).statusCode).toBe(404);
    expect((await upload(ctx.app, key, inside.id, { filename: 'x.txt', content: 'x' })).statusCode).toBe(201);
    expect((await api('POST', '/knowledge-base/folders', key, { name: 'Elsewhere', project_id: null })).statusCode).toBe(403);
    const made = await api('POST', '/knowledge-base/folders', key, { name: 'Made by key' });
    expect(made.json()).toMatchObject({ project_id: project.id });
    // The project's entries and bytes; the quota is the account's, as the key's 413 would say.
    expect((await api('GET', '/knowledge-base/stats', key)).json()).toMatchObject({ folder_count: 2, entry_count: 2, size_bytes: 25, quota_bytes_used: 3 * 4096 });
  });

  it('gets the same answer for the same question: a sequential scan starts at the table\'s start, not where another one is', async () => {
    // Search ranks a capped set of the chunks that match; with synchronized scans (on by default,
    // for tables over a quarter of the buffers) which chunks made the set changed from one search
    // to the next. Every connection the app opens has them off.
    const shown = await Promise.all(Array.from({ length: 3 }, () => queryRows(ctx.database.db, sql`show synchronize_seqscans`)));
    expect(shown).toEqual(Array.from({ length: 3 }, () => [{ synchronize_seqscans: 'off' }]));
  });

  it('answers 422 for a bad search and 401 without credentials', async () => {
    expectValidationError(await api('POST', '/knowledge-base/search', alice.headers, { query: '' }), ['body', 'query']);
    expectValidationError(await api('POST', '/knowledge-base/search', alice.headers, { query: 'x', top_k: 0 }), ['body', 'top_k']);
    expectValidationError(await api('POST', '/knowledge-base/search', alice.headers, { query: 'x', folder_ids: ['nope'] }), ['body', 'folder_ids', '0']);
    expect((await api('POST', '/knowledge-base/search', {}, { query: 'x' })).statusCode).toBe(401);
    expect((await api('GET', '/knowledge-base/stats', {})).statusCode).toBe(401);
  });
});

it('leaves no shutdown listener behind an upload, stored or refused before its file was read', async () => {
  const listening = () => getEventListeners(ctx.app.closingSignal, 'abort').length;
  const user = await createUser(ctx.app);
  const folder = await createFolder(ctx.app, user.headers);
  const before = listening();
  // Refused at the name, before a byte of the file is read; then stored.
  for (let i = 0; i < 5; i++) expect((await upload(ctx.app, user.headers, folder.id, { filename: 'bad\u0000name.txt', content: 'text' })).statusCode).toBe(422);
  await uploaded(ctx.app, user.headers, folder.id, { filename: 'kept.txt', content: 'text' });
  expect(listening()).toBe(before);
});
