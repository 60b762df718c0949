import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, afterEach, describe, expect, it } from 'vitest';

import { exists, freePort, healthy, KEEL, keel, killLeftovers, launch, migratedDataDir, ROOT } from '../helpers/process.js';

// Real processes on real data directories: the lock, file modes, signals, log flushing and drain.
const scratch = mkdtempSync(join(tmpdir(), 'keel-process-test-'));
let dirs = 0;
/** An empty DATA_DIR: the start creates the database (initdb) and migrates it. */
const freshDir = () => join(scratch, `data-${++dirs}`);
/** A DATA_DIR with the database already created and migrated, for tests of a running server. */
const migratedDir = () => migratedDataDir(freshDir());

afterEach(killLeftovers);
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

const PASSWORD = 'process-test-password';

function env(dataDir: string, extra: Record<string, string> = {}): Record<string, string> {
  return {
    ENVIRONMENT: 'local',
    DATA_DIR: dataDir,
    HOST: '127.0.0.1',
    LOG_FORMAT: 'json',
    LOG_LEVEL: 'info',
    FIRST_SUPERUSER: 'admin@process.test',
    FIRST_SUPERUSER_PASSWORD: PASSWORD,
    ...extra,
  };
}

/** `keel start` on a free port, answering /health; `as` another user. */
async function server(dataDir: string, extra: Record<string, string> = {}, as: { uid: number; gid: number } | null = null) {
  const port = await freePort();
  const child = keel(['start'], env(dataDir, { PORT: String(port), ...extra }), as);
  const base = `http://127.0.0.1:${port}`;
  await healthy(child, base);
  return { child, base };
}

async function signup(base: string, email: string): Promise<number> {
  const response = await fetch(`${base}/api/v1/users/signup`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ email, password: PASSWORD }),
  });
  return response.status;
}

describe('one process per embedded database', () => {
  it('a second process on the same DATA_DIR stops at once naming the holder; kill -9 leaves a lock the next start takes over', async () => {
    const dataDir = await migratedDir();
    const first = await server(dataDir);
    expect(await signup(first.base, 'kept@process.test')).toBe(200);

    // Every command that opens the database refuses, with one line naming the holder's pid. The two
    // servers get a port each: both probe their port before the lock, and one port probed by both at
    // once is in use for one of them.
    const others = [
      keel(['start'], env(dataDir, { PORT: String(await freePort()) })),
      keel(['api'], env(dataDir, { PORT: String(await freePort()) })),
      keel(['migrate'], env(dataDir)),
      keel(['migrate', 'status'], env(dataDir)),
    ];
    for (const other of others) {
      const { code } = await other.ended;
      expect(code, other.out()).toBe(1);
      expect(other.err().trim().split('\n')).toHaveLength(1);
      expect(other.err()).toContain(`in use by another Keel process (pid ${first.child.pid})`);
    }

    // create-superuser says how to do it instead.
    const superuser = keel(['create-superuser', '--email', 'second@process.test'], env(dataDir, { KEEL_SUPERUSER_PASSWORD: PASSWORD }));
    expect((await superuser.ended).code).toBe(1);
    expect(superuser.err()).toContain(`a running Keel server (pid ${first.child.pid})`);
    expect(superuser.err()).toMatch(/Stop the server first, or .* through the API \(POST \/api\/v1\/users\)/);

    // The first server never noticed: still serving, its data intact.
    expect(await signup(first.base, 'later@process.test')).toBe(200);

    // A crash leaves the lock file behind; its pid is dead, so the next start takes it over.
    first.child.process.kill('SIGKILL');
    await first.child.ended;
    expect(existsSync(join(dataDir, 'pglite', 'keel.lock'))).toBe(true);
    const second = await server(dataDir);
    expect(JSON.parse(readFileSync(join(dataDir, 'pglite', 'keel.lock'), 'utf8'))).toMatchObject({ pid: second.child.pid });
    expect(await signup(second.base, 'kept@process.test')).toBe(409); // acknowledged before the crash: still there
    second.child.process.kill('SIGTERM');
    expect((await second.child.ended).code).toBe(0);
    // Released on a clean exit: create-superuser now works.
    expect(existsSync(join(dataDir, 'pglite', 'keel.lock'))).toBe(false);
    const created = keel(['create-superuser', '--email', 'second@process.test'], env(dataDir, { KEEL_SUPERUSER_PASSWORD: PASSWORD }));
    expect((await created.ended).code, created.err()).toBe(0);

    // A lock left on another host (a container replaced after a crash): create-superuser names that host and the file to remove, not a server to stop.
    const lock = join(dataDir, 'pglite', 'keel.lock');
    writeFileSync(lock, JSON.stringify({ pid: 1, started: null, host: 'replaced-container' }));
    const elsewhere = keel(['create-superuser', '--email', 'third@process.test'], env(dataDir, { KEEL_SUPERUSER_PASSWORD: PASSWORD }));
    expect((await elsewhere.ended).code).toBe(1);
    expect(elsewhere.err()).toContain(`create-superuser: the embedded database ${join(dataDir, 'pglite')} is in use by a Keel process on host replaced-container (pid 1)`);
    expect(elsewhere.err()).toContain(`remove ${lock}`);
  }, 400_000);
});

/** A user other than root: `nobody`. */
const NOBODY = { uid: 65534, gid: 65534 };

function chownTree(path: string, owner: { uid: number; gid: number }): void {
  chownSync(path, owner.uid, owner.gid);
  if (lstatSync(path).isDirectory()) for (const name of readdirSync(path)) chownTree(join(path, name), owner);
}

const lockHolder = (path: string) => (JSON.parse(readFileSync(path, 'utf8')) as { pid: number }).pid;

/**
 * Whether `user` can run this checkout's `keel` with this Node: starting it needs root, and neither
 * may sit in a directory only root enters (CI's Node 24 is in a 0700 scratch directory; a checkout
 * may be under /root).
 */
function canRunKeelAs(user: { uid: number; gid: number }): boolean {
  if (process.getuid?.() !== 0) return false;
  return spawnSync(process.execPath, [KEEL, 'help'], { cwd: ROOT, env: { PATH: process.env.PATH, HOME: tmpdir() }, stdio: 'ignore', ...user }).status === 0;
}

describe.skipIf(!canRunKeelAs(NOBODY))('a data directory whose parent Keel cannot write', () => {
  it('a non-root Keel on a volume reached through a symlink starts; a second process (root too) and an older version\'s live lock beside it are refused; kill -9 is taken over; an unwritable directory names the lock file', async () => {
    // This test file's scratch directory is 0700 (mkdtemp): let the other user through.
    chmodSync(scratch, 0o755);
    // Root's and 0755, as / above a volume at /data, or a root-owned /app above /app/data.
    // (chmod: the run's umask may be 077, set by the PGlite the global setup opened.)
    const volumes = join(scratch, 'volumes');
    mkdirSync(volumes);
    chmodSync(volumes, 0o755);
    const volume = join(await migratedDataDir(volumes), 'pglite');
    chownTree(volume, NOBODY);
    const home = join(scratch, 'nobody-home');
    mkdirSync(home, { mode: 0o700 });
    chownSync(home, NOBODY.uid, NOBODY.gid);
    const link = join(home, 'pglite');
    symlinkSync(volume, link);
    const dataDir = join(home, 'data');
    const settings = { PGLITE_DATA_DIR: link, HOME: home };
    const inside = join(volume, 'keel.lock');

    const first = await server(dataDir, settings, NOBODY);
    expect(lockHolder(inside)).toBe(first.child.pid);
    expect(await signup(first.base, 'volume@process.test')).toBe(200);

    // Root, on the same directory by its own path: refused by the same lock, and leaves none of its own.
    const asRoot = keel(['migrate', 'status'], env(join(scratch, 'root-data'), { PGLITE_DATA_DIR: `${volume}/` }));
    expect((await asRoot.ended).code, asRoot.out()).toBe(1);
    expect(asRoot.err()).toContain(`in use by another Keel process (pid ${first.child.pid})`);
    expect(lockHolder(inside)).toBe(first.child.pid);
    const beside = `${volume}.lock`;
    expect(existsSync(beside)).toBe(false);

    // kill -9: the next start takes the lock over.
    first.child.process.kill('SIGKILL');
    await first.child.ended;
    const second = await server(dataDir, settings, NOBODY);
    expect(lockHolder(inside)).toBe(second.child.pid);
    expect(await signup(second.base, 'volume@process.test')).toBe(409);
    second.child.process.kill('SIGTERM');
    expect((await second.child.ended).code).toBe(0);
    expect(existsSync(inside)).toBe(false);

    // A process of an older version holds the lock it took beside the directory (here: this live process).
    writeFileSync(beside, JSON.stringify({ pid: process.pid, started: null, host: hostname() }));
    // Private (as an older version running as root leaves it): a lock this user cannot read is not taken for stale.
    chmodSync(beside, 0o600);
    const unreadable = keel(['migrate', 'status'], env(dataDir, settings), NOBODY);
    expect((await unreadable.ended).code, unreadable.out()).toBe(1);
    expect(unreadable.err()).toContain(`PGLITE_DATA_DIR: cannot read the lock file ${beside} (EACCES)`);
    chmodSync(beside, 0o644);
    const refused = keel(['migrate', 'status'], env(dataDir, settings), NOBODY);
    expect((await refused.ended).code, refused.out()).toBe(1);
    expect(refused.err()).toContain(`in use by another Keel process (pid ${process.pid})`);
    expect(existsSync(inside)).toBe(false);
    // Its holder gone (no pid is above 2^22 on Linux): this user cannot remove it, and it is no longer in the way.
    const deadHolder = JSON.stringify({ pid: 2 ** 22 + 1, started: null, host: hostname() });
    writeFileSync(beside, deadHolder);
    const opened = keel(['migrate', 'status'], env(dataDir, settings), NOBODY);
    expect((await opened.ended).code, opened.err()).toBe(0);
    expect(readFileSync(beside, 'utf8')).toBe(deadHolder);
    expect(existsSync(inside)).toBe(false);

    // A directory this user cannot write: one line naming the lock file and the cause.
    const readOnly = join(volumes, 'read-only');
    mkdirSync(readOnly);
    chmodSync(readOnly, 0o755);
    const denied = keel(['migrate'], env(dataDir, { PGLITE_DATA_DIR: readOnly, HOME: home }), NOBODY);
    expect((await denied.ended).code, denied.out()).toBe(1);
    expect(denied.err().trim().split('\n')).toHaveLength(1);
    expect(denied.err()).toContain(`PGLITE_DATA_DIR: cannot take the lock file ${join(readOnly, 'keel.lock')} (EACCES): make ${readOnly} writable by this user (uid ${NOBODY.uid})`);
  }, 300_000);
});

describe('file modes', () => {
  it('DATA_DIR is 0700 and every file 0600, with umask 000, WAL files written after start included', async () => {
    const dataDir = freshDir();
    const port = await freePort();
    const child = launch('sh', ['-c', 'umask 000 && exec "$0" bin/keel.js start', process.execPath], env(dataDir, { PORT: String(port) }));
    const base = `http://127.0.0.1:${port}`;
    await healthy(child, base);
    expect(await signup(base, 'modes@process.test')).toBe(200);
    child.process.kill('SIGTERM');
    expect((await child.ended).code).toBe(0);

    // Files PostgreSQL creates after the database is open: a table and new WAL segments.
    const walBefore = new Set(readdirSync(join(dataDir, 'pglite', 'pg_wal')));
    const writer = launch('sh', ['-c', 'umask 000 && exec "$0" --import tsx test/helpers/wal-writer.ts', process.execPath], env(dataDir));
    expect((await writer.ended).code, writer.err()).toBe(0);
    const walAfter = readdirSync(join(dataDir, 'pglite', 'pg_wal')).filter((name) => !walBefore.has(name));
    expect(walAfter.length).toBeGreaterThan(0);

    const loose: string[] = [];
    const walk = (path: string) => {
      const stat = lstatSync(path);
      if ((stat.mode & 0o777) !== (stat.isDirectory() ? 0o700 : 0o600)) loose.push(`${path} ${(stat.mode & 0o777).toString(8)}`);
      if (stat.isDirectory()) for (const name of readdirSync(path)) walk(join(path, name));
    };
    walk(dataDir);
    expect(loose).toEqual([]);
    expect(readdirSync(join(dataDir, 'pglite')).length).toBeGreaterThan(10);
  }, 300_000);
});

describe('logs', () => {
  it('JSON logs reach stdout within a second: after kill -9 every answered request has its access line', async () => {
    const { child, base } = await server(await migratedDir());
    const ids: string[] = [];
    for (let i = 0; i < 40; i++) {
      const response = await fetch(`${base}/api/v1/users/me`);
      expect(response.status).toBe(401);
      ids.push(response.headers.get('x-request-id')!);
    }
    await new Promise((done) => setTimeout(done, 1_500));
    child.process.kill('SIGKILL');
    await child.ended;
    const logged = new Set(
      child
        .out()
        .split('\n')
        .filter((line) => line.startsWith('{'))
        .map((line) => JSON.parse(line) as { msg: string; reqId?: string })
        .filter((line) => line.msg === 'request completed')
        .map((line) => line.reqId),
    );
    expect(ids.filter((id) => !logged.has(id))).toEqual([]);
  }, 300_000);
});

describe('SIGTERM', () => {
  it('drains first: /ready answers 503 while requests are still served, then the process exits 0', async () => {
    // Long enough for five sign-ups (a password hash each) on a loaded CI machine: at 3 s the drain once ended mid-loop.
    const { child, base } = await server(await migratedDir(), { SHUTDOWN_DRAIN_MS: '8000' });
    expect((await fetch(`${base}/ready`)).status).toBe(200);
    const signalled = Date.now();
    child.process.kill('SIGTERM');
    await new Promise((done) => setTimeout(done, 500));
    const ready = await fetch(`${base}/ready`);
    expect(ready.status).toBe(503);
    expect(await ready.json()).toMatchObject({ status: 'unavailable', checks: { shutdown: 'unavailable' } });
    // New connections are still served during the drain, and asked to go elsewhere afterwards.
    for (let i = 0; i < 5; i++) {
      const response = await fetch(`${base}/health`);
      expect(response.status).toBe(200);
      expect(response.headers.get('connection')).toBe('close');
      expect(await signup(base, `drain-${i}@process.test`)).toBe(200);
    }
    expect(child.done()).toBe(false);
    const { code } = await child.ended;
    expect(code).toBe(0);
    expect(Date.now() - signalled).toBeGreaterThanOrEqual(8_000);
    expect(child.out()).toContain('shut down cleanly');
  }, 300_000);

  it.each([
    ['npm start', ['start']],
    ['npm run keel -- start', ['run', 'keel', '--', 'start']],
  ])('SIGTERM to `%s` (the process the user started) stops Keel cleanly', async (_name, args) => {
    const dataDir = await migratedDir();
    const port = await freePort();
    const npm = launch('npm', args, env(dataDir, { PORT: String(port) }));
    const base = `http://127.0.0.1:${port}`;
    await healthy(npm, base);
    // The lock file names the server's pid: the node process under npm.
    const serverPid = (JSON.parse(readFileSync(join(dataDir, 'pglite', 'keel.lock'), 'utf8')) as { pid: number }).pid;
    expect(serverPid).not.toBe(npm.pid);
    npm.process.kill('SIGTERM');
    await npm.ended;
    expect(npm.out()).toContain('shut down cleanly');
    expect(exists(serverPid)).toBe(false);
    expect(existsSync(join(dataDir, 'pglite', 'keel.lock'))).toBe(false);
    await expect(fetch(`${base}/health`)).rejects.toThrow();
  }, 300_000);
});
