import { execFile, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { promisify } from 'node:util';

import S3rver from 's3rver';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ConfigError, type Settings } from '../../src/core/config.js';

import { S3StorageBackend } from '../../src/services/storage/s3.js';
import {
  closeStorage,
  getStorageService,
  StorageConflictError,
  StorageNotFoundError,
  StoragePathError,
  StorageRangeError,
  type StorageService,
  StorageTooLargeError,
  StorageUnavailableError,
} from '../../src/services/storage-service.js';
import { StorageService as Service } from '../../src/services/storage-service.js';
import { testSettings, useTestApp } from '../helpers/app.js';
import { eventually } from '../helpers/http.js';
import { ROOT } from '../helpers/process.js';
import { SilentProxy } from '../helpers/silent-proxy.js';
import { BAD_PARTS } from '../helpers/storage.js';

const temporary: string[] = [];
function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'keel-storage-test-'));
  temporary.push(dir);
  return dir;
}

/** A stream of `total` pseudo-random bytes in 64 KiB chunks, and their SHA-256. */
function bigStream(total: number): { stream: Readable; sha256: string } {
  const block = randomBytes(64 * 1024);
  const hash = createHash('sha256');
  const chunks: Buffer[] = [];
  for (let sent = 0; sent < total; sent += block.length) chunks.push(block.subarray(0, Math.min(block.length, total - sent)));
  for (const chunk of chunks) hash.update(chunk);
  return { stream: Readable.from(chunks), sha256: hash.digest('hex') };
}

/** A stream that sends `before` bytes and then fails. */
function failingStream(before: number): Readable {
  return Readable.from(
    (async function* () {
      yield randomBytes(before);
      await new Promise((resolve) => setTimeout(resolve, 5));
      throw new Error('client went away');
    })(),
  );
}

/** Every file under `dir`, at any depth (none when it does not exist yet). */
function filesUnder(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, encoding: 'utf8' }).filter((name) => !lstatSync(join(dir, name)).isDirectory()).sort();
}

async function text(stream: Readable): Promise<string> {
  const parts: Buffer[] = [];
  for await (const chunk of stream) parts.push(Buffer.from(chunk as Uint8Array));
  return Buffer.concat(parts).toString();
}

interface Backend {
  name: string;
  open(): Promise<{ storage: StorageService; other: StorageService; leftovers: () => Promise<string[]> }>;
  close(): Promise<void>;
}

const s3rverDir = tempDir();
let s3server: S3rver | undefined;
let s3endpoint = '';
const s3requests: string[] = [];
let s3settings: Settings | undefined;
let s3backend: S3StorageBackend | undefined;
const BUCKET = 'keel-test';

const s3Settings = () =>
  testSettings({
    STORAGE_BACKEND: 's3',
    S3_BUCKET: BUCKET,
    S3_ENDPOINT: s3endpoint,
    S3_REGION: 'us-east-1',
    S3_ACCESS_KEY_ID: 'S3RVER',
    S3_SECRET_ACCESS_KEY: 'S3RVER',
    S3_FORCE_PATH_STYLE: 'true',
  });

const backends: Backend[] = [
  {
    name: 'local',
    async open() {
      const dataDir = tempDir();
      const settings = testSettings({ DATA_DIR: dataDir, STORAGE_BACKEND: 'local' });
      const storage = getStorageService(settings, { prefix: 'knowledge-base' });
      return {
        storage,
        other: getStorageService(settings, { prefix: 'other' }),
        // Files left anywhere under DATA_DIR/storage, temporary files included.
        leftovers: async () => filesUnder(join(dataDir, 'storage')),
      };
    },
    async close() {},
  },
  {
    name: 's3',
    async open() {
      if (!s3server) {
        s3server = new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory: s3rverDir, configureBuckets: [{ name: BUCKET }] });
        const address = await s3server.run();
        s3endpoint = `http://127.0.0.1:${address.port}`;
        s3server.httpServer.on('request', (request: IncomingMessage) => s3requests.push(`${request.method} ${request.url}`));
      }
      s3settings = s3Settings();
      // Parts of 5 MiB (S3's minimum) so the 20 MB file goes up in four.
      s3backend = new S3StorageBackend({
        bucket: BUCKET,
        region: 'us-east-1',
        endpoint: s3endpoint,
        accessKeyId: 'S3RVER',
        secretAccessKey: 'S3RVER',
        forcePathStyle: true,
        partSize: 5 * 1024 * 1024,
        timeoutMs: 60_000,
      });
      return {
        storage: new Service(s3backend, 'knowledge-base'),
        // Made by the factory from STORAGE_BACKEND=s3 and the S3_* settings.
        other: getStorageService(s3settings, { prefix: 'other' }),
        // The objects s3rver keeps for the bucket. Not the parts of unfinished multipart uploads:
        // s3rver 3.7.1 has no AbortMultipartUpload (405), so the test checks that the abort was sent.
        leftovers: async () => filesUnder(join(s3rverDir, BUCKET)).filter((name) => !name.startsWith('._S3rver_uploads')),
      };
    },
    async close() {
      await s3backend?.close();
      if (s3settings) await closeStorage(s3settings);
      await new Promise((resolve) => s3server?.close(resolve));
    },
  },
];

afterAll(() => {
  for (const dir of temporary) rmSync(dir, { recursive: true, force: true });
});

describe.each(backends)('storage service on $name', (backend) => {
  let storage: StorageService;
  let other: StorageService;
  let leftovers: () => Promise<string[]>;

  beforeAll(async () => {
    ({ storage, other, leftovers } = await backend.open());
  });
  afterAll(() => backend.close());

  it('saves a stream and answers its key, size and SHA-256; reads it back', async () => {
    const body = 'hello, storage\n';
    const saved = await storage.saveFile(Readable.from([Buffer.from('hello, '), Buffer.from('storage\n')]), 'hello.txt', 'text/plain', ['user-1', 'docs']);
    expect(saved).toEqual({ key: 'knowledge-base/user-1/docs/hello.txt', size: body.length, sha256: createHash('sha256').update(body).digest('hex') });
    expect((await storage.readFile(saved.key)).toString()).toBe(body);
    expect(await storage.exists(saved.key)).toBe(true);
    expect(await storage.size(saved.key)).toBe(body.length);
  });

  it.runIf(backend.name === 's3')('keeps the MIME type as the object\'s Content-Type on S3', async () => {
    const { key } = await storage.saveFile('{}', 'data.json', 'application/json', ['types']);
    const { S3Client, HeadObjectCommand } = await import('@aws-sdk/client-s3');
    const client = new S3Client({ region: 'us-east-1', endpoint: s3endpoint, forcePathStyle: true, credentials: { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' } });
    try {
      expect((await client.send(new HeadObjectCommand({ Bucket: BUCKET, Key: key }))).ContentType).toBe('application/json');
    } finally {
      client.destroy();
    }
  });

  it('saves a Buffer and a string, replacing what was there', async () => {
    const first = await storage.saveFile(Buffer.from('first'), 'replace.txt');
    const second = await storage.saveFile('second!', 'replace.txt');
    expect(second.key).toBe(first.key);
    expect((await storage.readFile(first.key)).toString()).toBe('second!');
  });

  it('stores and reads an empty file', async () => {
    const saved = await storage.saveFile(Buffer.alloc(0), 'empty.txt', undefined, ['e']);
    expect(saved.size).toBe(0);
    expect((await storage.readFile(saved.key)).length).toBe(0);
    await expect(storage.stream(saved.key, { start: 0 })).rejects.toBeInstanceOf(StorageRangeError);
  });

  it('streams byte ranges (inclusive ends, as in HTTP) and refuses ranges outside the file', async () => {
    const { key } = await storage.saveFile('0123456789', 'digits.txt', 'text/plain', ['ranges']);
    const whole = await storage.stream(key);
    expect([whole.size, whole.start, whole.end]).toEqual([10, 0, 9]);
    expect(await text(whole.body)).toBe('0123456789');
    const middle = await storage.stream(key, { start: 2, end: 5 });
    expect([middle.size, middle.start, middle.end]).toEqual([10, 2, 5]);
    expect(await text(middle.body)).toBe('2345');
    expect(await text((await storage.stream(key, { start: 7 })).body)).toBe('789');
    expect(await text((await storage.stream(key, { start: 8, end: 1000 })).body)).toBe('89');
    expect(await text((await storage.stream(key, { end: 0 })).body)).toBe('0');
    for (const range of [{ start: 10 }, { start: 5, end: 4 }, { start: -1 }, { start: 1.5 }]) {
      const refused = await storage.stream(key, range).catch((error: unknown) => error);
      expect(refused, JSON.stringify(range)).toBeInstanceOf(StorageRangeError);
      expect((refused as StorageRangeError).headers['content-range']).toBe('bytes */10');
    }
  });

  it('answers StorageNotFoundError for a missing file, and false from exists/deleteFile', async () => {
    const key = 'knowledge-base/nobody/none.txt';
    expect(await storage.exists(key)).toBe(false);
    expect(await storage.size(key)).toBeNull();
    await expect(storage.readFile(key)).rejects.toBeInstanceOf(StorageNotFoundError);
    await expect(storage.stream(key, { start: 0, end: 1 })).rejects.toBeInstanceOf(StorageNotFoundError);
    expect(await storage.deleteFile(key)).toBe(false);
    await expect(storage.moveFile(key, 'x.txt')).rejects.toBeInstanceOf(StorageNotFoundError);
  });

  it('moves a file, refusing to overwrite one at the destination', async () => {
    const { key } = await storage.saveFile('move me', 'a.txt', 'text/plain', ['move', 'from']);
    const moved = await storage.moveFile(key, 'b.txt', ['move', 'to']);
    expect(moved).toBe('knowledge-base/move/to/b.txt');
    expect(await storage.exists(key)).toBe(false);
    expect((await storage.readFile(moved)).toString()).toBe('move me');

    const { key: blocker } = await storage.saveFile('in the way', 'c.txt', undefined, ['move']);
    const { key: mover } = await storage.saveFile('mover', 'd.txt', undefined, ['move']);
    await expect(storage.moveFile(mover, 'c.txt', ['move'])).rejects.toBeInstanceOf(StorageConflictError);
    expect((await storage.readFile(blocker)).toString()).toBe('in the way');
    expect((await storage.readFile(mover)).toString()).toBe('mover');
  });

  it('deletes a file', async () => {
    const { key } = await storage.saveFile('bye', 'gone.txt', undefined, ['del', 'deep']);
    expect(await storage.deleteFile(key)).toBe(true);
    expect(await storage.exists(key)).toBe(false);
    await expect(storage.readFile(key)).rejects.toBeInstanceOf(StorageNotFoundError);
    expect(await storage.deleteFile(key)).toBe(false);
  });

  it('streams a 20 MB file in and out without holding it, hash intact (multipart on S3)', async () => {
    const size = 20 * 1024 * 1024;
    const { stream, sha256 } = bigStream(size);
    const saved = await storage.saveFile(stream, 'big.bin', 'application/octet-stream', ['big']);
    expect(saved).toMatchObject({ size, sha256 });
    const read = await storage.stream(saved.key);
    const hash = createHash('sha256');
    let count = 0;
    let last = Buffer.alloc(0);
    for await (const chunk of read.body) {
      hash.update(chunk as Uint8Array);
      count += (chunk as Uint8Array).length;
      last = Buffer.from(chunk as Uint8Array);
    }
    expect(count).toBe(size);
    expect(hash.digest('hex')).toBe(sha256);
    if (backend.name === 's3') {
      // Sent as a multipart upload of four 5 MiB parts, not one PUT of the whole.
      const parts = s3requests.filter((r) => r.startsWith('PUT /keel-test/knowledge-base/big/big.bin?') && r.includes('partNumber='));
      expect(parts).toHaveLength(4);
    }
    const tail = await storage.stream(saved.key, { start: size - 3 });
    expect(Buffer.concat(await tail.body.toArray()).equals(last.subarray(last.length - 3))).toBe(true);
    expect(await storage.deleteFile(saved.key)).toBe(true);
  });

  it('leaves nothing behind when the stream fails midway (small, and past a multipart part)', async () => {
    const before = await leftovers();
    await expect(storage.saveFile(failingStream(1000), 'broken.bin', undefined, ['fail'])).rejects.toThrow('client went away');
    const big = Readable.from(
      (async function* () {
        yield* bigStream(12 * 1024 * 1024).stream;
        throw new Error('client went away late');
      })(),
    );
    await expect(storage.saveFile(big, 'broken-big.bin', undefined, ['fail'])).rejects.toThrow('client went away late');
    if (backend.name === 's3') {
      // The multipart upload begun for the big file was aborted (so S3 drops its parts).
      const begun = s3requests.filter((r) => r.startsWith('POST /keel-test/knowledge-base/fail/broken-big.bin?uploads'));
      const aborted = s3requests.filter((r) => /^DELETE \/keel-test\/knowledge-base\/fail\/broken-big\.bin\?.*uploadId=/.test(r));
      expect([begun.length, aborted.length]).toEqual([1, 1]);
    }
    // A client that goes away: the stream is destroyed without an error.
    const aborted = new PassThrough();
    aborted.write(randomBytes(70_000));
    setTimeout(() => aborted.destroy(), 20);
    await expect(storage.saveFile(aborted, 'aborted.bin', undefined, ['fail'])).rejects.toThrow(/premature close/i);
    expect(await storage.exists('knowledge-base/fail/aborted.bin')).toBe(false);
    expect(await storage.exists('knowledge-base/fail/broken.bin')).toBe(false);
    expect(await storage.exists('knowledge-base/fail/broken-big.bin')).toBe(false);
    expect(await leftovers()).toEqual(before);
  });

  it('abandons a write past maxBytes with StorageTooLargeError (413) and stores nothing', async () => {
    const error = await storage.saveFile(bigStream(300_000).stream, 'huge.bin', undefined, ['limit'], { maxBytes: 100_000 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(StorageTooLargeError);
    expect((error as StorageTooLargeError).statusCode).toBe(413);
    expect(await storage.exists('knowledge-base/limit/huge.bin')).toBe(false);
    expect((await storage.saveFile('small', 'ok.bin', undefined, ['limit'], { maxBytes: 5 })).size).toBe(5);
  });

  it.each(BAD_PARTS)('refuses a path-escape attempt in a file name or folder part: %s', async (_name, part) => {
    await expect(storage.saveFile('x', part as string, undefined, ['ok'])).rejects.toBeInstanceOf(StoragePathError);
    await expect(storage.saveFile('x', 'ok.txt', undefined, ['ok', part as string])).rejects.toBeInstanceOf(StoragePathError);
    const { key } = await storage.saveFile('x', 'src.txt', undefined, ['esc']);
    await expect(storage.moveFile(key, part as string)).rejects.toBeInstanceOf(StoragePathError);
    expect(await storage.exists(key)).toBe(true);
  });

  it('refuses keys outside its prefix or with bad parts, for every operation', async () => {
    const { key } = await other.saveFile('another prefix', 'theirs.txt');
    expect(key).toBe('other/theirs.txt');
    const bad = [key, 'knowledge-base/../other/theirs.txt', 'knowledge-base/a/../../other/theirs.txt', '/other/theirs.txt', 'knowledge-base//x', 'knowledge-base/a\\..\\b', 'knowledge-base/\uFF0E\uFF0E/other'];
    for (const k of bad) {
      await expect(storage.readFile(k), k).rejects.toBeInstanceOf(StoragePathError);
      await expect(storage.stream(k, { start: 0 }), k).rejects.toBeInstanceOf(StoragePathError);
      await expect(storage.exists(k), k).rejects.toBeInstanceOf(StoragePathError);
      await expect(storage.deleteFile(k), k).rejects.toBeInstanceOf(StoragePathError);
      await expect(storage.moveFile(k, 'stolen.txt'), k).rejects.toBeInstanceOf(StoragePathError);
    }
    expect((await other.readFile(key)).toString()).toBe('another prefix');
  });
});

describe('local storage on disk', () => {
  it('keeps files 0600 in 0700 directories under DATA_DIR/storage', async () => {
    const dataDir = tempDir();
    const storage = getStorageService(testSettings({ DATA_DIR: dataDir }), { prefix: 'knowledge-base' });
    await storage.saveFile('private', 'p.txt', undefined, ['u1', 'f']);
    const path = join(dataDir, 'storage', 'knowledge-base', 'u1', 'f', 'p.txt');
    expect(statSync(path).mode & 0o777).toBe(0o600);
    for (const dir of ['storage', 'storage/knowledge-base', 'storage/knowledge-base/u1', 'storage/knowledge-base/u1/f']) {
      expect(statSync(join(dataDir, dir)).mode & 0o077, dir).toBe(0);
    }
  });

  it('does not follow a symbolic link out of the storage directory, for reads or writes', async () => {
    const dataDir = tempDir();
    const outside = tempDir();
    writeFileSync(join(outside, 'secret.txt'), 'outside secret');
    const storage = getStorageService(testSettings({ DATA_DIR: dataDir }), { prefix: 'knowledge-base' });
    await storage.saveFile('inside', 'in.txt');
    const base = join(dataDir, 'storage', 'knowledge-base');
    symlinkSync(outside, join(base, 'escape')); // a directory link planted in the tree
    symlinkSync(join(outside, 'secret.txt'), join(base, 'link.txt')); // a file link

    await expect(storage.readFile('knowledge-base/escape/secret.txt')).rejects.toBeInstanceOf(StoragePathError);
    await expect(storage.exists('knowledge-base/escape/secret.txt')).rejects.toBeInstanceOf(StoragePathError);
    await expect(storage.saveFile('overwrite', 'secret.txt', undefined, ['escape'])).rejects.toBeInstanceOf(StoragePathError);
    await expect(storage.saveFile('new', 'x.txt', undefined, ['escape', 'sub'])).rejects.toBeInstanceOf(StoragePathError);
    await expect(storage.deleteFile('knowledge-base/escape/secret.txt')).rejects.toBeInstanceOf(StoragePathError);
    await expect(storage.moveFile('knowledge-base/in.txt', 'moved.txt', ['escape'])).rejects.toBeInstanceOf(StoragePathError);
    // The file link itself is not followed: not readable, not reported as a file.
    await expect(storage.readFile('knowledge-base/link.txt')).rejects.toBeInstanceOf(StorageNotFoundError);
    expect(await storage.exists('knowledge-base/link.txt')).toBe(false);

    expect(readdirSync(outside)).toEqual(['secret.txt']);
    expect(await storage.exists('knowledge-base/in.txt')).toBe(true);
  });

  it('removes the folders a deleted or moved file leaves empty, never the prefix', async () => {
    const dataDir = tempDir();
    const storage = getStorageService(testSettings({ DATA_DIR: dataDir }), { prefix: 'knowledge-base' });
    const { key } = await storage.saveFile('x', 'f.txt', undefined, ['a', 'b']);
    await storage.saveFile('y', 'keep.txt', undefined, ['a']);
    await storage.deleteFile(key);
    expect(existsSync(join(dataDir, 'storage', 'knowledge-base', 'a', 'b'))).toBe(false);
    expect(existsSync(join(dataDir, 'storage', 'knowledge-base', 'a', 'keep.txt'))).toBe(true);
    await storage.deleteFile('knowledge-base/a/keep.txt');
    expect(existsSync(join(dataDir, 'storage', 'knowledge-base'))).toBe(true);
    expect(readdirSync(join(dataDir, 'storage', 'knowledge-base'))).toEqual([]);
  });

  it('answers 409 when a folder part is a file already or a file name is a folder, and not-found when reading through one', async () => {
    const storage = getStorageService(testSettings({ DATA_DIR: tempDir() }), { prefix: 'knowledge-base' });
    const { key } = await storage.saveFile('a file', 'a.txt');
    const error = await storage.saveFile('x', 'b.txt', undefined, ['a.txt']).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(StorageConflictError);
    expect((error as StorageConflictError).statusCode).toBe(409);
    await expect(storage.moveFile(key, 'b.txt', ['a.txt'])).rejects.toBeInstanceOf(StorageConflictError);
    expect(await storage.exists('knowledge-base/a.txt/b.txt')).toBe(false);
    await storage.saveFile('in a folder', 'inner.txt', undefined, ['folder']);
    await expect(storage.saveFile('x', 'folder')).rejects.toBeInstanceOf(StorageConflictError);
    await expect(storage.readFile('knowledge-base/folder')).rejects.toBeInstanceOf(StorageNotFoundError);
    expect(await storage.exists('knowledge-base/folder')).toBe(false);
    await expect(storage.readFile('knowledge-base/a.txt/b.txt')).rejects.toBeInstanceOf(StorageNotFoundError);
    expect((await storage.readFile(key)).toString()).toBe('a file');
  });

  it('sweeps temporary files a killed process left, not a fresh one', async () => {
    const dataDir = tempDir();
    const temp = join(dataDir, 'storage', '.tmp');
    mkdirSync(temp, { recursive: true });
    writeFileSync(join(temp, 'stale'), 'left by a crash');
    writeFileSync(join(temp, 'fresh'), 'being written by another process');
    const old = new Date(Date.now() - 25 * 60 * 60 * 1000);
    utimesSync(join(temp, 'stale'), old, old);
    await getStorageService(testSettings({ DATA_DIR: dataDir }), { prefix: 'knowledge-base' }).saveFile('x', 'f.txt');
    expect(readdirSync(temp)).toEqual(['fresh']);
  });

  it('sweeps at once the temporary files named for a process that is gone, not those of a live one, nor one named by pid alone', async () => {
    const dataDir = tempDir();
    const temp = join(dataDir, 'storage', '.tmp');
    mkdirSync(temp, { recursive: true });
    // Tags (processTag) of a process that has ended and of one that runs, each told by itself.
    const tagging = `import { processTag } from './src/core/process-tag.ts'; process.stdout.write(processTag());`;
    const node = (script: string) => ['--import', 'tsx', '--input-type=module', '-e', `${tagging} ${script}`];
    const ended = (await promisify(execFile)(process.execPath, node(''), { cwd: ROOT })).stdout;
    const running = spawn(process.execPath, node('setInterval(() => undefined, 1000);'), { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      const live = await new Promise<string>((told) => running.stdout.once('data', (chunk: Buffer) => told(chunk.toString())));
      expect(ended).toMatch(/^\d+_/);
      const uuid = '0b7e4a9c-1f2d-4c3b-9a8e-7d6c5b4a3f21';
      writeFileSync(join(temp, `${ended}.${uuid}`), 'left by a kill -9');
      writeFileSync(join(temp, `${live}.${uuid}`), 'being written by another process');
      // A pid alone (written where /proc told nothing) may be a live process of another host or
      // container sharing the directory: it waits for the 24 h rule, even though no such pid runs here.
      const pidAlone = `${ended.split('_')[0]}.${uuid}`;
      writeFileSync(join(temp, pidAlone), 'written where /proc told nothing');
      const storage = getStorageService(testSettings({ DATA_DIR: dataDir }), { prefix: 'knowledge-base' });
      // The knowledge sweeper's call, as at every start: it says how many went.
      expect(await storage.abandonStaleWrites(0)).toBe(1);
      expect(readdirSync(temp).sort()).toEqual([`${live}.${uuid}`, pidAlone].sort());
    } finally {
      running.kill();
    }
  }, 60_000);

  it('tightens a storage directory left group/world-readable', async () => {
    const dataDir = tempDir();
    mkdirSync(join(dataDir, 'storage'), { mode: 0o755 });
    const storage = getStorageService(testSettings({ DATA_DIR: dataDir }), { prefix: 'knowledge-base' });
    await storage.saveFile('x', 'f.txt');
    expect(statSync(join(dataDir, 'storage')).mode & 0o077).toBe(0);
  });
});

describe('s3 storage when the server is down', () => {
  it('answers StorageUnavailableError (503) for every operation, the S3 error kept as the cause', async () => {
    const backend = new S3StorageBackend({ bucket: BUCKET, region: 'us-east-1', endpoint: 'http://127.0.0.1:1', accessKeyId: 'a', secretAccessKey: 'b', forcePathStyle: true, timeoutMs: 60_000 });
    const storage = new Service(backend, 'knowledge-base');
    try {
      const key = 'knowledge-base/a.txt';
      const operations = [
        () => storage.saveFile('x', 'a.txt'),
        () => storage.readFile(key),
        () => storage.exists(key),
        () => storage.deleteFile(key),
        () => storage.moveFile(key, 'b.txt'),
      ];
      for (const operation of operations) {
        const error = await (operation() as Promise<unknown>).catch((e: unknown) => e);
        expect(error).toBeInstanceOf(StorageUnavailableError);
        expect((error as StorageUnavailableError).statusCode).toBe(503);
        expect((error as StorageUnavailableError).detail).not.toContain('127.0.0.1');
        expect((error as Error).cause).toBeDefined();
      }
      // A failing body is still reported as itself, not as the server's failure.
      await expect(storage.saveFile(failingStream(10), 'c.txt')).rejects.toThrow('client went away');
    } finally {
      await backend.close();
    }
  }, 60_000);
});

describe('s3 storage when the server stops answering', () => {
  it('gives each request up after S3_TIMEOUT_SECONDS of silence (503, after the SDK\'s retries), and works again once the server answers', async () => {
    const server = new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory: tempDir(), configureBuckets: [{ name: BUCKET }] });
    const { port } = await server.run();
    const proxy = await SilentProxy.start({ host: '127.0.0.1', port });
    const endpoint = `http://127.0.0.1:${proxy.port}`;
    const backend = new S3StorageBackend({ bucket: BUCKET, region: 'us-east-1', endpoint, accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER', forcePathStyle: true, timeoutMs: 1000 });
    const storage = new Service(backend, 'knowledge-base');
    try {
      const { key } = await storage.saveFile('before', 'a.txt');
      proxy.fallSilent();
      // Without a timeout each of these waited for ever (the test's own timeout ended it).
      const operations = [() => storage.saveFile('x', 'b.txt'), () => storage.readFile(key), () => storage.exists(key), () => storage.deleteFile(key)];
      for (const operation of operations) {
        const began = performance.now();
        const error = await (operation() as Promise<unknown>).catch((e: unknown) => e);
        expect(error).toBeInstanceOf(StorageUnavailableError);
        expect(performance.now() - began).toBeLessThan(15_000);
      }
      proxy.speak();
      expect((await storage.readFile(key)).toString()).toBe('before');
    } finally {
      await backend.close();
      await proxy.close();
      await new Promise((resolve) => server.close(resolve));
    }
  }, 120_000);

  /**
   * A fake S3 server for `work`: it answers an object's size (`size`) to HEAD and GET as `get`
   * does; the service on it has `timeoutMs` as S3_TIMEOUT_SECONDS.
   */
  async function withFakeS3(size: number, get: (request: IncomingMessage, response: ServerResponse) => void, timeoutMs: number, work: (storage: StorageService) => Promise<void>): Promise<void> {
    const server = createServer((request, response) => {
      if (request.method === 'HEAD') response.writeHead(200, { 'content-length': size, etag: '"x"' }).end();
      else get(request, response);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    const backend = new S3StorageBackend({ bucket: BUCKET, region: 'us-east-1', endpoint, accessKeyId: 'a', secretAccessKey: 'b', forcePathStyle: true, timeoutMs });
    try {
      await work(new Service(backend, 'knowledge-base'));
    } finally {
      await backend.close();
      server.closeAllConnections();
      server.close();
    }
  }

  /** A fake S3 (`withFakeS3`) whose object of 1 MB comes 64 KB and then nothing; `downloadClosed`: when the download's connection closes. */
  async function withHalfSilentS3(timeoutMs: number, work: (storage: StorageService, downloadClosed: Promise<number>) => Promise<void>): Promise<void> {
    const size = 1024 * 1024;
    let closed!: (at: number) => void;
    const downloadClosed = new Promise<number>((resolve) => (closed = resolve));
    const get = (request: IncomingMessage, response: ServerResponse) => {
      request.socket.once('close', () => closed(performance.now()));
      response.writeHead(206, { 'content-length': size, 'content-range': `bytes 0-${size - 1}/${size}` });
      response.write(Buffer.alloc(64 * 1024));
    };
    await withFakeS3(size, get, timeoutMs, (storage) => work(storage, downloadClosed));
  }

  it("reports a download whose server falls silent half-way as the server's failure (503) after S3_TIMEOUT_SECONDS", async () => {
    await withHalfSilentS3(1000, async (storage) => {
      const began = performance.now();
      const error = await storage.readFile('knowledge-base/a.txt').catch((e: unknown) => e);
      expect(error).toBeInstanceOf(StorageUnavailableError);
      expect((error as Error).cause).toMatchObject({ name: 'TimeoutError' });
      expect(performance.now() - began).toBeLessThan(15_000);
    });
  }, 60_000);

  it('ends a download its reader has stopped reading with that failure once the connection has been silent that long (an HTTP response is then closed)', async () => {
    await withHalfSilentS3(1000, async (storage) => {
      const { body } = await storage.stream('knowledge-base/a.txt');
      // Nothing reads it: the error still comes, and the stream is destroyed.
      const error = await new Promise<unknown>((resolve) => body.once('error', resolve));
      expect(error).toBeInstanceOf(StorageUnavailableError);
      expect(body.destroyed).toBe(true);
    });
  }, 60_000);

  it("closes the object's connection at once when the download is destroyed (its client gone), not when it times out", async () => {
    await withHalfSilentS3(10_000, async (storage, downloadClosed) => {
      const { body } = await storage.stream('knowledge-base/a.txt');
      await new Promise((resolve) => body.once('data', resolve));
      const destroyed = performance.now();
      body.destroy();
      expect((await downloadClosed) - destroyed).toBeLessThan(2_000);
    });
  }, 60_000);

  it('holds a server that answers a range with the rest of the object to the range asked for, and closes its connection after it', async () => {
    const object = Buffer.from('0123456789');
    let closed = false;
    // Answers every range from its start to the object's end, as some S3-compatible servers do, and never ends it.
    const get = (request: IncomingMessage, response: ServerResponse) => {
      const start = Number(/bytes=(\d+)-/.exec(request.headers.range ?? '')?.[1] ?? 0);
      request.socket.once('close', () => (closed = true));
      response.writeHead(206, { 'content-length': object.length - start, 'content-range': `bytes ${start}-${object.length - 1}/${object.length}` });
      response.write(object.subarray(start));
    };
    await withFakeS3(object.length, get, 10_000, async (storage) => {
      const { body, start, end } = await storage.stream('knowledge-base/digits.txt', { start: 2, end: 4 });
      expect([start, end]).toEqual([2, 4]);
      const chunks: Buffer[] = [];
      for await (const chunk of body) chunks.push(chunk as Buffer);
      expect(Buffer.concat(chunks).toString()).toBe('234');
      await eventually(async () => closed);
    });
  }, 60_000);

  it('takes S3_TIMEOUT_SECONDS from the settings (default 60 s)', () => {
    expect(testSettings({}).S3_TIMEOUT_SECONDS).toBe(60);
    expect(() => testSettings({ S3_TIMEOUT_SECONDS: '0' })).toThrow(/S3_TIMEOUT_SECONDS/);
  });
});

describe('storage settings', () => {
  it('refuses STORAGE_BACKEND=s3 without a bucket, in one line naming the setting', () => {
    expect(() => testSettings({ STORAGE_BACKEND: 's3' })).toThrow(new ConfigError('S3_BUCKET: must be set when STORAGE_BACKEND=s3'));
    expect(() => testSettings({ STORAGE_BACKEND: 's3', S3_BUCKET: 'b', S3_ACCESS_KEY_ID: 'only-one' })).toThrow(ConfigError);
    expect(() => testSettings({ STORAGE_BACKEND: 'ftp' })).toThrow(/STORAGE_BACKEND/);
  });
});

describe('start-up cost', () => {
  it('loads the AWS SDK only when an s3 backend is made', async () => {
    const dataDir = tempDir();
    const script = `
      import { createRequire } from 'node:module';
      import { getStorageService } from './src/services/storage-service.ts';
      import { loadSettings } from './src/core/config.ts';
      const loaded = () => Object.keys(createRequire(import.meta.url).cache).some((k) => k.includes('@aws-sdk'));
      const base = { SECRET_KEY: 'k'.repeat(40), DATA_DIR: ${JSON.stringify(dataDir)} };
      await getStorageService(loadSettings(base), { prefix: 'kb' }).saveFile('x', 'f.txt');
      const afterLocal = loaded();
      getStorageService(loadSettings({ ...base, STORAGE_BACKEND: 's3', S3_BUCKET: 'b' }), { prefix: 'kb' });
      console.log(JSON.stringify([afterLocal, loaded()]));
    `;
    const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      cwd: ROOT,
      env: { PATH: process.env.PATH, HOME: process.env.HOME },
    });
    expect(JSON.parse(stdout.trim())).toEqual([false, true]);
  }, 60_000);
});

describe('app.storage', () => {
  const dataDir = tempDir();
  const context = useTestApp({ DATA_DIR: dataDir });

  it('gives a service per prefix on the one backend STORAGE_BACKEND chose, under DATA_DIR/storage', async () => {
    const kb = context.app.storage('knowledge-base');
    expect(kb.backend.name).toBe('local');
    expect(context.app.storage('exports').backend).toBe(kb.backend);
    const saved = await kb.saveFile('through the app', 'a.txt', 'text/plain', ['u1']);
    expect(readFileSync(join(dataDir, 'storage', 'knowledge-base', 'u1', 'a.txt'), 'utf8')).toBe('through the app');
    expect(await context.app.storage('exports').exists('exports/a.txt')).toBe(false);
    await expect(context.app.storage('exports').readFile(saved.key)).rejects.toBeInstanceOf(StoragePathError);
    expect(() => context.app.storage('../up')).toThrow(StoragePathError);
  });
});
