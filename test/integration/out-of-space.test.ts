/**
 * A DATA_DIR whose disk fills up (an upload's file, the extracted text an ingestion writes) and a
 * database out of disk (SQLSTATE 53100): the client is told 507 with a `{detail}` saying so, not a
 * 500; nothing half-written stays; an ingestion is tried again rather than failed at once; and all
 * works again once space is freed, without a restart. The disk is a small tmpfs (mounting one needs root).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { eq, sql } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { knowledgeEntries } from '../../src/models/index.js';

import { saveUnwritten } from '../../src/services/unwritten-usage.js';
import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { apiOf, eventually } from '../helpers/http.js';
import { createFolder, settled, storedFiles, upload, uploaded } from '../helpers/knowledge.js';
import { freePort, keel, killLeftovers, migratedDataDir, startLocalKeel } from '../helpers/process.js';

const OUT_OF_SPACE = { detail: 'The server is out of storage space; try again later' };

const root = process.getuid?.() === 0;
const scratch = mkdtempSync(join(tmpdir(), 'keel-out-of-space-'));
const disk = join(scratch, 'disk');
const filler = join(disk, 'filler');
// After every describe's own unmount (vitest runs file-level afterAll hooks last).
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

/** Takes all of the free space of the disk at `at` but `leaveBytes`, with the file `at`/filler. */
function fill(leaveBytes: number, at = disk): void {
  const free = Number(execFileSync('df', ['--output=avail', '-B1', at], { encoding: 'utf8' }).split('\n')[1]);
  execFileSync('fallocate', ['-l', String(free - leaveBytes), join(at, 'filler')]);
}

describe.skipIf(!root)('out of disk space', () => {
  beforeAll(() => {
    mkdirSync(disk);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', disk]);
  });
  afterAll(() => execFileSync('umount', [disk]));
  // Job retries a second apart: the entry's next try comes soon after the space is freed.
  const ctx = useTestApp({ DATA_DIR: disk, JOB_BACKOFF_MS: '1000', KB_SWEEP_INTERVAL_MS: '3600000' });
  const api = apiOf(ctx);

  it('answers an upload the disk cannot hold with 507, keeps no part of it, and takes it once space is freed', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const content = 'All work and no play. '.repeat(150_000); // 3.3 MB on a 2 MB disk
    const refused = await upload(ctx.app, user.headers, folder.id, { filename: 'big.txt', content, type: 'text/plain' });
    expect(refused.statusCode).toBe(507);
    expect(refused.json()).toEqual(OUT_OF_SPACE);
    expect(readdirSync(join(disk, 'storage', '.tmp'))).toEqual([]);
    expect(storedFiles(disk, user.user.id)).toEqual([]);
    expect((await api('GET', '/knowledge-base/entries', user.headers)).json()).toMatchObject({ count: 0 });

    const entry = await uploaded(ctx.app, user.headers, folder.id, { filename: 'small.txt', content: content.slice(0, 100_000), type: 'text/plain' });
    expect((await settled(ctx.app, user.headers, entry.id)).status).toBe('ready');
  });

  it('tries an ingestion whose text the disk cannot hold again, and indexes it once space is freed', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // Room for the file, not for its extracted text beside it.
    fill(500_000);
    try {
      const entry = await uploaded(ctx.app, user.headers, folder.id, { filename: 'a.txt', content: 'Herons stand still in the shallows. '.repeat(10_000), type: 'text/plain' });
      const row = async () => (await ctx.database.db.select().from(knowledgeEntries).where(eq(knowledgeEntries.id, entry.id)))[0]!;
      await eventually(async () => (await row()).attempts >= 1 && (await row()).status !== 'processing', 10_000);
      expect(await row()).toMatchObject({ status: 'pending', error: null });
    } finally {
      rmSync(filler);
    }
    const [entry] = (await api('GET', '/knowledge-base/entries', user.headers)).json<{ data: { id: string }[] }>().data;
    expect(await settled(ctx.app, user.headers, entry!.id)).toMatchObject({ status: 'ready', error: null });
  });

  it('answers a write the database has no disk for (53100) with 507', async () => {
    const user = await createUser(ctx.app);
    // What PostgreSQL raises when it cannot extend a table's file.
    await ctx.database.db.execute(
      sql.raw(`create function keel_test_disk_full() returns trigger language plpgsql as $$ begin raise exception 'could not extend file "base/5/16941": No space left on device' using errcode = 'disk_full'; end $$`),
    );
    await ctx.database.db.execute(sql.raw('create trigger keel_test_disk_full before insert on projects for each row execute function keel_test_disk_full()'));
    try {
      const refused = await api('POST', '/projects', user.headers, { name: 'Full' });
      expect(refused.statusCode).toBe(507);
      expect(refused.json()).toEqual(OUT_OF_SPACE);
    } finally {
      await ctx.database.db.execute(sql.raw('drop trigger keel_test_disk_full on projects'));
      await ctx.database.db.execute(sql.raw('drop function keel_test_disk_full()'));
    }
    expect((await api('POST', '/projects', user.headers, { name: 'Room again' })).statusCode).toBe(200);
  });
});

describe.skipIf(!root)('starting on a full disk', () => {
  const volume = join(scratch, 'volume');
  beforeAll(() => {
    mkdirSync(volume);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', volume]);
  });
  afterAll(() => {
    killLeftovers();
    execFileSync('umount', [volume]);
  });

  it('stops naming the full disk, not a permission, for the database and for its lock; starts once space is freed', { timeout: 300_000 }, async () => {
    const dataDir = await migratedDataDir(join(volume, 'data'));
    const env = { ENVIRONMENT: 'local', DATA_DIR: dataDir, PORT: String(await freePort()), LOG_LEVEL: 'warn' };
    const pglite = join(dataDir, 'pglite');
    // Room for the locks (a page each), not for what the database writes as it opens.
    fill(8192, volume);
    const opening = keel(['start'], env);
    expect((await opening.ended).code).toBe(1);
    expect(opening.err().trim()).toMatch(
      // PGlite says only that it failed to initialize: its words, and the little room as the likely cause.
      new RegExp(
        `^keel: DATA_DIR: cannot open the embedded database in ${pglite} \\(.+\\): the disk holding it may be full \\(0\\.\\d MB free; opening it may write a 16 MB WAL segment\\): free space there, or check the directory$`,
      ),
    );
    // No room at all: the lock file is the first write.
    rmSync(join(volume, 'filler'));
    fill(0, volume);
    const locking = keel(['start'], env);
    expect((await locking.ended).code).toBe(1);
    expect(locking.err().trim()).toBe(`keel: DATA_DIR: cannot take the lock file ${join(pglite, 'keel.lock')} (ENOSPC): free space on the disk holding ${pglite}`);

    rmSync(join(volume, 'filler'));
    const { child } = await startLocalKeel(dataDir, Number(env.PORT), {});
    child.process.kill('SIGTERM');
    expect((await child.ended).code).toBe(0);
  });

  it('a first start that cannot write the local secret key says the disk is full and leaves no empty key file behind', async () => {
    const fresh = join(volume, 'fresh');
    fill(0, volume);
    try {
      const first = keel(['start'], { ENVIRONMENT: 'local', DATA_DIR: fresh, PORT: String(await freePort()), LOG_LEVEL: 'warn' });
      expect((await first.ended).code).toBe(1);
      expect(first.err().trim()).toBe(`keel: DATA_DIR: cannot keep the local secret key in ${join(fresh, '.secret_key')} (ENOSPC); free space on the disk holding ${fresh}`);
      // An empty one stopped every later start, space freed or not, until removed by hand.
      expect(existsSync(join(fresh, '.secret_key'))).toBe(false);
    } finally {
      rmSync(join(volume, 'filler'));
    }
  });
});

describe.skipIf(!root)('saving unwritten usage on a full disk', () => {
  const volume = join(scratch, 'usage-volume');
  beforeAll(() => {
    mkdirSync(volume);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', volume]);
  });
  afterAll(() => execFileSync('umount', [volume]));

  it.each([
    ['no room at all', 0],
    ['room for part of a file', 64 * 1024],
  ])('with %s, throws and leaves no file that is not whole (but its in-progress mark)', (_, leave) => {
    const dir = join(volume, 'usage-unwritten');
    mkdirSync(dir, { recursive: true });
    fill(leave, volume);
    try {
      const usage = Array.from({ length: 2_000 }, (_, i) => `${String(i).padStart(6, '0')}${'x'.repeat(500)}`);
      expect(() => saveUnwritten(dir, { usage, settlements: [], windowSettlements: [], blockReleases: [] })).toThrow(/ENOSPC/);
      // A half-written file under its final name would be read as all there is; a temporary one stays for good.
      expect(readdirSync(dir).filter((name) => !name.endsWith('.saving'))).toEqual([]);
    } finally {
      rmSync(join(volume, 'filler'));
      rmSync(dir, { recursive: true });
    }
  });
});
