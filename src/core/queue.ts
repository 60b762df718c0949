import { setImmediate as nextTurn } from 'node:timers/promises';

import type * as BullMQ from 'bullmq';
import type { Queue, Worker } from 'bullmq';
import type { Redis } from 'ioredis';
import type { z } from 'zod';

import { JOB_LANES, type JobLane, JOBS, type Jobs, RECOVERED_JOBS } from '../tasks/registry.js';
import type { Settings } from './config.js';
import { JobSealer } from './job-crypto.js';
import { lazyRequire } from './lazy.js';
import type { Logger } from './logger.js';
import { blockingRedis, failFastRedis } from './redis.js';

/** BullMQ, loaded only when REDIS_URL is set. */
const bullmq = lazyRequire<typeof BullMQ>('bullmq');

// ==================== Interface ====================

/** Job names and the schema of each one's data (the application's: tasks/registry.ts). */
export type JobRegistry = Readonly<Record<string, z.ZodType>>;

/** Runs one job; throwing makes the queue try again later, up to JOB_ATTEMPTS times. */
export type JobHandlers<R extends JobRegistry = Jobs> = { readonly [N in keyof R]?: (data: z.output<R[N]>) => Promise<void> };

/**
 * Background work, one interface for both modes: in-process when embedded, BullMQ on Redis when
 * `REDIS_URL` is set (then `keel worker` nodes run the jobs and any node may queue them).
 */
export interface JobQueue<R extends JobRegistry = Jobs> {
  readonly kind: 'in-process' | 'redis';
  /** Queues a job of a registered name; its data is validated here and again when it runs. */
  add<N extends keyof R & string>(name: N, data: z.input<R[N]>): Promise<void>;
  /** Runs queued jobs in this process with these handlers. */
  work(handlers: JobHandlers<R>): void;
  /** Stops taking jobs and waits for the running ones. */
  close(): Promise<void>;
}

type AnyHandler = (data: unknown) => Promise<void>;

/** The registered schema of `name`; an unknown name is a programming error. */
function schemaOf(registry: JobRegistry, name: string): z.ZodType {
  const schema = registry[name];
  if (!schema) throw new Error(`unknown job ${name}`);
  return schema;
}

const QUEUE_NAME = 'keel-jobs';

function backoffMs(settings: Settings, attempt: number): number {
  return settings.JOB_BACKOFF_MS * 2 ** (attempt - 1);
}

// ==================== In-process (embedded) ====================

/** A job the in-process queue has not begun: before its handlers, or past its lane's number at once. */
interface PendingJob {
  name: string;
  data: unknown;
  attempt: number;
  /** A recovered job's data as JSON (null for the others): a copy of one already waiting is not queued again. */
  key: string | null;
}

/** The jobs of a lane (or all the others) the in-process queue runs at once, and those waiting their turn, first in first out. */
interface Slots {
  limit: number;
  active: number;
  pending: PendingJob[];
}

class InProcessQueue<R extends JobRegistry> implements JobQueue<R> {
  readonly kind = 'in-process';
  private handlers: JobHandlers<R> | null = null;
  private readonly waiting: { name: string; data: unknown }[] = [];
  private readonly running = new Set<Promise<void>>();
  private readonly retries = new Map<NodeJS.Timeout, { name: string; data: unknown }>();
  private closing = false;
  /**
   * JOB_CONCURRENCY for most jobs, a lane's number for its own (RUN_CONCURRENCY: agent runs; EMAIL_CONCURRENCY: emails), as a
   * BullMQ worker runs them: without it every job queued ran at once (an embedded process took 50
   * uploads at once into 50 parsing threads, each with its own heap).
   */
  private readonly slots = new Map<string, Slots>();

  constructor(
    private readonly settings: Settings,
    private readonly logger: Logger,
    private readonly registry: R,
    lanes: readonly JobLane[],
    /** RECOVERED_JOBS: dropped rather than begun once the queue closes. */
    private readonly recovered: ReadonlySet<string>,
  ) {
    const others: Slots = { limit: settings.JOB_CONCURRENCY, active: 0, pending: [] };
    for (const name of Object.keys(registry)) this.slots.set(name, others);
    for (const lane of lanes) {
      const own: Slots = { limit: lane.concurrency(settings), active: 0, pending: [] };
      for (const name of lane.jobs) this.slots.set(name, own);
    }
  }

  async add<N extends keyof R & string>(name: N, input: z.input<R[N]>): Promise<void> {
    const data: unknown = schemaOf(this.registry, name).parse(input);
    if (!this.handlers) {
      this.waiting.push({ name, data });
      return;
    }
    // On the event loop's next turn, not inside the caller's: the caller (a run's start) answers
    // its request before the job's first statement takes the database's one session.
    this.start(name, data, 1, true);
  }

  work(handlers: JobHandlers<R>): void {
    this.handlers = handlers;
    for (const job of this.waiting.splice(0)) this.start(job.name, job.data, 1);
  }

  private start(name: string, data: unknown, attempt: number, later = false): void {
    const slots = this.slots.get(name)!;
    if (this.closing && this.recovered.has(name)) {
      this.logger.info({ job: name }, 'job not begun: the process is stopping (its sweeper queues it again at the next start)');
      return this.startNext(slots);
    }
    if (slots.active >= slots.limit) {
      // One waiting copy of a job a sweeper queues again is enough: the sweeper queued it again
      // while it only waited its turn (a run, an entry), every sweep.
      const key = this.recovered.has(name) ? JSON.stringify(data) : null;
      if (key === null || !slots.pending.some((job) => job.key === key && job.name === name)) slots.pending.push({ name, data, attempt, key });
      return;
    }
    slots.active += 1;
    const run = (later ? nextTurn().then(() => this.attempt(name, data, attempt)) : this.attempt(name, data, attempt)).finally(() => {
      this.running.delete(run);
      slots.active -= 1;
      this.startNext(slots);
    });
    this.running.add(run);
  }

  private startNext(slots: Slots): void {
    const next = slots.pending.shift();
    if (next) this.start(next.name, next.data, next.attempt);
  }

  private async attempt(name: string, data: unknown, attempt: number): Promise<void> {
    const handler = this.handlers?.[name] as AnyHandler | undefined;
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

/** Job data as stored in Redis: sealed (job-crypto.ts), never in clear. */
interface StoredJob {
  sealed: string;
}

/** How the queue is set up beyond its settings. */
export interface QueueOptions {
  /**
   * The client the lanes' jobs are queued on (not closed by the queue): the process's own, on which
   * the run bus writes a run's events. A run's start appends its `run.queued` and queues its job
   * without waiting in between; on one connection Redis takes them in that order, so the job cannot
   * be taken before its run's first event is in the log, and both are one round trip (see
   * services/run-service.ts). Every lane's jobs go on it (emails too: nothing is lost by the order);
   * jobs without a lane keep the queue's connection.
   */
  laneProducer?: Redis | null;
  /** The jobs a sweeper queues again (default RECOVERED_JOBS): in-process, not queued twice while one waits, and dropped rather than begun once the queue closes. */
  recovered?: readonly string[];
}

class RedisQueue<R extends JobRegistry> implements JobQueue<R> {
  readonly kind = 'redis';
  private readonly connection: Redis;
  /** BullMQ queues by name: QUEUE_NAME for most jobs, one per lane. */
  private readonly queues = new Map<string, Queue>();
  /** The queue of each job that has a lane of its own. */
  private readonly laneOf = new Map<string, string>();
  private readonly sealer: JobSealer;
  private readonly workers: { worker: Worker; connection: Redis }[] = [];

  constructor(
    private readonly settings: Settings,
    private readonly logger: Logger,
    private readonly registry: R,
    private readonly url: string,
    private readonly lanes: readonly JobLane[],
    laneProducer: Redis | null,
  ) {
    this.sealer = new JobSealer(settings.SECRET_KEY);
    // Only queues' commands go on it (the workers have their own): a job that cannot be handed to
    // Redis fails its `add` within seconds, so an upload or a sweep is not held while Redis is down.
    this.connection = failFastRedis(url);
    for (const lane of lanes) for (const job of lane.jobs) this.laneOf.set(job, lane.queue);
    for (const name of [QUEUE_NAME, ...lanes.map((lane) => lane.queue)]) {
      const connection = name !== QUEUE_NAME && laneProducer ? laneProducer : this.connection;
      // BullMQ would otherwise hold every `add` until the connection was first ready (and ask the
      // server's version first): for ever, in a process that started while Redis refused. The
      // workers, on connections of their own, still check the version.
      const queue = new (bullmq().Queue)(name, { connection, prefix: this.prefix, skipWaitingForReady: true, skipVersionCheck: true });
      queue.on('error', () => undefined);
      this.queues.set(name, queue);
    }
  }

  private get prefix(): string {
    return `${this.settings.REDIS_KEY_PREFIX}jobs`;
  }

  async add<N extends keyof R & string>(name: N, input: z.input<R[N]>): Promise<void> {
    const data: unknown = schemaOf(this.registry, name).parse(input);
    const stored: StoredJob = { sealed: this.sealer.seal(name, data) };
    await this.queues.get(this.laneOf.get(name) ?? QUEUE_NAME)!.add(name, stored, {
      attempts: this.settings.JOB_ATTEMPTS,
      backoff: { type: 'exponential', delay: this.settings.JOB_BACKOFF_MS },
      // Jobs hold personal data (email addresses, reset links): a finished one is deleted at once.
      // Failed ones are kept a week for inspection, their data sealed and their reason scrubbed.
      removeOnComplete: true,
      removeOnFail: { age: 7 * 24 * 3600 },
    });
  }

  /**
   * A BullMQ worker per queue, each with its concurrency (JOB_CONCURRENCY, or its lane's) and its
   * own blocking connection; a lane's worker only where its jobs have a handler. Every worker runs
   * every job it finds (a job queued where an older version put it still runs).
   */
  work(handlers: JobHandlers<R>): void {
    const processor = this.processor(handlers);
    const queues = [{ queue: QUEUE_NAME, concurrency: this.settings.JOB_CONCURRENCY }];
    for (const lane of this.lanes) if (lane.jobs.some((job) => handlers[job])) queues.push({ queue: lane.queue, concurrency: lane.concurrency(this.settings) });
    for (const { queue, concurrency } of queues) {
      const connection = blockingRedis(this.url);
      const worker = new (bullmq().Worker)(queue, processor, { connection, prefix: this.prefix, concurrency });
      worker.on('error', (error) => this.logger.error({ err: error }, 'job worker error'));
      worker.on('failed', (job, error) => {
        const final = job !== undefined && job.attemptsMade >= (job.opts.attempts ?? 1);
        this.logger[final ? 'error' : 'warn']({ err: error, job: job?.name, jobId: job?.id, attempt: job?.attemptsMade }, final ? 'job failed for good' : 'job failed; will retry');
      });
      this.workers.push({ worker, connection });
    }
  }

  private processor(handlers: JobHandlers<R>): BullMQ.Processor {
    const { UnrecoverableError } = bullmq();
    return async (job) => {
        const handler = handlers[job.name] as AnyHandler | undefined;
        if (!handler) throw new Error(`no handler for job ${job.name}`);
        let data: unknown;
        try {
          const stored = job.data as Partial<StoredJob>;
          data = schemaOf(this.registry, job.name).parse(this.sealer.open(job.name, stored.sealed ?? ''));
        } catch (error) {
          // Altered, sealed under another SECRET_KEY, or of an older shape: no retry can help.
          this.logger.error({ err: error, job: job.name, jobId: job.id }, 'job data unreadable; dropped');
          throw Object.assign(new UnrecoverableError(`job ${job.name} has unreadable data`), { cause: error });
        }
        try {
          await handler(data);
        } catch (error) {
          // Redis keeps a failed job's message and stack: those of this error, which name no
          // recipient (an SMTP error quotes the address). Its cause, logged below, is not stored.
          const code = (error as { code?: unknown }).code;
          throw new Error(`job ${job.name} failed${typeof code === 'string' ? ` (${code})` : ''}`, { cause: error });
        }
    };
  }

  async close(): Promise<void> {
    const queues = [...this.queues.values()];
    // Redis is out of reach: nothing can be finished or handed back, so drop the connections rather than wait for it.
    if (this.connection.status !== 'ready') return this.drop(queues);
    // Redis may go away during the graceful close (a moment before it, or silent with the
    // connection still `ready`): the workers' connections have no command timeout, so their
    // jobs' last writes and their QUIT would then wait for ever, and the shutdown steps after the
    // queue (the usage meter's flush) would never run. A PING on the queue's connection (whose
    // commands time out) watches it while it lasts; the first unanswered one drops the connections.
    const watch = watchRedis(this.connection);
    try {
      const graceful = this.closeGracefully(queues);
      const closed = await Promise.race([graceful.then(() => true), watch.lost.then(() => false)]);
      if (!closed) {
        // What the graceful close was waiting on fails once its connections are dropped.
        graceful.catch(() => undefined);
        this.logger.warn('Redis stopped answering while the job queue closed: its connections were dropped');
        this.drop(queues);
      }
    } finally {
      watch.stop();
    }
  }

  private async closeGracefully(queues: Queue[]): Promise<void> {
    // Worker.close waits for the jobs it is running.
    await Promise.all(this.workers.map(({ worker }) => worker.close()));
    await Promise.all(queues.map((queue) => queue.close()));
    // BullMQ leaves connections it was given open: without these the process would not exit.
    for (const { connection } of this.workers) await connection.quit().catch(() => connection.disconnect());
    await this.connection.quit().catch(() => this.connection.disconnect());
  }

  private drop(queues: Queue[]): void {
    for (const { worker, connection } of this.workers) {
      connection.disconnect();
      void worker.close(true).catch(() => undefined);
    }
    this.connection.disconnect();
    for (const queue of queues) void queue.close().catch(() => undefined);
  }
}

/** How often Redis is asked whether it still answers while the queue closes (each PING has REDIS_COMMAND_TIMEOUT_MS). */
const CLOSE_WATCH_INTERVAL_MS = 500;

/** `lost` resolves once a PING on `connection` fails (Redis gone or silent), until `stop()`. */
function watchRedis(connection: Redis): { lost: Promise<void>; stop: () => void } {
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  const lost = new Promise<void>((resolve) => {
    const ping = () => {
      connection.ping().then(
        () => {
          if (!stopped) timer = setTimeout(ping, CLOSE_WATCH_INTERVAL_MS);
        },
        () => {
          if (!stopped) resolve();
        },
      );
    };
    ping();
  });
  return {
    lost,
    stop: () => {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

/** The queue of `registry`'s jobs (default: the application's, tasks/registry.ts, with its lanes). */
export function createQueue<R extends JobRegistry = Jobs>(settings: Settings, logger: Logger, registry: R = JOBS as JobRegistry as R, lanes: readonly JobLane[] = JOB_LANES, options: QueueOptions = {}): JobQueue<R> {
  return settings.REDIS_URL ? new RedisQueue(settings, logger, registry, settings.REDIS_URL, lanes, options.laneProducer ?? null) : new InProcessQueue(settings, logger, registry, lanes, new Set(options.recovered ?? RECOVERED_JOBS));
}
