import type { Redis } from 'ioredis';

import type { Settings } from '../../core/config.js';
import type { Db } from '../../core/db.js';
import type { Logger } from '../../core/logger.js';

import { DatabaseRunEventLog, EmbeddedRunEvents, InProcessRunSignals } from './embedded-run-bus.js';
import { createRedisRunBus } from './redis-run-bus.js';
import type { RunBus } from './run-bus.js';

export interface RunBusOptions {
  settings: Settings;
  db: Db;
  log: Logger;
  /** The app's Redis client (REDIS_URL), null when embedded. */
  redis: Redis | null;
}

/**
 * The run bus of this deployment: the one place that picks the implementation. Embedded: the
 * database log with in-process notification and in-process cancels (one process holds the data).
 * Scaled (REDIS_URL): Redis Streams and pub/sub on the process's client, so any API node serves any
 * run's stream and a cancel sent to any node reaches the worker. Closing: `events.close()`, then
 * `signals.close()`, then the Redis client (the bus does not own it).
 */
export function createRunBus({ settings, db, log, redis }: RunBusOptions): RunBus {
  if (redis) return createRedisRunBus(redis, settings, log.child({ component: 'run-bus' }));
  return {
    events: new DatabaseRunEventLog(new EmbeddedRunEvents(db, log.child({ component: 'run-events' }), settings.RUN_EVENTS_FLUSH_MS)),
    signals: new InProcessRunSignals(),
  };
}
