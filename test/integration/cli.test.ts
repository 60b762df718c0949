import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { readMigrations } from '../../src/core/migrate.js';

import { freePort } from '../helpers/process.js';

const ROOT = resolve(import.meta.dirname, '../..');
const ADMIN_EMAIL = 'cli-admin@keel.test';
const ADMIN_PASSWORD = 'cli-admin-password';
const TAGS = readMigrations().map((m) => m.tag);

const dataDir = mkdtempSync(join(tmpdir(), 'keel-cli-test-'));
const children = new Set<ChildProcess>();

afterAll(() => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  rmSync(dataDir, { recursive: true, force: true });
});

/**
 * The environment of a child: nothing inherited but PATH and HOME, so the run's DATABASE_URL and
 * REDIS_URL never leak in; the CLI runs embedded on a data directory of this file's own.
 */
function environment(overrides: Record<string, string>): NodeJS.ProcessEnv {
  return {
    PATH: process.env.PATH,
    HOME: process.env.HOME,
    ENVIRONMENT: 'local',
    DATA_DIR: dataDir,
    DATABASE_URL: '',
    REDIS_URL: '',
    HOST: '127.0.0.1',
    LOG_FORMAT: 'json',
    LOG_LEVEL: 'info',
    FIRST_SUPERUSER: ADMIN_EMAIL,
    FIRST_SUPERUSER_PASSWORD: ADMIN_PASSWORD,
    SHUTDOWN_TIMEOUT_MS: '20000',
    ...overrides,
  };
}

interface Exited {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

interface Keel {
  child: ChildProcess;
  exited: Promise<Exited>;
  output: () => { stdout: string; stderr: string };
}

function keel(args: string[], env: Record<string, string> = {}): Keel {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/main.ts', ...args], {
    cwd: ROOT,
    env: environment(env),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString('utf8')));
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
  const exited = new Promise<Exited>((done) => {
    child.on('close', (code, signal) => {
      children.delete(child);
      done({ code, signal, stdout, stderr });
    });
  });
  return { child, exited, output: () => ({ stdout, stderr }) };
}

/** Runs a CLI command to its end. */
function run(args: string[], env: Record<string, string> = {}): Promise<Exited> {
  return keel(args, env).exited;
}

interface Server extends Keel {
  base: string;
}

/** `keel start` on a free port; resolves once /health answers. */
async function start(env: Record<string, string> = {}): Promise<Server> {
  const port = await freePort();
  const server = keel(['start'], { PORT: String(port), ...env });
  const base = `http://127.0.0.1:${port}`;
  let exited: Exited | null = null;
  void server.exited.then((result) => (exited = result));
  const deadline = Date.now() + 45_000;
  for (;;) {
    if (exited) throw new Error(`keel start exited early: ${JSON.stringify(exited)}`);
    try {
      const response = await fetch(`${base}/health`);
      if (response.status === 200) return { ...server, base };
    } catch {
      // Not listening yet.
    }
    if (Date.now() > deadline) {
      // Not left behind holding the data directory's lock for the next test.
      server.child.kill('SIGKILL');
      throw new Error(`keel start did not answer /health: ${JSON.stringify(server.output())}`);
    }
    await new Promise((done) => setTimeout(done, 100));
  }
}

async function stop(server: Keel): Promise<Exited> {
  server.child.kill('SIGTERM');
  return server.exited;
}

async function login(base: string, username: string, password: string): Promise<Response> {
  return fetch(`${base}/api/v1/login/access-token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ username, password }),
  });
}

async function token(base: string, username = ADMIN_EMAIL, password = ADMIN_PASSWORD): Promise<string> {
  const response = await login(base, username, password);
  expect(response.status).toBe(200);
  return ((await response.json()) as { access_token: string }).access_token;
}

function jsonLines(stdout: string): Record<string, unknown>[] {
  return stdout
    .split('\n')
    .filter(Boolean)
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

describe('keel start', () => {
  let firstToken = '';
  let projectId = '';
  /** The second start's server: the shutdown test below stops it. */
  let second: Server | undefined;

  it('serves the API, creates the first superuser and shuts down cleanly', async () => {
    const server = await start();
    const ready = await fetch(`${server.base}/ready`);
    expect(ready.status).toBe(200);
    expect(await ready.json()).toMatchObject({ status: 'ready', database: 'pglite' });

    firstToken = await token(server.base);
    const headers = { authorization: `Bearer ${firstToken}`, 'content-type': 'application/json' };
    const me = await fetch(`${server.base}/api/v1/users/me`, { headers });
    expect(await me.json()).toMatchObject({ email: ADMIN_EMAIL, is_superuser: true, is_active: true });
    const project = await fetch(`${server.base}/api/v1/projects`, { method: 'POST', headers, body: JSON.stringify({ name: 'Kept across restarts' }) });
    expect(project.status).toBe(200);
    projectId = ((await project.json()) as { id: string }).id;

    const exited = await stop(server);
    expect(exited.code).toBe(0);
    const lines = jsonLines(exited.stdout);
    expect(lines.some((line) => line.msg === 'first superuser created')).toBe(true);
    expect(lines.some((line) => line.msg === 'shut down cleanly')).toBe(true);
  }, 60_000);

  it('a second start keeps the data and leaves the existing superuser as it is', async () => {
    // A different password in the settings must not touch the existing account.
    const server = await start({ FIRST_SUPERUSER_PASSWORD: 'another-password-now' });
    second = server;
    // The local SECRET_KEY was kept in the data directory: the first run's token still works.
    const headers = { authorization: `Bearer ${firstToken}` };
    expect((await fetch(`${server.base}/api/v1/users/me`, { headers })).status).toBe(200);
    const project = await fetch(`${server.base}/api/v1/projects/${projectId}`, { headers });
    expect(project.status).toBe(200);
    expect(await project.json()).toMatchObject({ name: 'Kept across restarts' });

    expect((await login(server.base, ADMIN_EMAIL, 'another-password-now')).status).toBe(400);
    const users = await fetch(`${server.base}/api/v1/users?limit=100`, { headers: { authorization: `Bearer ${await token(server.base)}` } });
    const list = (await users.json()) as { data: { email: string }[]; count: number };
    expect(list.data.filter((u) => u.email === ADMIN_EMAIL)).toHaveLength(1);
    expect(list.count).toBe(1);
  }, 60_000);

  it('SIGTERM lets in-flight requests finish, refuses new ones and exits 0', async () => {
    const server = second ?? (await start());
    const { port } = new URL(server.base);
    const body = new URLSearchParams({ username: ADMIN_EMAIL, password: ADMIN_PASSWORD }).toString();
    const cut = Math.floor(body.length / 2);

    // Several logins whose bodies have only half arrived when the signal comes.
    const inFlight = Array.from({ length: 4 }, () => {
      const req = httpRequest({
        host: '127.0.0.1',
        port: Number(port),
        method: 'POST',
        path: '/api/v1/login/access-token',
        headers: { 'content-type': 'application/x-www-form-urlencoded', 'content-length': String(Buffer.byteLength(body)) },
      });
      const answer = new Promise<{ status: number; body: string }>((done, fail) => {
        req.on('response', (res) => {
          let text = '';
          res.on('data', (chunk: Buffer) => (text += chunk.toString('utf8')));
          res.on('end', () => done({ status: res.statusCode ?? 0, body: text }));
          res.on('error', fail);
        });
        req.on('error', fail);
      });
      req.write(body.slice(0, cut));
      return { req, answer };
    });
    // Time for the server to accept the connections and read the headers.
    await new Promise((done) => setTimeout(done, 1_000));

    server.child.kill('SIGTERM');
    await new Promise((done) => setTimeout(done, 500));
    // Shutting down: a new connection is refused (or answered 503), never served.
    const late = await fetch(`${server.base}/health`).then(
      (response) => response.status,
      () => 'refused',
    );
    expect([503, 'refused']).toContain(late);
    expect(server.child.exitCode).toBeNull();

    for (const { req } of inFlight) req.end(body.slice(cut));
    const answers = await Promise.all(inFlight.map(({ answer }) => answer));
    for (const answer of answers) {
      expect(answer.status, answer.body).toBe(200);
      expect(JSON.parse(answer.body)).toMatchObject({ token_type: 'bearer', access_token: expect.any(String) as string });
    }

    const exited = await server.exited;
    expect(exited.code).toBe(0);
    expect(exited.signal).toBeNull();
    // The logs, flushed at exit: JSON lines; this start found the superuser already there.
    const lines = jsonLines(exited.stdout);
    expect(lines.some((line) => line.msg === 'shut down cleanly')).toBe(true);
    expect(lines.some((line) => line.msg === 'first superuser created')).toBe(false);
  }, 60_000);
});

describe('keel migrate', () => {
  it('down reverts every migration and status then shows them pending', async () => {
    const down = await run(['migrate', 'down']);
    expect(down.code, down.stderr).toBe(0);
    const status = await run(['migrate', 'status']);
    expect(status.code, status.stderr).toBe(0);
    for (const tag of TAGS) expect(status.stdout).toMatch(new RegExp(`^pending\\s+${tag}$`, 'm'));
  }, 60_000);
});

describe('bad settings stop the process', () => {
  // Each case is a process that stops at start-up; they run side by side.
  it.concurrent.each([
    ['PORT=abc', { PORT: 'abc' }, 'PORT'],
    ['ENVIRONMENT=production without SECRET_KEY', { ENVIRONMENT: 'production', FIRST_SUPERUSER_PASSWORD: 'a-real-password' }, 'SECRET_KEY'],
    ['ENVIRONMENT=production with the default superuser password', { ENVIRONMENT: 'production', SECRET_KEY: 's'.repeat(48), FIRST_SUPERUSER_PASSWORD: 'changethis' }, 'FIRST_SUPERUSER_PASSWORD'],
  ])('%s', async (_label, env, name) => {
    const port = await freePort();
    const exited = await run(['start'], { PORT: String(port), ...env });
    expect(exited.code).not.toBe(0);
    expect(exited.code).not.toBeNull();
    expect(exited.stderr).toMatch(new RegExp(`\\b${name}\\b`));
    // The operator's message, without a stack trace.
    expect(exited.stderr).not.toMatch(/^\s+at /m);
    // Nothing was served.
    await expect(fetch(`http://127.0.0.1:${port}/health`)).rejects.toThrow();
  }, 30_000);
});
