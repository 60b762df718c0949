import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, afterEach, describe, expect, it } from 'vitest';

import { keel, killLeftovers, migratedDataDir } from '../helpers/process.js';

// `keel worker` as a real process on the run's Redis (server mode only: it needs REDIS_URL), on an
// embedded database of its own. A file of its own, apart from process.test.ts, whose processes
// never see the run's DATABASE_URL or REDIS_URL: CI runs that one once, this one on the server.
const scratch = mkdtempSync(join(tmpdir(), 'keel-worker-test-'));
let dirs = 0;
const freshDir = () => join(scratch, `data-${++dirs}`);

afterEach(killLeftovers);
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

function env(dataDir: string, extra: Record<string, string> = {}): Record<string, string> {
  return { ENVIRONMENT: 'local', DATA_DIR: dataDir, LOG_FORMAT: 'json', LOG_LEVEL: 'info', REDIS_URL: process.env.REDIS_URL!, ...extra };
}

describe.skipIf(!process.env.REDIS_URL)('keel worker', () => {
  it('refuses an unmigrated database, naming `keel migrate`', async () => {
    const worker = keel(['worker'], env(freshDir()));
    const { code } = await worker.ended;
    expect(code).not.toBe(0);
    expect(worker.out() + worker.err()).toContain('run `keel migrate` first');
  }, 120_000);

  it('exits 0 at once on SIGTERM when idle, closing its Redis connections', async () => {
    // A worker runs agent runs and ingestion: it opens the (migrated) database, here an embedded one of its own.
    const dataDir = await migratedDataDir(freshDir());
    const worker = keel(['worker'], env(dataDir, { SHUTDOWN_TIMEOUT_MS: '20000' }));
    const deadline = Date.now() + 60_000;
    while (!worker.out().includes('worker started')) {
      if (worker.done() || Date.now() > deadline) throw new Error(`worker did not start:\n${worker.out()}\n${worker.err()}`);
      await new Promise((done) => setTimeout(done, 100));
    }
    await new Promise((done) => setTimeout(done, 1_000));
    // Idle, its event loop sleeps: nothing wakes it 100 times a second (a 10 ms event-loop delay
    // monitor did, for metrics a worker serves to no one). Its main thread's voluntary context
    // switches are its wake-ups; Redis' blocking pops and the sweeps wake it a few times a second.
    const wakeups = () => Number(/voluntary_ctxt_switches:\s+(\d+)/.exec(readFileSync(`/proc/${worker.pid}/task/${worker.pid}/status`, 'utf8'))?.[1]);
    const before = wakeups();
    await new Promise((done) => setTimeout(done, 2_000));
    expect(wakeups() - before).toBeLessThan(60);
    const signalled = Date.now();
    worker.process.kill('SIGTERM');
    const { code } = await worker.ended;
    expect(code, worker.out()).toBe(0);
    expect(Date.now() - signalled).toBeLessThan(3_000);
    expect(worker.out()).toContain('shut down cleanly');
  }, 300_000);
});
