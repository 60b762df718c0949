import { existsSync, lstatSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import type { FastifyInstance } from 'fastify';
import S3rver from 's3rver';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { buildTestApp, openTestDatabase } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { call, eventually } from '../helpers/http.js';
import { createFolder, ingested, search, upload } from '../helpers/knowledge.js';
import { captureLogs } from '../helpers/logs.js';

const BUCKET = 'keel-kb-test';
const s3dir = mkdtempSync(join(tmpdir(), 'keel-kb-s3-'));
let s3: S3rver;
let app: FastifyInstance;
let destroy: () => Promise<void>;
let user: TestUser;
const SWEEP_FAILED = 'unfinished knowledge file writes could not be swept; will try again (not warned again until a sweep works)';
const logs = captureLogs('warn');

/** The objects s3rver holds under the user's part of the bucket (it keeps each as `<key>._S3rver_object`). */
function objectsOf(ownerId: string): string[] {
  const dir = join(s3dir, BUCKET, 'knowledge-base', ownerId);
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, encoding: 'utf8' }).filter((name) => !lstatSync(join(dir, name)).isDirectory() && name.endsWith('._S3rver_object'));
}

beforeAll(async () => {
  s3 = new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory: s3dir, configureBuckets: [{ name: BUCKET }] });
  const { port } = await s3.run();
  const opened = await openTestDatabase();
  destroy = opened.destroy;
  app = await buildTestApp(opened.database, {
    STORAGE_BACKEND: 's3',
    S3_BUCKET: BUCKET,
    S3_ENDPOINT: `http://127.0.0.1:${port}`,
    S3_ACCESS_KEY_ID: 'S3RVER',
    S3_SECRET_ACCESS_KEY: 'S3RVER',
    S3_FORCE_PATH_STYLE: 'true',
    KB_MAX_FILE_BYTES: '100000',
  }, { logger: logs.logger });
  user = await createUser(app);
});
afterAll(async () => {
  await app?.close();
  await destroy?.();
  await new Promise<void>((resolve) => s3.close(() => resolve()));
  rmSync(s3dir, { recursive: true, force: true });
});

describe('knowledge base on S3 storage', () => {
  it('goes on when the bucket cannot list unfinished multipart uploads (s3rver: NotImplemented): the sweep logs it', async () => {
    await eventually(async () => logs.lines().some((line) => line.msg === SWEEP_FAILED));
    const line = logs.lines().find((l) => l.msg === SWEEP_FAILED)!;
    expect(line.err).toMatchObject({ message: expect.stringMatching(/^File storage is unavailable.*not implemented/) as unknown });
    // Nothing else the sweep does, nor the app, stopped with it (the tests below).
    expect(logs.lines().filter((l) => l.msg === 'knowledge sweep failed; will try again')).toEqual([]);
  });

  it('uploads, ingests from a temporary copy, downloads, searches and deletes every object', async () => {
    const folder = await createFolder(app, user.headers);
    const text = '# Tides\n\nSpring tides follow the full and new moon.\n';
    const entry = await ingested(app, user.headers, folder.id, { filename: 'tides.md', content: text });
    // The file and its extracted text.
    expect(objectsOf(user.user.id)).toHaveLength(2);
    const download = await call(app, 'GET', `/knowledge-base/entries/${entry.id}/download`, user.headers);
    expect(download.statusCode).toBe(200);
    expect(download.body).toBe(text);
    expect(download.headers['content-type']).toBe('text/markdown');
    expect((await call(app, 'GET', `/knowledge-base/entries/${entry.id}/content`, user.headers)).body).toContain('Spring tides follow the full and new moon.');
    expect((await search(app, user.headers, { query: 'spring tides' })).data[0]).toMatchObject({ entry_id: entry.id, heading_path: ['Tides'] });
    expect((await call(app, 'DELETE', `/knowledge-base/entries/${entry.id}`, user.headers)).statusCode).toBe(200);
    expect(objectsOf(user.user.id)).toEqual([]);
  });

  it('refuses a file over the limit with 413 and leaves no object behind', async () => {
    const other = await createUser(app);
    const folder = await createFolder(app, other.headers);
    const response = await upload(app, other.headers, folder.id, { filename: 'big.txt', content: 'b'.repeat(100_001) });
    expect(response.statusCode).toBe(413);
    expect(objectsOf(other.user.id)).toEqual([]);
  });
});
