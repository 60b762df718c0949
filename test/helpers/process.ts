import { type ChildProcess, spawn } from 'node:child_process';
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import { inject } from 'vitest';

/** The checkout's root: children run from here, as a user runs Keel. */
export const ROOT = resolve(import.meta.dirname, '../..');

/** The launcher `npm start`, `npm run keel` and `npx keel` run. */
export const KEEL = 'bin/keel.js';

/** A child process with its output collected and its end awaited. */
export interface Child {
  process: ChildProcess;
  pid: number;
  out: () => string;
  err: () => string;
  /** Resolves when it has exited (and its output streams have closed). */
  ended: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Whether it has exited already. */
  done: () => boolean;
}

const running = new Set<Child>();

/** SIGKILLs whatever a test left running (for afterAll/afterEach). */
export function killLeftovers(): void {
  for (const child of running) if (!child.done()) child.process.kill('SIGKILL');
  running.clear();
}

/**
 * Spawns `command args` in the checkout with an environment built from scratch (PATH and HOME
 * only, then `env`), so the test run's DATABASE_URL and REDIS_URL never leak in; `as` runs it as
 * another user (which needs root).
 */
export function launch(command: string, args: string[], env: Record<string, string>, as: { uid: number; gid: number } | null = null): Child {
  const child = spawn(command, args, {
    cwd: ROOT,
    env: { PATH: process.env.PATH, HOME: process.env.HOME, DATABASE_URL: '', REDIS_URL: '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    // Another user (the test runs as root): Node drops the supplementary groups as well.
    ...(as ?? {}),
  });
  let out = '';
  let err = '';
  let exited = false;
  child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString('utf8')));
  child.stderr.on('data', (chunk: Buffer) => (err += chunk.toString('utf8')));
  const ended = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((done) =>
    child.on('close', (code, signal) => {
      exited = true;
      done({ code, signal });
    }),
  );
  const handle: Child = { process: child, pid: child.pid!, out: () => out, err: () => err, ended, done: () => exited };
  running.add(handle);
  return handle;
}

/**
 * `node bin/keel.js ...args`, the way `npm run keel --` runs it: dist/ when it was built from the
 * src/ there is now (`npm ci` builds it; a bundled start is several times cheaper), else src/ through tsx.
 */
export function keel(args: string[], env: Record<string, string>, as: { uid: number; gid: number } | null = null): Child {
  return launch(process.execPath, [KEEL, ...args], env, as);
}

export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  const address = server.address();
  await new Promise<void>((done) => server.close(() => done()));
  if (!address || typeof address === 'string') throw new Error('no free port');
  return address.port;
}

/** Waits until `base`/health answers 200; fails early, with the output, if the child exits. */
export async function healthy(child: Child, base: string, timeoutMs = 150_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.done()) throw new Error(`exited before answering /health:\n${child.out()}\n${child.err()}`);
    const ok = await fetch(`${base}/health`).then(
      (response) => response.status === 200,
      () => false,
    );
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`no /health within ${timeoutMs} ms:\n${child.out()}\n${child.err()}`);
    await new Promise((done) => setTimeout(done, 100));
  }
}

/** `keel start` of a local deployment on `dataDir` at `port` (JSON logs, warnings up), once it answers /health; `env` adds or overrides settings. */
export async function startLocalKeel(dataDir: string, port: number, env: Record<string, string>): Promise<{ child: Child; base: string }> {
  const child = keel(['start'], { ENVIRONMENT: 'local', DATA_DIR: dataDir, HOST: '127.0.0.1', PORT: String(port), LOG_FORMAT: 'json', LOG_LEVEL: 'warn', ...env });
  const base = `http://127.0.0.1:${port}`;
  await healthy(child, base);
  return { child, base };
}

/** Whether a process with this pid exists. */
export function exists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

let migratedTemplate: Promise<string> | undefined;

/** A data directory migrated once by `keel migrate`, for runs without the run's PGlite template (server mode). */
async function migratedByCli(): Promise<string> {
  const dataDir = mkdtempSync(join(tmpdir(), 'keel-migrated-'));
  process.on('exit', () => rmSync(dataDir, { recursive: true, force: true }));
  const migrate = keel(['migrate'], { ENVIRONMENT: 'local', DATA_DIR: dataDir, LOG_LEVEL: 'warn' });
  const { code } = await migrate.ended;
  if (code !== 0) throw new Error(`keel migrate failed:\n${migrate.out()}\n${migrate.err()}`);
  return join(dataDir, 'pglite');
}

/**
 * Makes `dataDir` a DATA_DIR whose embedded database is already created and migrated: a copy of
 * the run's migrated PGlite template (the one every in-process test file copies), or, when the
 * run has none (DATABASE_URL set), of one directory `keel migrate` made for this test file.
 * A start on it skips PGlite's initdb and the migrations, which cost ~10 s of CPU per directory
 * on a 2-core machine; for tests of what a server does once it runs. Tests of the first start
 * itself (initdb, migrations, file modes of new files) keep an empty directory.
 */
export async function migratedDataDir(dataDir: string): Promise<string> {
  const template = inject('templatePgliteDir') ?? (await (migratedTemplate ??= migratedByCli()));
  cpSync(template, join(dataDir, 'pglite'), { recursive: true });
  return dataDir;
}
