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

/** A client that fails fast when Redis is down or stops answering, instead of queueing or waiting without bound. */
export function createRedis(settings: Settings): Redis | null {
  if (!settings.REDIS_URL) return null;
  const client = new (ioredis().Redis)(settings.REDIS_URL, {
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
