import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer, request as httpRequest } from 'node:http';
import { type AddressInfo, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { readMigrations } from '../../src/core/migrate.js';

import { ADMIN_EMAIL, ADMIN_PASSWORD, cliOn, isSuperuser, jsonLines, login, type Server, stop, token } from '../helpers/cli.js';
import { freePort, migratedDataDir, ROOT } from '../helpers/process.js';
import { SilentProxy } from '../helpers/silent-proxy.js';

// The `keel` command line where it meets the runtime, so CI runs this file on every Node it
// supports: a start, signals, prompts at a terminal, standard input that is not one, start-up
// errors from the network and the file system, argument parsing. What the commands do to the data
// (migrate down/up, create-superuser's cases, restarts) is the same JavaScript on any Node:
// cli-data.test.ts, run once. The data directory starts as a copy of the run's migrated database;
// a first start on an empty one (initdb, migrations, file modes) is process.test.ts's.

const TAGS = readMigrations().map((m) => m.tag);
const dataDir = mkdtempSync(join(tmpdir(), 'keel-cli-test-'));
const { run, atTerminal, start, killLeftovers } = cliOn(dataDir);

beforeAll(async () => {
  await migratedDataDir(dataDir);
});

afterAll(() => {
  killLeftovers();
  rmSync(dataDir, { recursive: true, force: true });
});

const status = async () => {
  const result = await run(['migrate', 'status']);
  expect(result.code, result.stderr).toBe(0);
  return result.stdout;
};

describe('keel start', () => {
  let server: Server | undefined;

  it('serves the API and creates the first superuser', async () => {
    server = await start();
    const ready = await fetch(`${server.base}/ready`);
    expect(ready.status).toBe(200);
    expect(await ready.json()).toMatchObject({ status: 'ready', database: 'pglite' });

    const headers = { authorization: `Bearer ${await token(server.base)}` };
    const me = await fetch(`${server.base}/api/v1/users/me`, { headers });
    expect(await me.json()).toMatchObject({ email: ADMIN_EMAIL, is_superuser: true, is_active: true });
  }, 240_000);

  it('SIGTERM lets in-flight requests finish, refuses new ones and exits 0', async () => {
    server ??= await start();
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
    // The logs, flushed at exit: JSON lines.
    const lines = jsonLines(exited.stdout);
    expect(lines.some((line) => line.msg === 'first superuser created')).toBe(true);
    expect(lines.some((line) => line.msg === 'shut down cleanly')).toBe(true);
    // SMTP is not configured: said once, with what it disables.
    expect(lines.filter((line) => /^email is off \(SMTP_HOST and EMAILS_FROM_EMAIL unset\): password-recovery/.test(String(line.msg)))).toHaveLength(1);
    // The password is not the default: no warning.
    expect(lines.some((line) => /default password/.test(String(line.msg)))).toBe(false);
  }, 240_000);
});

describe('at a terminal and without one', () => {
  const TYPED = 'typed-at-the-terminal';
  const PIPED = { email: 'piped@keel.test', password: 'piped-password-1' };

  it('migrate down refuses without --yes when standard input is not a terminal, and reverts nothing', async () => {
    const down = await run(['migrate', 'down']);
    expect(down.code).toBe(2);
    expect(down.stderr.trim()).toMatch(/^keel migrate down: would revert \S+ .*pass --yes to confirm$/);
    expect(down.stderr.trim().split('\n')).toHaveLength(1);
    const after = await status();
    for (const tag of TAGS) expect(after).toMatch(new RegExp(`^applied\\s+${tag}$`, 'm'));
  }, 240_000);

  it('migrate down at a terminal asks first; "n" reverts nothing', async () => {
    const { code, screen } = await atTerminal(['migrate', 'down', '--all'], {}, [[/Continue\? \[y\/N\]/, 'n']]);
    expect(screen).toMatch(/This will revert .*Continue\?/);
    expect(code).toBe(2);
    expect(screen).toMatch(/cancelled, nothing reverted/);
    expect(await status()).toMatch(new RegExp(`^applied\\s+${TAGS[0]}$`, 'm'));
  }, 240_000);

  it('create-superuser at a terminal: the password is hidden and asked twice; a mismatch changes nothing', async () => {
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

  it('create-superuser reads the password from standard input when it is not a terminal; `--port` overrides PORT', async () => {
    const piped = await run(['create-superuser', '--email', PIPED.email], {}, `${PIPED.password}\n`);
    expect(piped.code, piped.stderr).toBe(0);
    expect(piped.stdout.trim()).toBe(`${PIPED.email}: superuser created`);

    const server = await start({ PORT: '1' }, (port) => ['start', '--port', String(port)]);
    try {
      expect(await isSuperuser(server.base, PIPED.email, PIPED.password)).toBe(true);
      expect(await isSuperuser(server.base, 'typed@keel.test', TYPED)).toBe(true);
      expect((await login(server.base, 'mismatch@keel.test', 'first-password-1')).status).toBe(400);
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
  const cases: [string, () => Record<string, string>, string][] = [
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
    // Past the server's `databases` (16 by default): ioredis went on with database 0.
    ['REDIS_URL database number out of range', () => ({ REDIS_URL: 'redis://127.0.0.1:6379/99' }), 'REDIS_URL'],
    ['STORAGE_BACKEND=s3 without S3_BUCKET', () => ({ STORAGE_BACKEND: 's3' }), 'S3_BUCKET'],
  ];

  // Each case is a process that stops at start-up; they run side by side.
  it.concurrent.each(cases)('%s', async (_label, env, name) => {
    const port = await freePort();
    const exited = await run(['start'], { PORT: String(port), ...env() });
    expect(exited.code, exited.stderr).toBe(1);
    expect(exited.stderr).toMatch(new RegExp(`\\b${name}\\b`));
    // One line: the operator's message, never a stack trace or an unprintable object.
    expect(exited.stderr.trim().split('\n'), exited.stderr).toHaveLength(1);
    expect(exited.stderr).not.toContain('[object Object]');
    // Nothing was served.
    await expect(fetch(`http://127.0.0.1:${port}/health`)).rejects.toThrow();
  }, 240_000);

  it.concurrent.each([
    ['local', {}],
    ['SECRET_KEY given', key],
  ])('DATA_DIR naming a file (%s): the line says it is a file', async (_label, env) => {
    const file = fileDir();
    const exited = await run(['start'], { PORT: String(await freePort()), DATA_DIR: file, ...env });
    expect(exited.code, exited.stderr).toBe(1);
    expect(exited.stderr.trim()).toBe(`keel: DATA_DIR: ${file} is a file, not a directory: set DATA_DIR to a directory (it is created if missing), or move the file away`);
  }, 240_000);

  it('DATABASE_URL asking for TLS (sslmode=require) of a server without it: one line naming the setting and the fix', async () => {
    // What a PostgreSQL server without TLS answers to the client's SSLRequest: "N".
    const plain = createServer((socket) => socket.once('data', () => socket.write('N')));
    await new Promise<void>((done) => plain.listen(0, '127.0.0.1', done));
    const { port } = plain.address() as AddressInfo;
    try {
      const exited = await run(['start'], { PORT: String(await freePort()), DATABASE_URL: `postgres://postgres@127.0.0.1:${port}/keel?sslmode=require` });
      expect(exited.code, exited.stderr).toBe(1);
      // Keel's line alone: node-postgres's own multi-line warning about sslmode's meaning came before it.
      expect(exited.stderr.trim()).toBe(
        `keel: DATABASE_URL: the URL asks for TLS (sslmode or ssl) but PostgreSQL at 127.0.0.1:${port} does not support SSL connections: enable SSL on the server, or remove sslmode (or set sslmode=disable) in DATABASE_URL`,
      );
      // Its substance once, in Keel's log.
      const warnings = jsonLines(exited.stdout).filter((line) => String(line.msg).includes('sslmode=require'));
      expect(warnings.map((line) => [line.level, line.msg])).toEqual([
        [
          40,
          "DATABASE_URL: sslmode=require is taken as verify-full by node-postgres (TLS required, the server's certificate checked against trusted CAs and the host name), not with libpq's meaning (it never falls back to plain text either); write sslmode=verify-full to say so, or sslmode=disable for a server without TLS",
        ],
      ]);
    } finally {
      plain.close();
    }
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

// Mounting a file system needs root.
describe.skipIf(process.getuid?.() !== 0)('a DATA_DIR on a read-only file system', () => {
  const mounted = join(dataDir, 'read-only');
  beforeAll(() => {
    mkdirSync(mounted);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m,ro', 'tmpfs', mounted]);
  });
  afterAll(() => execFileSync('umount', [mounted]));

  it('says the file system is read-only, naming DATA_DIR (Node\'s mkdir said ENOENT)', async () => {
    const exited = await run(['start'], { PORT: String(await freePort()), DATA_DIR: mounted, SECRET_KEY: 's'.repeat(48) });
    expect(exited.code, exited.stderr).toBe(1);
    expect(exited.stderr.trim()).toBe(`keel: DATA_DIR: cannot open the embedded database in ${join(mounted, 'pglite')}: its file system is read-only: mount it read-write, or set DATA_DIR to a writable directory`);
  }, 60_000);
});

describe('a Redis that accepts connections and never answers (a paused server or proxy)', () => {
  let proxy: SilentProxy;

  beforeAll(async () => {
    // Silent from the first byte: the target is never spoken to, so no Redis need run there.
    proxy = await SilentProxy.start({ host: '127.0.0.1', port: 6379 });
    proxy.fallSilent();
  });

  afterAll(() => proxy.close());

  it.concurrent.each([['api'], ['worker']])('keel %s exits 1 within seconds, naming REDIS_URL', async (command) => {
    const started = Date.now();
    const exited = await run([command], { PORT: String(await freePort()), REDIS_URL: proxy.url('redis://127.0.0.1:6379/15') });
    expect(exited.code, exited.stderr).toBe(1);
    expect(exited.stderr.trim()).toBe(
      `keel: REDIS_URL: no answer from 127.0.0.1:${proxy.port} within 3000 ms: is Redis running there (not paused), and is the port right?; start Redis, fix REDIS_URL, or unset it to run without Redis`,
    );
    // The check's own bound (3 s) and a process start, not the test's timeout.
    expect(Date.now() - started).toBeLessThan(20_000);
  }, 40_000);
});

describe('a REDIS_URL whose port is not Redis (an HTTP server, PostgreSQL)', () => {
  const fix = "check that the port is Redis's (6379 by default) and not another service's, and whether the server wants TLS (rediss://); start Redis, fix REDIS_URL, or unset it to run without Redis";
  // ioredis said only "Connection is closed." (PostgreSQL drops a connection whose first bytes are
  // not its start-up message), "Unknown RESP type 72 "H". Please report this." for an HTTP answer, or EPIPE.
  it.concurrent.each([
    ['an HTTP server', () => createHttpServer((_request, response) => response.end('hello'))],
    ['a server that closes the connection at the first bytes', () => createServer((socket) => socket.once('data', () => socket.end()))],
  ])('%s: one line naming host:port, without the password', async (_label, make) => {
    const other = make();
    await new Promise<void>((done) => other.listen(0, '127.0.0.1', done));
    const { port } = other.address() as AddressInfo;
    try {
      const exited = await run(['api'], { PORT: String(await freePort()), SECRET_KEY: 's'.repeat(48), REDIS_URL: `redis://:not-redis-secret@127.0.0.1:${port}/10` });
      expect(exited.code, exited.stderr).toBe(1);
      expect(exited.stderr.trim()).toBe(`keel: REDIS_URL: 127.0.0.1:${port} is not answering as Redis (it hung up, or answered in another protocol): ${fix}`);
      expect(exited.stdout + exited.stderr).not.toContain('not-redis-secret');
    } finally {
      other.close();
    }
  }, 60_000);
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
