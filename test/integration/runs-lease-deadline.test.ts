/**
 * A run's lease is not renewed past its deadline: the deadline ends a run, and one its worker
 * cannot end (stuck past it) lets its lease run out, so the sweep can take it up as an orphan. Its
 * worker's renewals kept a stuck run's lease alive for good.
 */
import { eq } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';

import { transaction } from '../../src/core/db.js';

import { runs, threads } from '../../src/models/index.js';

import * as runCrud from '../../src/crud/run.js';
import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { sleep } from '../helpers/http.js';
import { createAgent, createThread, startRun, useRunServer, waitForRun } from '../helpers/runs.js';

const MODEL = 'fake-precise';
// A 2 s deadline; a 3 s lease, renewed every second; no sweep of the app's own meanwhile.
const ctx = useTestApp({ RUN_TIMEOUT_SECONDS: '2', RUN_LEASE_SECONDS: '3', RUN_SWEEP_INTERVAL_SECONDS: '3600', MODEL_MAX_RETRIES: '0' });
const server = useRunServer(ctx);

async function setup() {
  const owner = await createUser(ctx.app);
  const agent = await createAgent(ctx.app, owner.headers, { is_default: true });
  const thread = await createThread(ctx.app, owner.headers);
  return { owner, agent, thread };
}

const leaseOf = async (runId: string) => (await ctx.app.db.select({ lease_expires_at: runs.lease_expires_at }).from(runs).where(eq(runs.id, runId)))[0]!.lease_expires_at!;

describe('a run lease and its deadline', () => {
  it('renewLease extends the lease before the deadline, and leaves it as it is after it', async () => {
    const { owner, agent, thread } = await setup();
    const expires = new Date(Date.now() + 1_000);
    const [run] = await ctx.app.db
      .insert(runs)
      .values({ owner_id: owner.user.id, thread_id: thread.id, agent_id: agent.id, agent_version: 1, model: MODEL, status: 'running', lease_owner: 'worker-a', lease_expires_at: expires, attempts: 1, started_at: new Date() })
      .returning();
    await ctx.app.db.update(threads).set({ status: 'busy' }).where(eq(threads.id, thread.id));
    // Past the deadline: still the worker's (true), but not a moment longer.
    expect(await runCrud.renewLease(ctx.app.db, run!.id, 'worker-a', 30, new Date(Date.now() - 1_000))).toBe(true);
    expect((await leaseOf(run!.id)).getTime()).toBe(expires.getTime());
    // Before it: renewed.
    expect(await runCrud.renewLease(ctx.app.db, run!.id, 'worker-a', 30, new Date(Date.now() + 60_000))).toBe(true);
    expect((await leaseOf(run!.id)).getTime()).toBeGreaterThan(Date.now() + 20_000);
    await ctx.app.db.update(runs).set({ status: 'cancelled', lease_owner: null, lease_expires_at: null, ended_at: new Date() }).where(eq(runs.id, run!.id));
    await ctx.app.db.update(threads).set({ status: 'idle' }).where(eq(threads.id, thread.id));
  });

  // A second connection holds the thread's lock, which the run's step waits for: PostgreSQL only (PGlite has one connection).
  it.runIf(process.env.DATABASE_URL)('a run stuck past its deadline (its step waits for a lock) lets its lease run out: the sweep sees it orphaned', async () => {
    const { fake } = server;
    fake.script(MODEL, { text: 'an answer', chunkDelayMs: 300 });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let locked!: () => void;
    const isLocked = new Promise<void>((resolve) => (locked = resolve));
    // Holds the thread's row lock: the run's step (thread, then run) cannot be written meanwhile.
    const holding = transaction(ctx.app.db, async (tx) => {
      await tx.select({ id: threads.id }).from(threads).where(eq(threads.id, thread.id)).for('update');
      locked();
      await released;
    });
    try {
      await isLocked;
      await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.completed), 10_000);
      // Past the deadline (2 s) by more than a lease (3 s), renewals every second.
      await sleep(6_000);
      const [row] = await ctx.app.db.select().from(runs).where(eq(runs.id, run.id));
      expect(row).toMatchObject({ status: 'running', lease_owner: ctx.app.runs.runner.workerId });
      expect(row!.lease_expires_at!.getTime()).toBeLessThan(Date.now());
      expect((await runCrud.orphanedRunning(ctx.app.db, 500)).map((r) => r.id)).toContain(run.id);
    } finally {
      release();
      await holding;
    }
    const ended = await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed', 'cancelled']);
    expect(['completed', 'failed']).toContain(ended.status);
  }, 30_000);
});
