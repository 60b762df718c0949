import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { readMigrations } from '../../src/core/migrate.js';

import { ADMIN_EMAIL, ADMIN_PASSWORD, cliOn, isSuperuser, jsonLines, login, stop, token } from '../helpers/cli.js';
import { eventually } from '../helpers/http.js';
import { freePort, migratedDataDir } from '../helpers/process.js';

// What the `keel` commands do to the data: restarts, migrate down/up/status, create-superuser's
// cases, the default-password warning and console email. The same JavaScript on any Node, so CI
// runs this file once; what meets the runtime (first start, signals, terminals, pipes, start-up
// errors, argument parsing) is cli.test.ts, run on every Node. The data directory starts as a copy
// of the run's migrated database: the first start on an empty one is cli.test.ts's.

const TAGS = readMigrations().map((m) => m.tag);
const dataDir = mkdtempSync(join(tmpdir(), 'keel-cli-data-test-'));
const { run, start, killLeftovers } = cliOn(dataDir);

beforeAll(async () => {
  await migratedDataDir(dataDir);
});

afterAll(() => {
  killLeftovers();
  rmSync(dataDir, { recursive: true, force: true });
});

describe('keel start, twice', () => {
  let firstToken = '';
  let projectId = '';

  it('the first start creates the first superuser and shuts down cleanly', async () => {
    const server = await start();
    firstToken = await token(server.base);
    const headers = { authorization: `Bearer ${firstToken}`, 'content-type': 'application/json' };
    const project = await fetch(`${server.base}/api/v1/projects`, { method: 'POST', headers, body: JSON.stringify({ name: 'Kept across restarts' }) });
    expect(project.status).toBe(200);
    projectId = ((await project.json()) as { id: string }).id;

    const exited = await stop(server);
    expect(exited.code).toBe(0);
    const lines = jsonLines(exited.stdout);
    expect(lines.some((line) => line.msg === 'first superuser created')).toBe(true);
    expect(lines.some((line) => line.msg === 'shut down cleanly')).toBe(true);
  }, 240_000);

  it('a second start keeps the data and leaves the existing superuser as it is', async () => {
    // A different password in the settings must not touch the existing account.
    const server = await start({ FIRST_SUPERUSER_PASSWORD: 'another-password-now' });
    try {
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
    } finally {
      const exited = await stop(server);
      expect(exited.code).toBe(0);
      expect(jsonLines(exited.stdout).some((line) => line.msg === 'first superuser created')).toBe(false);
    }
  }, 240_000);
});

describe('keel migrate', () => {
  const status = async () => {
    const result = await run(['migrate', 'status']);
    expect(result.code, result.stderr).toBe(0);
    return result.stdout;
  };

  it('down --to with an unknown tag lists the valid ones', async () => {
    const down = await run(['migrate', 'down', '--to', 'nope', '--yes']);
    expect(down.code).toBe(2);
    for (const tag of TAGS) expect(down.stderr).toContain(tag);
    expect(down.stderr.trim().split('\n')).toHaveLength(1);
  }, 240_000);

  it('down --yes reverts only the newest migration; `keel api` then refuses naming that one migration', async () => {
    const down = await run(['migrate', 'down', '--yes']);
    expect(down.code, down.stderr).toBe(0);
    expect(down.stdout).toContain(`reverted ${TAGS.at(-1)}`);
    // One `migrate status` (a process opening the database) read for every tag.
    const after = await status();
    expect(after).toMatch(new RegExp(`^pending\\s+${TAGS.at(-1)}$`, 'm'));
    for (const tag of TAGS.slice(0, -1)) expect(after).toMatch(new RegExp(`^applied\\s+${tag}$`, 'm'));

    // One pending: named alone, in the singular (the next test sees the count, first and last of many).
    const port = await freePort();
    const api = await run(['api'], { PORT: String(port) });
    expect(api.code, api.stderr).toBe(1);
    expect(api.stderr.trim()).toBe(`keel: the database is not migrated: 1 migration pending (${TAGS.at(-1)}): run \`keel migrate\` first`);
    await expect(fetch(`http://127.0.0.1:${port}/health`)).rejects.toThrow();
  }, 240_000);

  it('down --all --yes reverts every migration; create-superuser and `keel api` then ask for `keel migrate`', async () => {
    const down = await run(['migrate', 'down', '--all', '--yes']);
    expect(down.code, down.stderr).toBe(0);
    const after = await status();
    for (const tag of TAGS) expect(after).toMatch(new RegExp(`^pending\\s+${tag}$`, 'm'));

    const create = await run(['create-superuser', '--email', 'early@keel.test'], { KEEL_SUPERUSER_PASSWORD: 'early-password-1' });
    expect(create.code).toBe(1);
    // The count, the first and the last, not every tag on one line.
    const notMigrated = `keel: the database is not migrated: ${TAGS.length} migrations pending (${TAGS[0]} to ${TAGS.at(-1)}): run \`keel migrate\` first`;
    expect(create.stderr.trim()).toBe(notMigrated);

    // A start-up problem: one line, nothing served.
    const port = await freePort();
    const api = await run(['api'], { PORT: String(port) });
    expect(api.code, api.stderr).toBe(1);
    expect(api.stderr.trim()).toBe(notMigrated);
    expect(api.stderr).not.toContain('[object Object]');
    await expect(fetch(`http://127.0.0.1:${port}/health`)).rejects.toThrow();

    const up = await run(['migrate']);
    expect(up.code, up.stderr).toBe(0);
    const migrated = await status();
    for (const tag of TAGS) expect(migrated).toMatch(new RegExp(`^applied\\s+${tag}$`, 'm'));
  }, 300_000);
});

describe('create-superuser, account checks and console email', () => {
  const PLAIN = { promote: 'promote-me@keel.test', reset: 'reset-me@keel.test', password: 'plain-password-1' };
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
    // The recovery email is logged once its sending (after the answer) gets there: waited for, not slept on.
    await eventually(() => Promise.resolve(server.output().stdout.includes('email not sent (EMAIL_BACKEND=console)')), 30_000);
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

  it('an existing account is promoted and keeps its password unless --reset-password', async () => {
    const promote = await run(['create-superuser', '--email', PLAIN.promote], { KEEL_SUPERUSER_PASSWORD: 'ignored-password-1' });
    expect(promote.code, promote.stderr).toBe(0);
    expect(promote.stdout.trim()).toBe(`${PLAIN.promote}: promoted to superuser (password unchanged; --reset-password sets a new one)`);

    const reset = await run(['create-superuser', '--email', PLAIN.reset, '--reset-password'], {}, 'piped-password-1\n');
    expect(reset.code, reset.stderr).toBe(0);
    expect(reset.stdout.trim()).toBe(`${PLAIN.reset}: promoted to superuser, password reset`);

    const nothing = await run(['create-superuser', '--email', PLAIN.promote]);
    expect(nothing.stdout).toContain('already an active superuser, nothing changed');

    const server = await start();
    try {
      expect(await isSuperuser(server.base, PLAIN.promote, PLAIN.password)).toBe(true);
      expect(await isSuperuser(server.base, PLAIN.reset, 'piped-password-1')).toBe(true);
      expect((await login(server.base, PLAIN.reset, PLAIN.password)).status).toBe(400);
    } finally {
      expect((await stop(server)).code).toBe(0);
    }
  }, 300_000);
});
