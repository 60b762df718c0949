import type * as IORedis from 'ioredis';
import type { Redis } from 'ioredis';

import type { Settings } from './config.js';
import { lazyRequire } from './lazy.js';

/** ioredis, loaded only when REDIS_URL is set. */
export const ioredis = lazyRequire<typeof IORedis>('ioredis');

/**
 * How long a command of the app's client may go unanswered. Its commands (rate-limit counters, run
 * events, job hand-offs) take well under a millisecond; one that a stopped or unreachable server
 * never answers failed nothing and held its request until the TCP connection gave up (minutes).
 */
export const REDIS_COMMAND_TIMEOUT_MS = 2_000;

/** The app's client (null without REDIS_URL): failFastRedis on REDIS_URL. */
export function createRedis(settings: Settings): Redis | null {
  return settings.REDIS_URL ? failFastRedis(settings.REDIS_URL) : null;
}

/**
 * A client that fails fast when Redis is down or stops answering, instead of queueing or waiting
 * without bound: every client a request or a sweep waits on (the app's, the job queue's producer).
 * Not for BullMQ's workers, whose blocking commands wait by design (see blockingRedis).
 */
export function failFastRedis(url: string): Redis {
  const client = new (ioredis().Redis)(url, {
    lazyConnect: false,
    enableOfflineQueue: true,
    maxRetriesPerRequest: 1,
    connectTimeout: 2_000,
    commandTimeout: REDIS_COMMAND_TIMEOUT_MS,
    retryStrategy: (attempt) => Math.min(attempt * 200, 2_000),
  });
  // Connection errors surface in the commands that fail; this keeps them from crashing the process.
  client.on('error', () => undefined);
  return client;
}

/**
 * A client for a BullMQ worker: its blocking commands (waiting for a job) go unanswered for as long
 * as there is none, so no command timeout, and BullMQ requires it to retry them forever
 * (`maxRetriesPerRequest: null`) rather than fail them. Nothing a request waits on may use it.
 */
export function blockingRedis(url: string): Redis {
  const client = new (ioredis().Redis)(url, { maxRetriesPerRequest: null, connectTimeout: 2_000 });
  client.on('error', () => undefined);
  return client;
}
