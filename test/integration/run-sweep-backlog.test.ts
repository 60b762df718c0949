/**
 * The sweep and a backlog of queued runs (more than RUN_CONCURRENCY): a queued run's job may be
 * only waiting its turn, so the sweep queues it again at most once a lease, whichever worker sweeps
 * — not a copy per sweep per worker, each costing a claim statement when its turn comes — and still
 * takes up a run whose job was really lost.
 */
import { inArray } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';

import type { JobQueue } from '../../src/core/queue.js';

import { runs } from '../../src/models/index.js';

import { RunSweeper } from '../../src/modules/agents/run-sweeper.js';
import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { apiOf, sleep } from '../helpers/http.js';
import { createAgent, createThread, startRun, useRunServer } from '../helpers/runs.js';

const LEASE = 3;
// One run at a time; the app's own periodic sweep never comes (each test drives its own sweepers).
const ctx = useTestApp({ RUN_CONCURRENCY: '1', RUN_LEASE_SECONDS: String(LEASE), RUN_SWEEP_INTERVAL_SECONDS: '3600', MAX_ACTIVE_RUNS_PER_USER: '20' });
const api = apiOf(ctx);
const server = useRunServer(ctx);

/** The app's run deps with `queue` counting the run-agent jobs each run gets (passed on to `through`, if any). */
function counting(through?: JobQueue) {
  const jobs = new Map<string, number>();
  const queue: JobQueue = {
    kind: through?.kind ?? 'in-process',
    add: async (name, data) => {
      if (name === 'run-agent') {
        const runId = (data as { run_id: string }).run_id;
        jobs.set(runId, (jobs.get(runId) ?? 0) + 1);
      }
      await through?.add(name, data);
    },
    work: () => undefined,
    close: async () => undefined,
  };
  return { jobs, queue, of: (ids: string[]) => ids.map((id) => jobs.get(id) ?? 0) };
}

/** Another worker's sweeper on the app's database (its first sweep is its start-up one). */
const sweeperOn = (queue: JobQueue, settings: Partial<typeof ctx.app.settings> = {}) => new RunSweeper({ ...ctx.app.runs, queue, settings: { ...ctx.app.settings, ...settings } }, ctx.app.runs.runner);

describe('the sweep and a backlog of queued runs', () => {
  it('two workers\' sweeps queue each waiting run again at most once a lease, and a run whose job was lost is queued again after one', async () => {
    const counted = counting();
    const [a, b] = [sweeperOn(counted.queue), sweeperOn(counted.queue)];
    // Their start-up sweeps, before the backlog (they would queue every queued run once).
    await Promise.all([a.sweep(), b.sweep()]);

    // Four runs queued for longer than a lease, their jobs somewhere in the queue (or lost).
    const owner = await createUser(ctx.app);
    const agent = await createAgent(ctx.app, owner.headers);
    const created = new Date(Date.now() - 2 * LEASE * 1000);
    const backlog = await ctx.app.db
      .insert(runs)
      .values(await Promise.all(Array.from({ length: 4 }, async () => ({ owner_id: owner.user.id, thread_id: (await createThread(ctx.app, owner.headers)).id, agent_id: agent.id, agent_version: 1, model: 'fake-precise', status: 'queued' as const, created_at: created }))))
      .returning();
    const ids = backlog.map((run) => run.id);

    // Both sweep at once: each run is queued again once, by one of them.
    await Promise.all([a.sweep(), b.sweep()]);
    expect(counted.of(ids)).toEqual([1, 1, 1, 1]);
    // Within the lease, no sweep on either queues them again.
    for (let i = 0; i < 3; i++) await Promise.all([a.sweep(), b.sweep()]);
    expect(counted.of(ids)).toEqual([1, 1, 1, 1]);
    // The mark is no lease a reader sees: no worker holds the runs.
    const rows = await ctx.app.db.select().from(runs).where(inArray(runs.id, ids));
    expect(rows.map((run) => [run.status, run.lease_owner])).toEqual(ids.map(() => ['queued', null]));

    // A lease later, still queued (their jobs were lost after all): queued again, once.
    await sleep(LEASE * 1000 + 100);
    await Promise.all([a.sweep(), b.sweep()]);
    expect(counted.of(ids)).toEqual([2, 2, 2, 2]);

    // A process started now (an embedded restart: its queue lost every job) takes them up at once, marked or not.
    const restarted = counting();
    await sweeperOn(restarted.queue).sweep();
    expect(restarted.of(ids)).toEqual([1, 1, 1, 1]);
    // A worker of a BullMQ queue started now (a rolling restart: the jobs are still in Redis) leaves marked runs alone.
    const rolled = counting({ ...restarted.queue, kind: 'redis' });
    await sweeperOn(rolled.queue).sweep();
    expect(rolled.of(ids)).toEqual([0, 0, 0, 0]);

    await ctx.app.db.update(runs).set({ status: 'cancelled', ended_at: new Date() }).where(inArray(runs.id, ids));
  }, 30_000);

  // Scaled: BullMQ runs RUN_CONCURRENCY jobs at a time, the rest wait in Redis.
  it.runIf(Boolean(process.env.REDIS_URL))('a backlog behind RUN_CONCURRENCY, two workers sweeping every second: its runs\' jobs do not pile up', async () => {
    server.fake.defaultReply = { chunks: ['slow ', 'answer'], chunkDelayMs: 3_000 };
    const counted = counting(ctx.app.runs.queue);
    const sweepers = [sweeperOn(counted.queue, { RUN_SWEEP_INTERVAL_SECONDS: 1 }), sweeperOn(counted.queue, { RUN_SWEEP_INTERVAL_SECONDS: 1 })];
    for (const sweeper of sweepers) sweeper.start();
    try {
      const owner = await createUser(ctx.app);
      await createAgent(ctx.app, owner.headers, { is_default: true });
      // Five runs on five threads: one runs, four wait their turn (RUN_CONCURRENCY 1).
      const started: string[] = [];
      for (let i = 0; i < 5; i++) {
        const run = await startRun(ctx.app, owner.headers, (await createThread(ctx.app, owner.headers)).id, { input: `q${i}` });
        started.push(run.id);
        // Queued through the app's own queue: counted as the first job of each.
        counted.jobs.set(run.id, (counted.jobs.get(run.id) ?? 0) + 1);
      }
      await sleep(2 * LEASE * 1000 - 500);
      // Its start's job, and at most one more a lease (whichever worker swept first): before, every
      // sweep of both workers added one once the first lease had passed (about 1 + 2 × 3 by now).
      for (const jobs of counted.of(started)) expect(jobs).toBeLessThanOrEqual(2);
      for (const id of started) await api('POST', `/runs/${id}/cancel`, owner.headers);
    } finally {
      await Promise.all(sweepers.map((sweeper) => sweeper.stop()));
    }
  }, 30_000);
});
