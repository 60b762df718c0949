/**
 * SIGTERM while slow clients' request bodies are still arriving (`keel start`, embedded).
 *
 * A knowledge upload: the
 * upload is ended at once — the client answered 503 — its file removed
 * (the temporary one mid-file, the stored one once the file is in and the form still open), and
 * the process exits 0 well within SHUTDOWN_TIMEOUT_MS. It waited for HTTP_REQUEST_TIMEOUT_MS, was
 * cut off at the shutdown deadline with exit 1, and left the temporary file for 24 h.
 *
 * Any other body (JSON): its connection is closed shortly before the deadline (nothing of the
 * request has run but the reading of its body), where it held the close up to the deadline's exit 1.
 */
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, afterEach, expect, it } from 'vitest';

import { eventually } from '../helpers/http.js';
import { storedFiles } from '../helpers/knowledge.js';
import { freePort, killLeftovers, migratedDataDir, startLocalKeel } from '../helpers/process.js';
import { json } from '../helpers/runs.js';

const scratch = mkdtempSync(join(tmpdir(), 'keel-shutdown-upload-'));
const PASSWORD = 'shutdown-upload-password';
const SHUTDOWN_TIMEOUT_MS = 6_000;
afterEach(killLeftovers);
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

const temporaryFiles = (dataDir: string) => (existsSync(join(dataDir, 'storage', '.tmp')) ? readdirSync(join(dataDir, 'storage', '.tmp')) : []);
const chunk = (text: string) => `${Buffer.byteLength(text).toString(16)}\r\n${text}\r\n`;

it.each([
  ['mid-file (the file trickling in)', 'trickle'],
  ['after the file, the form still open', 'form-open'],
] as const)('SIGTERM during an upload %s: 503, no file left, exit 0 at once', { timeout: 120_000 }, async (_label, stage) => {
  const dataDir = await migratedDataDir(join(scratch, stage));
  const port = await freePort();
  // The request timeout far past the shutdown deadline: only the shutdown can end the upload in time.
  const { child, base } = await startLocalKeel(dataDir, port, {
    FIRST_SUPERUSER: 'admin@shutdown-upload.test',
    FIRST_SUPERUSER_PASSWORD: PASSWORD,
    HTTP_REQUEST_TIMEOUT_MS: '300000',
    SHUTDOWN_TIMEOUT_MS: String(SHUTDOWN_TIMEOUT_MS),
  });
  expect((await json(base, 'POST', '/users/signup', {}, { email: 'u@shutdown-upload.test', password: PASSWORD })).status).toBe(200);
  const login = await fetch(`${base}/api/v1/login/access-token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ username: 'u@shutdown-upload.test', password: PASSWORD }),
  });
  const authorization = `Bearer ${((await login.json()) as { access_token: string }).access_token}`;
  const me = await json<{ id: string }>(base, 'GET', '/users/me', { authorization });
  const folder = await json<{ id: string }>(base, 'POST', '/knowledge-base/folders', { authorization }, { name: 'Docs' });

  const boundary = '----keelshutdown';
  const socket: Socket = connect(port, '127.0.0.1');
  let answer = '';
  socket.on('data', (data: Buffer) => (answer += data.toString('utf8')));
  socket.on('error', () => {});
  const closed = new Promise<void>((done) => socket.once('close', () => done()));
  socket.write(
    `POST /api/v1/knowledge-base/folders/${folder.body.id}/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: ${authorization}\r\n` +
      `Content-Type: multipart/form-data; boundary=${boundary}\r\nTransfer-Encoding: chunked\r\n\r\n`,
  );
  socket.write(chunk(`--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n${'Slowly, slowly. '.repeat(600)}`));
  let trickle: NodeJS.Timeout | undefined;
  if (stage === 'trickle') {
    // A few bytes every 100 ms, never the end of the part: the file is being written to its temporary file.
    trickle = setInterval(() => socket.writable && socket.write(chunk('more text ')), 100);
    await eventually(async () => temporaryFiles(dataDir).length === 1, 15_000);
  } else {
    // The file part whole, then nothing: the file is stored and the server waits for the rest of the form.
    socket.write(chunk(`\r\n--${boundary}\r\n`));
    await eventually(async () => storedFiles(dataDir, me.body.id).length === 1, 15_000);
  }

  const signalled = Date.now();
  child.process.kill('SIGTERM');
  const { code } = await child.ended;
  const took = Date.now() - signalled;
  clearInterval(trickle);
  await Promise.race([closed, new Promise((done) => setTimeout(done, 2_000))]);
  socket.destroy();

  expect({ code, quick: took < SHUTDOWN_TIMEOUT_MS - 1_000 }, `${took} ms\n${child.out()}\n${child.err()}`).toEqual({ code: 0, quick: true });
  // The client, still connected, is told why.
  expect(answer).toMatch(/^HTTP\/1\.1 503 [^]*"detail":"The server is shutting down"/);
  expect(temporaryFiles(dataDir)).toEqual([]);
  expect(storedFiles(dataDir, me.body.id)).toEqual([]);
});

it('SIGTERM while a JSON body trickles in: its connection is closed before the deadline, exit 0', { timeout: 120_000 }, async () => {
  const dataDir = await migratedDataDir(join(scratch, 'json'));
  const port = await freePort();
  const { child } = await startLocalKeel(dataDir, port, { HTTP_REQUEST_TIMEOUT_MS: '300000', SHUTDOWN_TIMEOUT_MS: String(SHUTDOWN_TIMEOUT_MS) });
  const socket: Socket = connect(port, '127.0.0.1');
  socket.on('error', () => {});
  const closed = new Promise<number>((done) => socket.once('close', () => done(Date.now())));
  socket.write('POST /api/v1/login/access-token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"username":');
  const trickle = setInterval(() => socket.writable && socket.write(' '), 100);
  await new Promise((done) => setTimeout(done, 500));

  const signalled = Date.now();
  child.process.kill('SIGTERM');
  const { code } = await child.ended;
  const exited = Date.now();
  clearInterval(trickle);
  socket.destroy();
  // Cut 2 s before the deadline: nothing of the request had run but the reading of its body.
  expect({ code, beforeDeadline: exited - signalled < SHUTDOWN_TIMEOUT_MS }, `${exited - signalled} ms\n${child.out()}\n${child.err()}`).toEqual({ code: 0, beforeDeadline: true });
  expect((await closed) - signalled).toBeLessThan(SHUTDOWN_TIMEOUT_MS);
});
