import type { Redis } from 'ioredis';

import type { Settings } from '../../core/config.js';
import type { Logger } from '../../core/logger.js';

import { RedisRunEventLog } from './redis-run-events.js';
import { RedisRunSignals } from './redis-run-signals.js';
import { RedisSubscriber } from './redis-subscriber.js';

/**
 * Scaled mode's run bus on the process's Redis client (`redis`, which it does not close): commands
 * go through it; both parts share one extra connection in subscriber mode, closed with the last of
 * them (`events.close()` and `signals.close()`).
 */
export function createRedisRunBus(
  redis: Redis,
  settings: Pick<Settings, 'REDIS_KEY_PREFIX' | 'RUN_EVENTS_TTL_SECONDS'>,
  logger: Logger,
): { events: RedisRunEventLog; signals: RedisRunSignals } {
  const keyPrefix = settings.REDIS_KEY_PREFIX;
  const subscriber = new RedisSubscriber(redis, `${keyPrefix}run-bus`, logger);
  return {
    events: new RedisRunEventLog(redis, subscriber, { keyPrefix, endedTtlSeconds: settings.RUN_EVENTS_TTL_SECONDS }),
    signals: new RedisRunSignals(redis, subscriber, { keyPrefix }, logger),
  };
}
