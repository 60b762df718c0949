import type * as IORedis from 'ioredis';
import type { Redis } from 'ioredis';

import type { Settings } from './config.js';
import { lazyRequire } from './lazy.js';

/** ioredis, loaded only when REDIS_URL is set. */
export const ioredis = lazyRequire<typeof IORedis>('ioredis');

/** A client that fails fast when Redis is down instead of queueing commands without bound. */
export function createRedis(settings: Settings): Redis | null {
  if (!settings.REDIS_URL) return null;
  const client = new (ioredis().Redis)(settings.REDIS_URL, {
    lazyConnect: false,
    enableOfflineQueue: true,
    maxRetriesPerRequest: 1,
    connectTimeout: 2_000,
    retryStrategy: (attempt) => Math.min(attempt * 200, 2_000),
  });
  // Connection errors surface in the commands that fail; this keeps them from crashing the process.
  client.on('error', () => undefined);
  return client;
}
