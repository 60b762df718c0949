import { Queue, Worker } from 'bullmq';
import { Redis } from 'ioredis';

import type { Settings } from './config.js';
import type { Logger } from './logger.js';

// ==================== Interface ====================

/** Runs one job; throwing makes the queue try again later, up to JOB_ATTEMPTS times. */
export type JobHandler = (data: Record<string, unknown>) => Promise<void>;
export type JobHandlers = Readonly<Record<string, JobHandler>>;

/**
 * Background work, one interface for both modes: in-process when embedded, BullMQ on Redis when
 * `REDIS_URL` is set (then `keel worker` nodes run the jobs and any node may queue them).
 */
export interface JobQueue {
  readonly kind: 'in-process' | 'redis';
  /** Queues a job. It runs in the background, retried with exponential backoff when it throws. */
  add(name: string, data: Record<string, unknown>): Promise<void>;
  /** Runs queued jobs in this process with these handlers. */
  work(handlers: JobHandlers): void;
  /** Stops taking jobs and waits for the running ones. */
  close(): Promise<void>;
}

const QUEUE_NAME = 'keel-jobs';

function backoffMs(settings: Settings, attempt: number): number {
  return settings.JOB_BACKOFF_MS * 2 ** (attempt - 1);
}

// ==================== In-process (embedded) ====================

class InProcessQueue implements JobQueue {
  readonly kind = 'in-process';
  private handlers: JobHandlers | null = null;
  private readonly waiting: { name: string; data: Record<string, unknown> }[] = [];
  private readonly running = new Set<Promise<void>>();
  private readonly retries = new Map<NodeJS.Timeout, { name: string; data: Record<string, unknown> }>();
  private closing = false;

  constructor(
    private readonly settings: Settings,
    private readonly logger: Logger,
  ) {}

  async add(name: string, data: Record<string, unknown>): Promise<void> {
    if (!this.handlers) {
      this.waiting.push({ name, data });
      return;
    }
    this.start(name, data, 1);
  }

  work(handlers: JobHandlers): void {
    this.handlers = handlers;
    for (const job of this.waiting.splice(0)) this.start(job.name, job.data, 1);
  }

  private start(name: string, data: Record<string, unknown>, attempt: number): void {
    const run = this.attempt(name, data, attempt).finally(() => this.running.delete(run));
    this.running.add(run);
  }

  private async attempt(name: string, data: Record<string, unknown>, attempt: number): Promise<void> {
    const handler = this.handlers?.[name];
    if (!handler) {
      this.logger.error({ job: name }, 'job has no handler; dropped');
      return;
    }
    try {
      await handler(data);
    } catch (error) {
      if (attempt >= this.settings.JOB_ATTEMPTS) {
        this.logger.error({ err: error, job: name, attempt }, 'job failed for good');
        return;
      }
      this.logger.warn({ err: error, job: name, attempt }, 'job failed; will retry');
      if (this.closing) {
        // Shutting down: one last immediate try rather than a retry nobody will be there to run.
        return this.attempt(name, data, this.settings.JOB_ATTEMPTS);
      }
      const timer = setTimeout(() => {
        this.retries.delete(timer);
        this.start(name, data, attempt + 1);
      }, backoffMs(this.settings, attempt));
      this.retries.set(timer, { name, data });
    }
  }

  async close(): Promise<void> {
    this.closing = true;
    // Jobs waiting for a retry get their last try now.
    for (const [timer, job] of this.retries) {
      clearTimeout(timer);
      this.retries.delete(timer);
      this.start(job.name, job.data, this.settings.JOB_ATTEMPTS);
    }
    while (this.running.size) await Promise.allSettled([...this.running]);
  }
}

// ==================== Redis (BullMQ) ====================

class RedisQueue implements JobQueue {
  readonly kind = 'redis';
  private readonly connection: Redis;
  private readonly queue: Queue;
  private worker: Worker | null = null;
  private workerConnection: Redis | null = null;

  constructor(
    private readonly settings: Settings,
    private readonly logger: Logger,
    url: string,
  ) {
    // BullMQ's blocking commands need a client that retries forever rather than failing a request.
    this.connection = new Redis(url, { maxRetriesPerRequest: null, connectTimeout: 2_000 });
    this.connection.on('error', () => undefined);
    this.queue = new Queue(QUEUE_NAME, { connection: this.connection, prefix: `${settings.REDIS_KEY_PREFIX}jobs` });
    this.queue.on('error', () => undefined);
  }

  async add(name: string, data: Record<string, unknown>): Promise<void> {
    await this.queue.add(name, data, {
      attempts: this.settings.JOB_ATTEMPTS,
      backoff: { type: 'exponential', delay: this.settings.JOB_BACKOFF_MS },
      // Kept for inspection: the last completed jobs, and failed ones for a week.
      removeOnComplete: { count: 1_000 },
      removeOnFail: { age: 7 * 24 * 3600 },
    });
  }

  work(handlers: JobHandlers): void {
    this.worker = new Worker(
      QUEUE_NAME,
      async (job) => {
        const handler = handlers[job.name];
        if (!handler) throw new Error(`no handler for job ${job.name}`);
        await handler(job.data as Record<string, unknown>);
      },
      {
        connection: (this.workerConnection = this.connection.duplicate()),
        prefix: `${this.settings.REDIS_KEY_PREFIX}jobs`,
        concurrency: this.settings.JOB_CONCURRENCY,
      },
    );
    this.worker.on('error', (error) => this.logger.error({ err: error }, 'job worker error'));
    this.worker.on('failed', (job, error) => {
      const final = job !== undefined && job.attemptsMade >= (job.opts.attempts ?? 1);
      this.logger[final ? 'error' : 'warn']({ err: error, job: job?.name, jobId: job?.id, attempt: job?.attemptsMade }, final ? 'job failed for good' : 'job failed; will retry');
    });
  }

  async close(): Promise<void> {
    if (this.connection.status !== 'ready') {
      // Redis is out of reach: nothing can be finished or handed back, so drop the connections
      // rather than wait for it.
      this.workerConnection?.disconnect();
      this.connection.disconnect();
      void this.worker?.close(true).catch(() => undefined);
      void this.queue.close().catch(() => undefined);
      return;
    }
    // Worker.close waits for the jobs it is running.
    await this.worker?.close();
    await this.queue.close();
    // BullMQ leaves connections it was given open: without these the process would not exit.
    const workerConnection = this.workerConnection;
    await workerConnection?.quit().catch(() => workerConnection.disconnect());
    await this.connection.quit().catch(() => this.connection.disconnect());
  }
}

export function createQueue(settings: Settings, logger: Logger): JobQueue {
  return settings.REDIS_URL ? new RedisQueue(settings, logger, settings.REDIS_URL) : new InProcessQueue(settings, logger);
}
