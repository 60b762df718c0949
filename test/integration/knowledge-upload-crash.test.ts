import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { type SQL, sql } from 'drizzle-orm';
import { afterAll, afterEach, describe, expect, it } from 'vitest';

import { loadSettings } from '../../src/core/config.js';
import { openDatabase } from '../../src/core/db.js';

import { eventually } from '../helpers/http.js';
import { storedFiles } from '../helpers/knowledge.js';
import { freePort, killLeftovers, migratedDataDir, startLocalKeel } from '../helpers/process.js';
import { json } from '../helpers/runs.js';

// The real CLI (`keel start`, embedded) killed with SIGKILL while an upload's file is in storage
// and its entry not yet written, then started again on the same data directory: the file is found
// and deleted, not left on disk for good.
const scratch = mkdtempSync(join(tmpdir(), 'keel-upload-crash-'));
const PASSWORD = 'upload-crash-password';
const PROCESS_TEST_TIMEOUT_MS = 120_000;
afterEach(killLeftovers);
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

const start = (dataDir: string, port: number) => startLocalKeel(dataDir, port, { FIRST_SUPERUSER: 'admin@upload-crash.test', FIRST_SUPERUSER_PASSWORD: PASSWORD });

/** Runs `statement` on the embedded database of `dataDir` (no process has it open). */
async function onDatabase<T>(dataDir: string, statement: SQL): Promise<T[]> {
  const database = await openDatabase(loadSettings({ ENVIRONMENT: 'local', SECRET_KEY: 'x'.repeat(40), PGLITE_DATA_DIR: join(dataDir, 'pglite') }));
  try {
    return ((await database.db.execute(statement)) as { rows: T[] }).rows;
  } finally {
    await database.close();
  }
}

/** A user with a folder on a started Keel, and how to begin an upload to it over a raw socket (its body never finished). */
async function userWithFolder(base: string, port: number) {
  expect((await json(base, 'POST', '/users/signup', {}, { email: 'u@upload-crash.test', password: PASSWORD })).status).toBe(200);
  const login = await fetch(`${base}/api/v1/login/access-token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ username: 'u@upload-crash.test', password: PASSWORD }),
  });
  const headers = { authorization: `Bearer ${((await login.json()) as { access_token: string }).access_token}` };
  const me = await json<{ id: string }>(base, 'GET', '/users/me', headers);
  const folder = await json<{ id: string }>(base, 'POST', '/knowledge-base/folders', headers, { name: 'Docs' });
  expect(folder.status).toBe(200);
  const boundary = '----keelcrash';
  /** Sends the request's head and, as one chunk, `body`: the rest never comes. */
  const uploadBegun = (body: string) => {
    const head =
      `POST /api/v1/knowledge-base/folders/${folder.body.id}/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: ${headers.authorization}\r\n` +
      `Content-Type: multipart/form-data; boundary=${boundary}\r\nTransfer-Encoding: chunked\r\n\r\n`;
    const socket = connect(port, '127.0.0.1');
    socket.on('error', () => {});
    socket.write(head + `${Buffer.byteLength(body).toString(16)}\r\n${body}\r\n`);
    return socket;
  };
  const filePartHead = `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n`;
  return { headers, me, folder, boundary, uploadBegun, filePartHead };
}

describe('an upload whose process is killed after its file is stored', () => {
  it('leaves no file for good: the next start deletes it once the upload cannot be running', { timeout: PROCESS_TEST_TIMEOUT_MS }, async () => {
    const dataDir = await migratedDataDir(join(scratch, 'kill'));
    const port = await freePort();
    const first = await start(dataDir, port);
    const { headers, me, folder, boundary, uploadBegun, filePartHead } = await userWithFolder(first.base, port);

    // The file part whole, then the form left open: the server stores the file and waits for the
    // rest of the form (another part may be a second file) before it writes the entry.
    const socket = uploadBegun(`${filePartHead}${'Orphans must not stay. '.repeat(100)}\r\n--${boundary}\r\n`);
    await eventually(async () => storedFiles(dataDir, me.body.id).length === 1, 15_000);

    first.child.process.kill('SIGKILL');
    await first.child.ended;
    socket.destroy();
    // The key was recorded before the file was stored, due only once the upload cannot be running
    // (a live process's upload keeps its file); the clock moved on past that (the row aged).
    const [recorded] = await onDatabase<{ storage_key: string; in_grace: boolean }>(
      dataDir,
      sql`with aged as (select id, storage_key, not_before > now() as in_grace from knowledge_file_deletions), done as (update knowledge_file_deletions set not_before = now() - interval '1 second') select storage_key, in_grace from aged`,
    );
    const [file] = storedFiles(dataDir, me.body.id);
    expect(recorded).toEqual({ storage_key: `knowledge-base/${me.body.id}/${folder.body.id}/${file!.split('/').pop()}`, in_grace: true });

    // The next start's sweep deletes it.
    const third = await start(dataDir, port);
    await eventually(async () => storedFiles(dataDir, me.body.id).length === 0, 15_000);
    // And no entry was ever written.
    const listed = await json<{ data: unknown[] }>(third.base, 'GET', `/knowledge-base/entries?folder_id=${folder.body.id}`, headers);
    expect(listed.body.data).toEqual([]);
  });
});

describe('an upload whose process is killed while its file is still arriving', () => {
  it('leaves no temporary file for the 24 h sweep: the next start removes it, its process being gone', { timeout: PROCESS_TEST_TIMEOUT_MS }, async () => {
    const dataDir = await migratedDataDir(join(scratch, 'kill-mid-file'));
    const temporary = join(dataDir, 'storage', '.tmp');
    const port = await freePort();
    const first = await start(dataDir, port);
    const { me, uploadBegun, filePartHead } = await userWithFolder(first.base, port);

    // Part of the file, and no more (a slow client): it is being written to a temporary file.
    const socket = uploadBegun(`${filePartHead}${'Half a file. '.repeat(100)}`);
    await eventually(async () => existsSync(temporary) && readdirSync(temporary).length === 1, 15_000);
    // What a hard kill at the shutdown deadline does.
    first.child.process.kill('SIGKILL');
    await first.child.ended;
    socket.destroy();
    expect(readdirSync(temporary)).toHaveLength(1);
    expect(storedFiles(dataDir, me.body.id)).toEqual([]);

    const second = await start(dataDir, port);
    await eventually(async () => readdirSync(temporary).length === 0, 15_000);
    // The new process serves as usual.
    expect((await fetch(`${second.base}/ready`)).status).toBe(200);
  });
});
