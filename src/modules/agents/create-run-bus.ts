import type { Redis } from 'ioredis';

import type { Settings } from '../../core/config.js';
import type { Db } from '../../core/db.js';
import type { Logger } from '../../core/logger.js';

import { DatabaseRunEventLog, InProcessRunSignals } from './embedded-run-bus.js';
import type { RunEventLog, RunSignals } from './run-bus.js';

/** How a run's events and cancels travel: the one pair every part of the app uses. */
export interface RunBus {
  events: RunEventLog;
  signals: RunSignals;
}

export interface RunBusOptions {
  settings: Settings;
  db: Db;
  log: Logger;
  /** The app's Redis client (REDIS_URL), null when embedded. */
  redis: Redis | null;
}

/**
 * The run bus of this deployment: the one place that picks the implementation. Embedded: the
 * database log with in-process notification and in-process cancels. Scaled (REDIS_URL) plugs its
 * Redis Streams log and pub/sub signals in here; until then every node uses the embedded pair.
 */
export function createRunBus({ settings, db, log }: RunBusOptions): RunBus {
  return {
    events: new DatabaseRunEventLog(db, log.child({ component: 'run-events' }), settings.RUN_EVENTS_FLUSH_MS),
    signals: new InProcessRunSignals(),
  };
}
