import { spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { pathToFileURL } from 'node:url';

import { sql } from 'drizzle-orm';
import { afterAll, describe, expect, inject, it } from 'vitest';

import { loadSettings } from '../../src/core/config.js';
import { DataDirLockedError } from '../../src/core/data-dir-lock.js';
import { openDatabase } from '../../src/core/db.js';

import { bundle } from '../../scripts/bundle.mjs';

const scratch = mkdtempSync(join(tmpdir(), 'keel-lock-test-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

const settingsFor = (dataDir: string) => loadSettings({ ENVIRONMENT: 'local', SECRET_KEY: 'x'.repeat(40), PGLITE_DATA_DIR: dataDir });

/** What opening the embedded database at `dataDir` throws; a database that opened is closed again (two on one directory overwrite each other's writes). */
async function openingError(dataDir: string): Promise<unknown> {
  try {
    const database = await openDatabase(settingsFor(dataDir));
    await database.close();
    return undefined;
  } catch (error) {
    return error;
  }
}

// The embedded database's own: a run on PostgreSQL (DATABASE_URL) has no migrated PGlite directory to copy.
describe.skipIf(inject('templatePgliteDir') === null)('the embedded database lock', () => {
  // The lock is what makes the release of every credit reservation at an embedded start safe (any
  // reservation found is a dead process's): a second process that gets it on a directory in use
  // would free the live process's holds, and both would write one PGlite directory.
  it('holds the directory however its path is spelled: with a trailing slash, through a symlink, relative, with . and ..', async () => {
    const dir = join(scratch, 'pglite');
    cpSync(inject('templatePgliteDir')!, dir, { recursive: true });
    const link = join(scratch, 'link');
    symlinkSync(dir, link);
    const held = await openDatabase(settingsFor(dir));
    try {
      for (const spelling of [`${dir}/`, `${scratch}/./pglite`, `${link}/../pglite`, link, relative(process.cwd(), dir)]) {
        const error = await openingError(spelling);
        expect(error, spelling).toBeInstanceOf(DataDirLockedError);
        expect((error as DataDirLockedError).holder).toBe(process.pid);
      }
    } finally {
      await held.close();
    }
    // Released with the database: another spelling opens it now.
    expect(await openingError(`${dir}/`)).toBeUndefined();
  });

  it('locks keel.lock inside the directory, and the older versions\' <dir>.lock beside it where it can; an older version\'s live lock there refuses the open', async () => {
    const dir = join(scratch, 'upgraded');
    cpSync(inject('templatePgliteDir')!, dir, { recursive: true });
    const held = await openDatabase(settingsFor(dir));
    try {
      for (const lock of [join(dir, 'keel.lock'), `${dir}.lock`]) expect(JSON.parse(readFileSync(lock, 'utf8')), lock).toMatchObject({ pid: process.pid });
    } finally {
      await held.close();
    }
    expect(existsSync(join(dir, 'keel.lock'))).toBe(false);
    expect(existsSync(`${dir}.lock`)).toBe(false);

    // A process of an older version holds the directory by the lock beside it (here: this live process's pid).
    writeFileSync(`${dir}.lock`, JSON.stringify({ pid: process.pid, started: null, host: hostname() }));
    const error = await openingError(dir);
    expect(error).toBeInstanceOf(DataDirLockedError);
    expect((error as DataDirLockedError).holder).toBe(process.pid);
    expect(existsSync(join(dir, 'keel.lock'))).toBe(false);
  });

  it('refuses a lock held on another host (it cannot be checked from here), naming the host and the lock file to remove once no Keel runs there: a container replaced after a crash has a new hostname', async () => {
    const dir = join(scratch, 'other-host');
    cpSync(inject('templatePgliteDir')!, dir, { recursive: true });
    const lock = join(dir, 'keel.lock');
    writeFileSync(lock, JSON.stringify({ pid: 1, started: null, host: 'keel-7f9c-old-container' }));
    const error = await openingError(dir);
    expect(error).toBeInstanceOf(DataDirLockedError);
    expect((error as Error).message).toBe(
      `the embedded database ${dir} is in use by a Keel process on host keel-7f9c-old-container (pid 1), which cannot be checked from here; stop it first, or, if no Keel runs there any more (a container replaced after a crash), remove ${lock}`,
    );
    // Removed as the message says: the database opens.
    rmSync(lock);
    expect(await openingError(dir)).toBeUndefined();
  });

  it('lets exactly one of many processes that start at the same moment take the lock, a stale lock (kill -9) left in their way', async () => {
    const dir = join(scratch, 'contended');
    mkdirSync(dir);
    // The lock a killed process left: its pid is no process's.
    writeFileSync(join(dir, 'keel.lock'), JSON.stringify({ pid: 2 ** 22 + 1, started: null, host: hostname() }));
    // The lock's module as the build bundles it (plain JavaScript: a dozen processes start at once).
    const built = join(scratch, 'built');
    await bundle(join(import.meta.dirname, '../..'), built, { 'data-dir-lock': 'src/core/data-dir-lock.ts' });
    const lockModule = pathToFileURL(join(built, 'data-dir-lock.js')).href;
    const at = Date.now() + 1500;
    // Each waits for the same moment, tries and says what it got; a winner holds the lock until every
    // one has answered (its standard input ends), so a starter the machine made late cannot find it free.
    const script = `const { lockDirectory } = await import(${JSON.stringify(lockModule)});
      while (Date.now() < ${at});
      try { lockDirectory(${JSON.stringify(dir)}); console.log('got'); process.stdin.resume(); process.stdin.on('end', () => process.exit(0)); }
      catch (error) { console.log(error.constructor.name); }`;
    const starters = Array.from({ length: 12 }, () => spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['pipe', 'pipe', 'inherit'] }));
    const ended = starters.map((child) => new Promise((resolve) => child.once('exit', resolve)));
    const said = await Promise.all(starters.map((child) => new Promise<string>((resolve) => child.stdout.once('data', (data: Buffer) => resolve(data.toString().trim())))));
    for (const child of starters) child.stdin.end();
    await Promise.all(ended);
    expect(said.filter((word) => word === 'got'), said.join(' ')).toHaveLength(1);
    expect(said.filter((word) => word !== 'got' && word !== 'DataDirLockedError'), said.join(' ')).toEqual([]);
    // Released by the winner's exit, nothing left behind: no drafts, no stale copies.
    expect(readdirSync(dir)).toEqual([]);
  });

  it('opens a data directory named through a symlink (a volume mounted elsewhere) as the directory it points to', async () => {
    const dir = join(scratch, 'real-pglite');
    cpSync(inject('templatePgliteDir')!, dir, { recursive: true });
    const link = join(scratch, 'linked-pglite');
    symlinkSync(dir, link);
    const linked = await openDatabase(settingsFor(link));
    try {
      await linked.db.execute(sql`create table through_link (n int)`);
    } finally {
      await linked.close();
    }
    const direct = await openDatabase(settingsFor(dir));
    try {
      const found = await direct.db.execute(sql`select to_regclass('through_link') is not null as found`);
      expect((found as { rows: unknown[] }).rows).toEqual([{ found: true }]);
    } finally {
      await direct.close();
    }
  });
});
