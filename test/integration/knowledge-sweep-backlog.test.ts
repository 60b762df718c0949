/**
 * The ingestion sweep and a backlog: a pending entry's job may be only waiting its turn behind
 * JOB_CONCURRENCY (in Redis it survives any process), so the sweep queues an entry again at most
 * once a mark (KB_INGEST_LEASE_MS), whichever worker sweeps — not a copy per sweep, which piled up
 * in Redis — and still takes up an entry whose job was really lost, or whose worker died.
 */
import { randomUUID } from 'node:crypto';

import { Queue } from 'bullmq';
import { eq, inArray, sql } from 'drizzle-orm';
import { describe, expect, it, vi } from 'vitest';

import { JobSealer } from '../../src/core/job-crypto.js';
import { createQueue, type JobQueue } from '../../src/core/queue.js';

import { knowledgeEntries } from '../../src/models/index.js';

import { knowledgeStorage } from '../../src/services/knowledge/files.js';
import { ingestEntry, sweepIngestion, type SweepPick } from '../../src/services/knowledge/ingestion.js';
import { StorageUnavailableError } from '../../src/services/storage-service.js';
import { testRedisPrefix, useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { sleep } from '../helpers/http.js';
import { createFolder, ingested, uploaded } from '../helpers/knowledge.js';

const ctx = useTestApp();
const MARK_MS = 1_000;
const pick: SweepPick = { pendingAgeMs: 60_000, markMs: MARK_MS, ignoreMarks: false };

/** A queue that counts the ingest-entry jobs each entry gets (and queues nothing). */
function counting(kind: JobQueue['kind'] = 'redis') {
  const jobs = new Map<string, number>();
  const queue: JobQueue = {
    kind,
    add: async (name, data) => {
      if (name === 'ingest-entry') {
        const id = (data as { entry_id: string }).entry_id;
        jobs.set(id, (jobs.get(id) ?? 0) + 1);
      }
    },
    work: () => undefined,
    close: async () => undefined,
  };
  return { queue, of: (ids: string[]) => ids.map((id) => jobs.get(id) ?? 0) };
}

/** Entries ingested, then left as a lost job leaves them: pending for an hour, not marked. */
async function leftPending(count: number): Promise<string[]> {
  const user = await createUser(ctx.app);
  const folder = await createFolder(ctx.app, user.headers);
  const ids: string[] = [];
  for (let i = 0; i < count; i++) ids.push((await ingested(ctx.app, user.headers, folder.id, { filename: `left-${i}.txt`, content: `Aardvark ${i}` })).id);
  await ctx.app.db.update(knowledgeEntries).set({ status: 'pending', lease_expires_at: null, updated_at: sql`now() - interval '1 hour'` }).where(inArray(knowledgeEntries.id, ids));
  return ids;
}

describe('the ingestion sweep and a backlog', () => {
  it('queues a pending entry again at most once a mark, whichever worker sweeps; a lost job is queued again after one', async () => {
    const ids = await leftPending(3);
    const counted = counting();
    // Two workers sweeping at once: each entry queued once, by one of them.
    await Promise.all([sweepIngestion(ctx.app.db, counted.queue, pick), sweepIngestion(ctx.app.db, counted.queue, pick)]);
    expect(counted.of(ids)).toEqual([1, 1, 1]);
    // Within the mark, no sweep queues them again (their jobs may only be waiting their turn).
    for (let i = 0; i < 3; i++) await sweepIngestion(ctx.app.db, counted.queue, pick);
    expect(counted.of(ids)).toEqual([1, 1, 1]);
    // The mark changes nothing a reader sees.
    const rows = await ctx.app.db.select().from(knowledgeEntries).where(inArray(knowledgeEntries.id, ids));
    expect(rows.map((row) => [row.status, row.lease_token])).toEqual(ids.map(() => ['pending', null]));
    // A mark later, still pending (the jobs were lost after all): queued again, once.
    await sleep(MARK_MS + 100);
    await sweepIngestion(ctx.app.db, counted.queue, pick);
    await sweepIngestion(ctx.app.db, counted.queue, pick);
    expect(counted.of(ids)).toEqual([2, 2, 2]);
    // An in-process queue's start-up sweep (its jobs died with the process) takes them up, marked or not.
    const restarted = counting('in-process');
    await sweepIngestion(ctx.app.db, restarted.queue, { ...pick, ignoreMarks: true });
    expect(restarted.of(ids)).toEqual([1, 1, 1]);
    await ctx.app.db.update(knowledgeEntries).set({ status: 'ready', lease_expires_at: null }).where(inArray(knowledgeEntries.id, ids));
  });

  it('hands an entry whose worker died back as pending, queued once; a claim still running is left alone', async () => {
    const [dead, alive] = await leftPending(2);
    await ctx.app.db.update(knowledgeEntries).set({ status: 'processing', lease_token: randomUUID(), lease_expires_at: sql`now() - interval '1 second'` }).where(eq(knowledgeEntries.id, dead!));
    await ctx.app.db.update(knowledgeEntries).set({ status: 'processing', lease_token: randomUUID(), lease_expires_at: sql`now() + interval '1 hour'` }).where(eq(knowledgeEntries.id, alive!));
    const counted = counting();
    for (let i = 0; i < 3; i++) await sweepIngestion(ctx.app.db, counted.queue, pick);
    expect(counted.of([dead!, alive!])).toEqual([1, 0]);
    const [row] = await ctx.app.db.select().from(knowledgeEntries).where(eq(knowledgeEntries.id, dead!));
    expect([row!.status, row!.lease_token]).toEqual(['pending', null]);
    await ctx.app.db.update(knowledgeEntries).set({ status: 'ready', lease_token: null, lease_expires_at: null }).where(inArray(knowledgeEntries.id, [dead!, alive!]));
  });

  it('leaves unmarked the entries a sweep could not queue (the queue down), so that the next sweep queues them', async () => {
    const ids = await leftPending(2);
    const down: JobQueue = { ...counting().queue, add: () => Promise.reject(new Error('queue down')) };
    await expect(sweepIngestion(ctx.app.db, down, pick)).rejects.toThrow('queue down');
    const counted = counting();
    await sweepIngestion(ctx.app.db, counted.queue, pick);
    expect(counted.of(ids)).toEqual([1, 1]);
    await ctx.app.db.update(knowledgeEntries).set({ status: 'ready', lease_expires_at: null }).where(inArray(knowledgeEntries.id, ids));
  });

  it('does not queue an entry an upload has just queued, however long its job waits its turn', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    // Its job may still be waiting (JOB_CONCURRENCY busy): as if it had waited an hour.
    const entry = await uploaded(ctx.app, user.headers, folder.id, { filename: 'waiting.txt', content: 'Okapi' });
    const counted = counting();
    await ctx.app.db.update(knowledgeEntries).set({ status: 'pending', updated_at: sql`now() - interval '1 hour'` }).where(eq(knowledgeEntries.id, entry.id));
    await sweepIngestion(ctx.app.db, counted.queue, pick);
    expect(counted.of([entry.id])).toEqual([0]);
  });

  it('does not queue an entry whose ingestion failed for a passing fault: the queue has its retry, however long it waits its turn', async () => {
    const [id] = await leftPending(1);
    await ctx.app.db.update(knowledgeEntries).set({ attempts: 0 }).where(eq(knowledgeEntries.id, id!));
    // Storage unavailable for a moment: the try fails with 503, to be tried again.
    const { backend } = knowledgeStorage(ctx.app.settings);
    vi.spyOn(backend, 'open').mockRejectedValueOnce(new StorageUnavailableError(new Error('connection reset')));
    const deps = { db: ctx.app.db, settings: ctx.app.settings, log: ctx.app.log, models: ctx.app.models };
    await expect(ingestEntry(deps, id!)).rejects.toThrow(StorageUnavailableError);
    const [row] = await ctx.app.db.select().from(knowledgeEntries).where(eq(knowledgeEntries.id, id!));
    expect([row!.status, row!.lease_token, row!.attempts]).toEqual(['pending', null, 1]);
    // Its retry waits behind a backlog (as if for an hour): no sweep queues another.
    await ctx.app.db.update(knowledgeEntries).set({ updated_at: sql`now() - interval '1 hour'` }).where(eq(knowledgeEntries.id, id!));
    const counted = counting();
    for (let i = 0; i < 3; i++) await sweepIngestion(ctx.app.db, counted.queue, pick);
    expect(counted.of([id!])).toEqual([0]);
    // The retry's job takes it up.
    await ingestEntry(deps, id!);
    expect((await ctx.app.db.select({ status: knowledgeEntries.status }).from(knowledgeEntries).where(eq(knowledgeEntries.id, id!)))[0]!.status).toBe('ready');
  });

  // A real BullMQ queue with no worker: the backlog, as Redis keeps it.
  it.runIf(Boolean(process.env.REDIS_URL))('repeated sweeps leave one job per entry in Redis', async () => {
    const ids = await leftPending(3);
    const settings = { ...ctx.app.settings, REDIS_KEY_PREFIX: testRedisPrefix() };
    const producer = createQueue(settings, ctx.app.log);
    const inspect = new Queue('keel-jobs', { connection: { url: settings.REDIS_URL! }, prefix: `${settings.REDIS_KEY_PREFIX}jobs` });
    try {
      for (let i = 0; i < 4; i++) await sweepIngestion(ctx.app.db, producer, { ...pick, markMs: 60_000 });
      const sealer = new JobSealer(settings.SECRET_KEY);
      const waiting = await inspect.getJobs(['wait']);
      const entries = waiting.map((job) => (sealer.open(job.name, (job.data as { sealed: string }).sealed) as { entry_id: string }).entry_id);
      expect(entries.filter((id) => ids.includes(id)).sort()).toEqual([...ids].sort());
    } finally {
      await inspect.obliterate({ force: true });
      await inspect.close();
      await producer.close();
      await ctx.app.db.update(knowledgeEntries).set({ status: 'ready', lease_expires_at: null }).where(inArray(knowledgeEntries.id, ids));
    }
  });
});
