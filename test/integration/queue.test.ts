import { randomBytes, randomUUID } from 'node:crypto';

import { Queue } from 'bullmq';
import { Redis } from 'ioredis';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { z } from 'zod';

import type { Settings } from '../../src/core/config.js';
import type { Logger } from '../../src/core/logger.js';
import { createQueue as createAppQueue, type JobQueue } from '../../src/core/queue.js';

import { startWorker } from '../../src/server.js';
import { testRedisPrefix, testSettings } from '../helpers/app.js';
import { freePort } from '../helpers/process.js';
import { SilentProxy } from '../helpers/silent-proxy.js';

const silent = pino({ level: 'silent' });

/** The jobs these tests queue. */
const TEST_JOBS = {
  greet: z.object({ name: z.string() }),
  flaky: z.object({ n: z.number() }),
  doomed: z.object({}),
  later: z.object({ n: z.number() }),
  slow: z.object({}),
};
const createQueue = (settings: Settings, logger: Logger) => createAppQueue(settings, logger, TEST_JOBS);

async function eventually(check: () => boolean | Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** A handler that fails its first `failures` calls, recording each call's data. */
function flaky(failures: number) {
  const calls: Record<string, unknown>[] = [];
  return {
    calls,
    handler: async (data: Record<string, unknown>) => {
      calls.push(data);
      if (calls.length <= failures) throw new Error(`failure ${calls.length}`);
    },
  };
}

// Both implementations must behave the same: run every job, retry with backoff, give up after JOB_ATTEMPTS.
const kinds = [
  ['in-process', {}],
  ...(process.env.REDIS_URL ? [['redis', { REDIS_URL: process.env.REDIS_URL }] as const] : []),
] as const;

describe.each(kinds)('job queue (%s)', (kind, env) => {
  const settingsFor = (extra: Record<string, string> = {}) =>
    testSettings({ REDIS_URL: '', ...env, JOB_ATTEMPTS: '3', JOB_BACKOFF_MS: '20', REDIS_KEY_PREFIX: testRedisPrefix(), ...extra });

  it('runs a queued job with its data', async () => {
    const queue = createQueue(settingsFor(), silent);
    expect(queue.kind).toBe(kind);
    const job = flaky(0);
    queue.work({ greet: job.handler });
    await queue.add('greet', { name: 'Ada' });
    await eventually(() => job.calls.length === 1);
    expect(job.calls[0]).toEqual({ name: 'Ada' });
    await queue.close();
  });

  it('retries a failing job with backoff until it succeeds', async () => {
    const queue = createQueue(settingsFor(), silent);
    const job = flaky(2);
    queue.work({ flaky: job.handler });
    await queue.add('flaky', { n: 1 });
    await eventually(() => job.calls.length === 3);
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(job.calls).toHaveLength(3); // succeeded on the third try: not run again
    await queue.close();
  });

  it('gives up after JOB_ATTEMPTS tries', async () => {
    const settings = settingsFor();
    const queue = createQueue(settings, silent);
    const job = flaky(100);
    queue.work({ doomed: job.handler });
    await queue.add('doomed', {});
    await eventually(() => job.calls.length === 3);
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(job.calls).toHaveLength(3);
    if (kind === 'redis') {
      // Kept in Redis for inspection, not lost.
      const connection = new Redis(settings.REDIS_URL!, { maxRetriesPerRequest: null });
      const inspect = new Queue('keel-jobs', { connection, prefix: `${settings.REDIS_KEY_PREFIX}jobs` });
      const failed = await inspect.getFailed();
      expect(failed.map((j) => j.name)).toEqual(['doomed']);
      await inspect.close();
      await connection.quit();
    }
    await queue.close();
  });

  it('keeps jobs queued before any worker, and runs them once one starts', async () => {
    const settings = settingsFor();
    const producer = createQueue(settings, silent);
    await producer.add('later', { n: 7 });
    const job = flaky(0);
    // Embedded, the same queue object starts working; on Redis, another process would (here: another queue).
    const consumer: JobQueue<typeof TEST_JOBS> = kind === 'redis' ? createQueue(settings, silent) : producer;
    consumer.work({ later: job.handler });
    await eventually(() => job.calls.length === 1);
    expect(job.calls[0]).toEqual({ n: 7 });
    await producer.close();
    if (consumer !== producer) await consumer.close();
  });
});

describe.each(kinds)('job registry (%s)', (_kind, env) => {
  const settingsFor = () => testSettings({ REDIS_URL: '', ...env, JOB_ATTEMPTS: '1', REDIS_KEY_PREFIX: `keel-test-q:${randomBytes(4).toString('hex')}:` });

  it('refuses, when queued, data its schema does not accept, and names only registered jobs', async () => {
    const queue = createQueue(settingsFor(), silent);
    const job = flaky(0);
    queue.work({ greet: job.handler });
    // @ts-expect-error: the data does not match the job's schema
    await expect(queue.add('greet', { name: 42 })).rejects.toThrow(z.ZodError);
    // @ts-expect-error: no such job
    await expect(queue.add('unknown', {})).rejects.toThrow(/unknown job unknown/);
    await queue.add('greet', { name: 'Ada' });
    await eventually(() => job.calls.length === 1);
    expect(job.calls).toEqual([{ name: 'Ada' }]);
    await queue.close();
  });

  it('the application queue knows its own jobs only', async () => {
    const queue = createAppQueue(settingsFor(), silent);
    // @ts-expect-error: not an application job
    await expect(queue.add('greet', { name: 'Ada' })).rejects.toThrow(/unknown job/);
    await expect(queue.add('send-email', { to: 'not an email', subject: 's', html: '', text: '' })).rejects.toThrow(z.ZodError);
    await queue.close();
  });
});

describe.skipIf(!process.env.REDIS_URL)('job data in Redis', () => {
  it('is sealed, and a job sealed under another SECRET_KEY is dropped at once, not retried', async () => {
    const prefix = `keel-test-q:${randomBytes(4).toString('hex')}:`;
    const settings = testSettings({ REDIS_URL: process.env.REDIS_URL!, REDIS_KEY_PREFIX: prefix, JOB_ATTEMPTS: '3', JOB_BACKOFF_MS: '20' });
    const producer = createQueue(settings, silent);
    await producer.add('greet', { name: 'Ada Lovelace' });
    const connection = new Redis(settings.REDIS_URL!, { maxRetriesPerRequest: null });
    const [key] = await connection.keys(`${prefix}jobs:keel-jobs:[0-9]*`);
    const stored = await connection.hget(key!, 'data');
    expect(Object.keys(JSON.parse(stored!) as object)).toEqual(['sealed']);
    expect(stored).not.toContain('Ada');

    const consumer = createQueue({ ...settings, SECRET_KEY: randomBytes(32).toString('hex') }, silent);
    const job = flaky(0);
    consumer.work({ greet: job.handler });
    await eventually(async () => (await connection.zcard(`${prefix}jobs:keel-jobs:failed`)) === 1);
    const [id] = await connection.zrange(`${prefix}jobs:keel-jobs:failed`, '0', '-1');
    expect(await connection.hget(`${prefix}jobs:keel-jobs:${id}`, 'atm')).toBe('1'); // attempts made
    expect(job.calls).toEqual([]);
    await consumer.close();
    await producer.close();
    const keys = await connection.keys(`${prefix}*`);
    if (keys.length) await connection.del(...keys);
    await connection.quit();
  });
});

describe.skipIf(!process.env.REDIS_URL)('queueing while Redis is out of reach', () => {
  /** Rejects within the app's Redis command timeout (2 s) and a margin, never waits for Redis to come back. */
  async function failsFast(adding: Promise<void>): Promise<void> {
    const started = Date.now();
    await expect(adding).rejects.toThrow();
    expect(Date.now() - started).toBeLessThan(4_000);
  }

  const settingsFor = (url: string) => testSettings({ REDIS_URL: url, REDIS_KEY_PREFIX: testRedisPrefix() });
  const ingest = () => ({ entry_id: randomUUID() });

  it('fails a job, and the lanes\' jobs, within seconds when Redis stops answering, then when it refuses connections', async () => {
    const proxy = await SilentProxy.to(process.env.REDIS_URL!, 6379);
    // No lane producer (a process's sweepers may have none): every queue is on the queue's own client.
    const queue = createAppQueue(settingsFor(proxy.url(process.env.REDIS_URL!)), silent);
    try {
      await queue.add('ingest-entry', ingest());
      proxy.fallSilent();
      await failsFast(queue.add('ingest-entry', ingest()));
      await failsFast(queue.add('run-agent', { run_id: randomUUID() }));
      proxy.speak();
      await queue.add('ingest-entry', ingest());
      await proxy.close();
      await failsFast(queue.add('ingest-entry', ingest()));
    } finally {
      await proxy.close();
      await queue.close();
    }
  }, 30_000);

  it('fails a job within seconds when Redis has refused every connection since the queue was made', async () => {
    const queue = createAppQueue(settingsFor(`redis://127.0.0.1:${await freePort()}`), silent);
    try {
      await failsFast(queue.add('ingest-entry', ingest()));
    } finally {
      await queue.close();
    }
  }, 30_000);
});

describe.each(kinds)('job lanes (%s)', (kind, env) => {
  it('works a lane\'s jobs on a queue of their own, with its own number at once, beside the others', async () => {
    const prefix = `keel-test-q:${randomBytes(4).toString('hex')}:`;
    const settings = testSettings({ REDIS_URL: '', ...env, REDIS_KEY_PREFIX: prefix, JOB_CONCURRENCY: '1' });
    const lanes = [{ queue: 'test-lane', jobs: ['slow'], concurrency: () => 3 }];
    const queue = createAppQueue(settings, silent, TEST_JOBS, lanes);
    let running = 0;
    let most = 0;
    const slowDone: number[] = [];
    const greeted: string[] = [];
    let open!: () => void;
    const released = new Promise<void>((resolve) => (open = resolve));
    queue.work({
      slow: async () => {
        most = Math.max(most, ++running);
        await released;
        running--;
        slowDone.push(Date.now());
      },
      greet: async ({ name }) => void greeted.push(name),
    });
    for (let i = 0; i < 5; i++) await queue.add('slow', {});
    await queue.add('greet', { name: 'Ada' });
    await queue.add('greet', { name: 'Grace' });
    // Three slow jobs at once (the lane's number, not JOB_CONCURRENCY), and the other jobs not behind them.
    await eventually(() => running === 3 && greeted.length === 2);
    const connection = kind === 'redis' ? new Redis(settings.REDIS_URL!, { maxRetriesPerRequest: null }) : null;
    if (connection) expect(await connection.llen(`${prefix}jobs:test-lane:wait`)).toBe(2);
    open();
    await eventually(() => slowDone.length === 5);
    expect(most).toBe(3);
    await queue.close();
    if (connection) {
      const keys = await connection.keys(`${prefix}*`);
      if (keys.length) await connection.del(...keys);
      await connection.quit();
    }
  });

  it("sends an email while document ingestions hold every JOB_CONCURRENCY slot (the application's lanes)", async () => {
    // The application's registry and lanes: an email used to wait behind the ingestions it shared JOB_CONCURRENCY with.
    const prefix = testRedisPrefix();
    const settings = testSettings({ REDIS_URL: '', ...env, REDIS_KEY_PREFIX: prefix, JOB_CONCURRENCY: '2', EMAIL_CONCURRENCY: '1' });
    const queue = createAppQueue(settings, silent);
    let ingesting = 0;
    const sent: string[] = [];
    let open!: () => void;
    const released = new Promise<void>((resolve) => (open = resolve));
    queue.work({
      'ingest-entry': async () => {
        ingesting++;
        await released;
        ingesting--;
      },
      'send-email': async ({ to }) => void sent.push(to),
    });
    for (let i = 0; i < 3; i++) await queue.add('ingest-entry', { entry_id: randomUUID() });
    await eventually(() => ingesting === 2);
    await queue.add('send-email', { to: 'recover@keel.test', subject: 'Password recovery', html: '<p>link</p>', text: 'link' });
    await eventually(() => sent.length === 1);
    expect(ingesting).toBe(2);
    open();
    await eventually(() => ingesting === 0);
    await queue.close();
    if (kind === 'redis') {
      const connection = new Redis(settings.REDIS_URL!, { maxRetriesPerRequest: null });
      const keys = await connection.keys(`${prefix}*`);
      if (keys.length) await connection.del(...keys);
      await connection.quit();
    }
  });

  it('runs JOB_CONCURRENCY jobs at once, the others in the order queued as those end', async () => {
    const queue = createQueue(testSettings({ REDIS_URL: '', ...env, REDIS_KEY_PREFIX: testRedisPrefix(), JOB_CONCURRENCY: '2' }), silent);
    let running = 0;
    let most = 0;
    const done: number[] = [];
    let open!: () => void;
    const released = new Promise<void>((resolve) => (open = resolve));
    queue.work({
      later: async ({ n }) => {
        most = Math.max(most, ++running);
        await released;
        running--;
        done.push(n);
      },
    });
    for (let n = 0; n < 6; n++) await queue.add('later', { n });
    await eventually(() => running === 2);
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(running).toBe(2);
    open();
    await eventually(() => done.length === 6);
    expect(most).toBe(2);
    if (kind === 'in-process') expect(done).toEqual([0, 1, 2, 3, 4, 5]);
    await queue.close();
  });
});

describe('in-process queue: jobs a sweeper queues again', () => {
  it('keeps one waiting copy of such a job, and drops those not begun when it closes (the others run)', async () => {
    const queue = createAppQueue(testSettings({ REDIS_URL: '', JOB_CONCURRENCY: '1' }), silent, TEST_JOBS, [], { recovered: ['later'] });
    const ran: string[] = [];
    let open!: () => void;
    const released = new Promise<void>((resolve) => (open = resolve));
    queue.work({
      slow: async () => {
        ran.push('slow');
        await released;
      },
      later: async ({ n }) => void ran.push(`later ${n}`),
      greet: async ({ name }) => void ran.push(`greet ${name}`),
    });
    await queue.add('slow', {});
    await eventually(() => ran.length === 1);
    // Waiting behind it: a sweeper's copies of one job, another job, and one of another kind.
    for (let i = 0; i < 3; i++) await queue.add('later', { n: 1 });
    await queue.add('later', { n: 2 });
    await queue.add('greet', { name: 'Ada' });
    const closing = queue.close();
    open();
    await closing;
    // The sweeper's jobs were not begun once the queue closed; the email-like one ran.
    expect(ran).toEqual(['slow', 'greet Ada']);

    const again = createAppQueue(testSettings({ REDIS_URL: '', JOB_CONCURRENCY: '1' }), silent, TEST_JOBS, [], { recovered: ['later'] });
    const later: number[] = [];
    let go!: () => void;
    const gate = new Promise<void>((resolve) => (go = resolve));
    again.work({ slow: () => gate, later: async ({ n }) => void later.push(n) });
    await again.add('slow', {});
    for (let i = 0; i < 3; i++) await again.add('later', { n: 1 });
    await again.add('later', { n: 2 });
    go();
    await eventually(() => later.length === 2);
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(later).toEqual([1, 2]);
    await again.close();
  });
});

describe('in-process queue shutdown', () => {
  it('gives a job waiting for its retry one last try when closing, instead of dropping it', async () => {
    const queue = createQueue(testSettings({ REDIS_URL: '', JOB_ATTEMPTS: '5', JOB_BACKOFF_MS: '60000' }), silent);
    const job = flaky(1);
    queue.work({ slow: job.handler });
    await queue.add('slow', {});
    await eventually(() => job.calls.length === 1); // failed; its retry is a minute away
    await queue.close();
    expect(job.calls).toHaveLength(2);
  });
});

describe('keel worker', () => {
  it('refuses to start without REDIS_URL, naming it', async () => {
    await expect(startWorker(testSettings({ REDIS_URL: '' }), silent)).rejects.toThrow(/REDIS_URL/);
  });
});
