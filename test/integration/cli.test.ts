import { type ChildProcess, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { type AddressInfo, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { readMigrations } from '../../src/core/migrate.js';

import { freePort, KEEL } from '../helpers/process.js';

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

function keel(args: string[], env: Record<string, string> = {}, stdin?: string): Keel {
  const child = spawn(process.execPath, [KEEL, ...args], {
    cwd: ROOT,
    env: environment(env),
    stdio: [stdin === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
  });
  if (stdin !== undefined) child.stdin!.end(stdin);
  children.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString('utf8')));
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
  const exited = new Promise<Exited>((done) => {
    child.on('close', (code, signal) => {
      children.delete(child);
      done({ code, signal, stdout, stderr });
    });
  });
  return { child, exited, output: () => ({ stdout, stderr }) };
}

/** Runs a CLI command to its end. */
function run(args: string[], env: Record<string, string> = {}, stdin?: string): Promise<Exited> {
  return keel(args, env, stdin).exited;
}

/**
 * Runs a command at a terminal (a pseudo-terminal from `script`), typing each answer once the
 * output ends with its prompt; resolves with everything the terminal showed.
 */
async function atTerminal(args: string[], env: Record<string, string>, answers: [RegExp, string][]): Promise<{ code: number | null; screen: string }> {
  const quoted = [process.execPath, KEEL, ...args].map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
  const child = spawn('script', ['-qfec', quoted, '/dev/null'], { cwd: ROOT, env: environment(env), stdio: ['pipe', 'pipe', 'pipe'] });
  children.add(child);
  let screen = '';
  const pending = [...answers];
  child.stdout.on('data', (chunk: Buffer) => {
    screen += chunk.toString('utf8');
    const next = pending[0];
    if (next && next[0].test(screen)) {
      pending.shift();
      screen += '\u0000';
      child.stdin.write(`${next[1]}\r`);
    }
  });
  const code = await new Promise<number | null>((done) => child.on('close', (exit) => done(exit)));
  children.delete(child);
  return { code, screen };
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
  const deadline = Date.now() + 150_000;
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
    // SMTP is not configured: said once, with what it disables.
    expect(lines.filter((line) => /^email is off \(SMTP_HOST and EMAILS_FROM_EMAIL unset\): password-recovery/.test(String(line.msg)))).toHaveLength(1);
    // The password is not the default: no warning.
    expect(lines.some((line) => /default password/.test(String(line.msg)))).toBe(false);
  }, 240_000);

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
  }, 240_000);

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
  }, 240_000);
});

describe('keel migrate', () => {
  const status = async () => {
    const result = await run(['migrate', 'status']);
    expect(result.code, result.stderr).toBe(0);
    return result.stdout;
  };

  it('down refuses without --yes when standard input is not a terminal, and reverts nothing', async () => {
    const down = await run(['migrate', 'down']);
    expect(down.code).toBe(2);
    expect(down.stderr.trim()).toMatch(/^keel migrate down: would revert \S+ .*pass --yes to confirm$/);
    expect(down.stderr.trim().split('\n')).toHaveLength(1);
    // One `migrate status` (a process opening the database) read for every tag.
    const after = await status();
    for (const tag of TAGS) expect(after).toMatch(new RegExp(`^applied\\s+${tag}$`, 'm'));
  }, 240_000);

  it('down --to with an unknown tag lists the valid ones', async () => {
    const down = await run(['migrate', 'down', '--to', 'nope', '--yes']);
    expect(down.code).toBe(2);
    for (const tag of TAGS) expect(down.stderr).toContain(tag);
    expect(down.stderr.trim().split('\n')).toHaveLength(1);
  }, 240_000);

  it('down --yes reverts only the newest migration', async () => {
    const down = await run(['migrate', 'down', '--yes']);
    expect(down.code, down.stderr).toBe(0);
    expect(down.stdout).toContain(`reverted ${TAGS.at(-1)}`);
    const after = await status();
    expect(after).toMatch(new RegExp(`^pending\\s+${TAGS.at(-1)}$`, 'm'));
    for (const tag of TAGS.slice(0, -1)) expect(after).toMatch(new RegExp(`^applied\\s+${tag}$`, 'm'));
  }, 240_000);

  it('down at a terminal asks first; "n" reverts nothing', async () => {
    const { code, screen } = await atTerminal(['migrate', 'down', '--all'], {}, [[/Continue\? \[y\/N\]/, 'n']]);
    expect(screen).toMatch(/This will revert .*Continue\?/);
    expect(code).toBe(2);
    expect(screen).toMatch(/cancelled, nothing reverted/);
    expect(await status()).toMatch(new RegExp(`^applied\\s+${TAGS[0]}$`, 'm'));
  }, 240_000);

  it('down --all --yes reverts every migration; create-superuser then asks for `keel migrate`', async () => {
    const down = await run(['migrate', 'down', '--all', '--yes']);
    expect(down.code, down.stderr).toBe(0);
    const after = await status();
    for (const tag of TAGS) expect(after).toMatch(new RegExp(`^pending\\s+${tag}$`, 'm'));

    const create = await run(['create-superuser', '--email', 'early@keel.test'], { KEEL_SUPERUSER_PASSWORD: 'early-password-1' });
    expect(create.code).toBe(1);
    expect(create.stderr.trim()).toMatch(/^keel: the database is not migrated \(pending: .*\): run `keel migrate` first$/);

    const up = await run(['migrate']);
    expect(up.code, up.stderr).toBe(0);
    const migrated = await status();
    for (const tag of TAGS) expect(migrated).toMatch(new RegExp(`^applied\\s+${tag}$`, 'm'));
  }, 300_000);
});

describe('create-superuser, account checks and console email', () => {
  const PLAIN = { promote: 'promote-me@keel.test', reset: 'reset-me@keel.test', password: 'plain-password-1' };
  const TYPED = 'typed-at-the-terminal';
  const DEFAULT = { FIRST_SUPERUSER_PASSWORD: 'changethis', EMAIL_BACKEND: 'console' };
  const defaultPasswordWarning = (stdout: string) => jsonLines(stdout).some((line) => /still has the default password/.test(String(line.msg)));

  it('start warns about the default password, logs console emails with their link, and the API change silences the warning', async () => {
    const server = await start(DEFAULT);
    const headers = { 'content-type': 'application/json' };
    for (const email of [PLAIN.promote, PLAIN.reset]) {
      const signup = await fetch(`${server.base}/api/v1/users/signup`, { method: 'POST', headers, body: JSON.stringify({ email, password: PLAIN.password }) });
      expect(signup.status).toBe(200);
    }
    expect((await fetch(`${server.base}/api/v1/password-recovery/${PLAIN.promote}`, { method: 'POST' })).status).toBe(200);
    const admin = await token(server.base, ADMIN_EMAIL, 'changethis');
    const change = await fetch(`${server.base}/api/v1/users/me/password`, {
      method: 'PATCH',
      headers: { ...headers, authorization: `Bearer ${admin}` },
      body: JSON.stringify({ current_password: 'changethis', new_password: ADMIN_PASSWORD }),
    });
    expect(change.status).toBe(200);
    await new Promise((done) => setTimeout(done, 1_000));
    const first = await stop(server);
    expect(defaultPasswordWarning(first.stdout)).toBe(true);
    const lines = jsonLines(first.stdout);
    expect(lines.some((line) => /^EMAIL_BACKEND=console/.test(String(line.msg)))).toBe(true);
    expect(lines.some((line) => /^email is off/.test(String(line.msg)))).toBe(false);
    const mail = lines.find((line) => /^email not sent \(EMAIL_BACKEND=console\)/.test(String(line.msg)));
    expect(mail).toMatchObject({ to: PLAIN.promote });
    expect(String(mail?.msg)).toMatch(/http:\/\/localhost:5173\/reset-password\?token=\S+/);

    // The setting still says "changethis"; the account does not: no warning.
    const again = await start(DEFAULT);
    const second = await stop(again);
    expect(defaultPasswordWarning(second.stdout)).toBe(false);
  }, 300_000);

  it('at a terminal: the password is hidden and asked twice; a mismatch changes nothing', async () => {
    const created = await atTerminal(['create-superuser', '--email', 'typed@keel.test'], {}, [
      [/Password: $/, TYPED],
      [/Password \(again\): $/, TYPED],
    ]);
    expect(created.code, created.screen).toBe(0);
    expect(created.screen).toContain('typed@keel.test: superuser created');
    expect(created.screen).not.toContain(TYPED);

    const mismatch = await atTerminal(['create-superuser', '--email', 'mismatch@keel.test'], {}, [
      [/Password: $/, 'first-password-1'],
      [/Password \(again\): $/, 'second-password-2'],
    ]);
    expect(mismatch.code).toBe(2);
    expect(mismatch.screen).toMatch(/the passwords do not match; nothing changed/);
  }, 300_000);

  it('an existing account is promoted and keeps its password unless --reset-password', async () => {
    const promote = await run(['create-superuser', '--email', PLAIN.promote], { KEEL_SUPERUSER_PASSWORD: 'ignored-password-1' });
    expect(promote.code, promote.stderr).toBe(0);
    expect(promote.stdout.trim()).toBe(`${PLAIN.promote}: promoted to superuser (password unchanged; --reset-password sets a new one)`);

    const reset = await run(['create-superuser', '--email', PLAIN.reset, '--reset-password'], {}, 'piped-password-1\n');
    expect(reset.code, reset.stderr).toBe(0);
    expect(reset.stdout.trim()).toBe(`${PLAIN.reset}: promoted to superuser, password reset`);

    const nothing = await run(['create-superuser', '--email', PLAIN.promote]);
    expect(nothing.stdout).toContain('already an active superuser, nothing changed');

    // `--port` overrides PORT.
    const port = await freePort();
    const server = keel(['start', '--port', String(port)], { PORT: '1' });
    const base = `http://127.0.0.1:${port}`;
    for (let tries = 0; tries < 1500; tries++) {
      if ((await fetch(`${base}/health`).then((r) => r.status, () => 0)) === 200) break;
      await new Promise((done) => setTimeout(done, 100));
    }
    try {
      const me = async (email: string, password: string) => {
        const response = await fetch(`${base}/api/v1/users/me`, { headers: { authorization: `Bearer ${await token(base, email, password)}` } });
        return (await response.json()) as { is_superuser: boolean };
      };
      expect(await me(PLAIN.promote, PLAIN.password)).toMatchObject({ is_superuser: true });
      expect(await me(PLAIN.reset, 'piped-password-1')).toMatchObject({ is_superuser: true });
      expect((await login(base, PLAIN.reset, PLAIN.password)).status).toBe(400);
      expect(await me('typed@keel.test', TYPED)).toMatchObject({ is_superuser: true });
      expect((await login(base, 'mismatch@keel.test', 'first-password-1')).status).toBe(400);
    } finally {
      expect((await stop(server)).code).toBe(0);
    }
  }, 300_000);
});

describe('start-up problems stop the process with one line naming the setting', () => {
  const freshDir = () => mkdtempSync(join(dataDir, 'case-'));
  const fileDir = () => {
    const file = join(freshDir(), 'a-file');
    writeFileSync(file, 'not a directory');
    return file;
  };
  const readOnlyDir = () => {
    const dir = freshDir();
    mkdirSync(join(dir, 'pglite'), { mode: 0o555 });
    return dir;
  };
  const shortKeyDir = () => {
    const dir = freshDir();
    writeFileSync(join(dir, '.secret_key'), 'short');
    return dir;
  };
  const key = { SECRET_KEY: 's'.repeat(48) };
  const cases: [string, () => Record<string, string>, string, string[]?][] = [
    ['PORT=abc', () => ({ PORT: 'abc' }), 'PORT'],
    ['ENVIRONMENT=production without SECRET_KEY', () => ({ ENVIRONMENT: 'production', FIRST_SUPERUSER_PASSWORD: 'a-real-password' }), 'SECRET_KEY'],
    ['ENVIRONMENT=production with the default superuser password', () => ({ ENVIRONMENT: 'production', ...key, FIRST_SUPERUSER_PASSWORD: 'changethis' }), 'FIRST_SUPERUSER_PASSWORD'],
    ['EMAIL_BACKEND=console outside local', () => ({ ENVIRONMENT: 'staging', ...key, FIRST_SUPERUSER_PASSWORD: 'a-real-password', EMAIL_BACKEND: 'console' }), 'EMAIL_BACKEND'],
    ['DATA_DIR is a file', () => ({ DATA_DIR: fileDir() }), 'DATA_DIR'],
    ['DATA_DIR is a file, SECRET_KEY given', () => ({ DATA_DIR: fileDir(), ...key }), 'DATA_DIR'],
    ['the data directory is read-only', () => ({ DATA_DIR: readOnlyDir(), ...key }), 'DATA_DIR'],
    ['a .secret_key under 32 characters', () => ({ DATA_DIR: shortKeyDir() }), 'SECRET_KEY'],
    ['DATABASE_URL with a mysql:// scheme', () => ({ DATABASE_URL: 'mysql://root@127.0.0.1/keel' }), 'DATABASE_URL'],
    ['DATABASE_URL host not found', () => ({ DATABASE_URL: 'postgres://postgres@no-such-host.invalid:5432/keel' }), 'DATABASE_URL'],
    ['DATABASE_URL port refused', () => ({ DATABASE_URL: 'postgres://postgres@127.0.0.1:1/keel' }), 'DATABASE_URL'],
    ['DATABASE_URL unknown role', () => ({ DATABASE_URL: 'postgres://no_such_role_keel@127.0.0.1:5432/postgres' }), 'DATABASE_URL'],
    ['DATABASE_URL missing database', () => ({ DATABASE_URL: 'postgres://postgres@127.0.0.1:5432/no_such_database_keel' }), 'DATABASE_URL'],
    ['REDIS_URL unreachable', () => ({ REDIS_URL: 'redis://127.0.0.1:1' }), 'REDIS_URL'],
    ['STORAGE_BACKEND=s3 without S3_BUCKET', () => ({ STORAGE_BACKEND: 's3' }), 'S3_BUCKET'],
    ['`keel api` on an unmigrated database', () => ({ DATA_DIR: freshDir() }), 'keel migrate', ['api']],
  ];

  // Each case is a process that stops at start-up; they run side by side.
  it.concurrent.each(cases)('%s', async (_label, env, name, args = ['start']) => {
    const port = await freePort();
    const exited = await run(args, { PORT: String(port), ...env() });
    expect(exited.code, exited.stderr).toBe(1);
    expect(exited.stderr).toMatch(new RegExp(`\\b${name}\\b`));
    // One line: the operator's message, never a stack trace or an unprintable object.
    expect(exited.stderr.trim().split('\n'), exited.stderr).toHaveLength(1);
    expect(exited.stderr).not.toContain('[object Object]');
    // Nothing was served.
    await expect(fetch(`http://127.0.0.1:${port}/health`)).rejects.toThrow();
  }, 240_000);

  it('a port in use is found before any migration runs', async () => {
    const busy = createServer();
    await new Promise<void>((done) => busy.listen(0, '127.0.0.1', done));
    const { port } = busy.address() as AddressInfo;
    try {
      const exited = await run(['start'], { PORT: String(port), DATA_DIR: mkdtempSync(join(dataDir, 'busy-')) });
      expect(exited.code).toBe(1);
      expect(exited.stderr.trim()).toBe(`keel: PORT: 127.0.0.1:${port} is already in use (another Keel?): stop that process or choose another PORT (or --port)`);
      expect(exited.stdout).not.toContain('migration applied');
    } finally {
      busy.close();
    }
  }, 240_000);
});

describe('the command line', () => {
  const cases: [string[], number, RegExp][] = [
    [[], 2, /^Usage: keel <command>/],
    [['--help'], 0, /^Usage: keel <command>/],
    [['help', 'migrate'], 0, /^Usage: keel migrate \[up\]/],
    [['start', '--help'], 0, /^Usage: keel start \[--host HOST\] \[--port PORT\]/],
    [['api', '-h'], 0, /^Usage: keel api /],
    [['worker', '--help'], 0, /^Usage: keel worker/],
    [['migrate', '--help'], 0, /^Usage: keel migrate \[up\][\s\S]*Usage: keel migrate down[\s\S]*Usage: keel migrate status/],
    [['migrate', 'down', '--help'], 0, /^Usage: keel migrate down \[--to TAG \| --all\] \[--yes\]/],
    [['migrate', 'status', '-h'], 0, /^Usage: keel migrate status/],
    [['create-superuser', '--help'], 0, /^Usage: keel create-superuser --email EMAIL \[--reset-password\]/],
    [['start', '--port', '9000', '--bogus'], 2, /^keel start: unknown option --bogus \(see keel start --help\)$/],
    [['migrate', 'down', '--to'], 2, /^keel migrate down: --to needs a value/],
    [['migrate', 'down', '--all', '--to', '0000_init'], 2, /not both/],
    [['migrate', 'sideways'], 2, /^keel migrate: unknown action "sideways"/],
    [['migrate', 'status', 'extra'], 2, /^keel migrate status: unexpected argument "extra"/],
    [['create-superuser'], 2, /^keel create-superuser: --email is required/],
    [['create-superuser', '--email', 'nope'], 2, /is not a valid email address/],
    [['start', '--port', 'abc'], 2, /^keel start: --port takes a number/],
    [['frobnicate'], 2, /^keel: unknown command "frobnicate"/],
  ];

  it.concurrent.each(cases)('keel %j exits %i', async (args, code, pattern) => {
    const exited = await run(args);
    expect(exited.code, exited.stderr).toBe(code);
    const text = (code === 0 ? exited.stdout : exited.stderr).trim();
    expect(text).toMatch(pattern);
    if (code === 2 && args.length) expect(text.trim().split('\n')).toHaveLength(1);
    expect(text).not.toMatch(/^\s+at /m);
  }, 300_000);

  it('the README lists exactly the commands `keel --help` gives', async () => {
    const help = (await run(['--help'])).stdout;
    const fromHelp = [...help.matchAll(/^ {2}(\S.*)$/gm)].map((m) => m[1]!).filter((line) => !line.startsWith('help '));
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const table = readme.slice(readme.indexOf('| command | does |'));
    const fromReadme = [...table.slice(0, table.indexOf('\n\n')).matchAll(/^\| `([^`]+)` \|/gm)].map((m) => m[1]!.replace(/\\\|/g, '|'));
    expect(fromReadme).toEqual(fromHelp);
  }, 300_000);
});
