/**
 * What runs agents and background jobs in a process, built in one place for every kind of node:
 * the usage meter and model manager (startModelRuntime), the run bus, the runner, the sweeper, and
 * the queue's jobs (runs, ingestion, email) with their sweeps. `keel start` and `keel api` build it inside the app (api nodes with Redis only queue
 * runs: they never `work()`); `keel worker` builds it alone and works the queue.
 */
import type { Redis } from 'ioredis';

import type { Settings } from '../core/config.js';
import type { Database } from '../core/db.js';
import type { Logger } from '../core/logger.js';
import type { ModelMetrics } from '../core/metrics.js';
import type { JobQueue } from '../core/queue.js';

import { createRunBus } from '../modules/agents/create-run-bus.js';
import type { RunDeps } from '../modules/agents/run-lifecycle.js';
import { RunSweeper } from '../modules/agents/run-sweeper.js';
import { AgentRunner } from '../modules/agents/runner.js';
import type { ToolImplementations } from '../modules/agents/tools.js';
import { startJobs } from '../tasks/index.js';
import { startModelRuntime } from './model-sync.js';
import type { UsageMeterService } from './usage-meter.js';

export interface AgentRunsOptions {
  settings: Settings;
  database: Database;
  logger: Logger;
  /** The process's Redis client (REDIS_URL), null when embedded; its owner closes it after `close()`. */
  redis: Redis | null;
  /** The process's job queue; `close()` closes it (its jobs use the runner). */
  queue: JobQueue;
  metrics: ModelMetrics;
  tools?: ToolImplementations;
}

export interface AgentRuns {
  /** What the API and the runner share (RunDeps), and this process's runner. */
  runs: RunDeps & { runner: AgentRunner };
  meter: UsageMeterService;
  /**
   * Takes the queue's jobs (`run-agent` with this runner, ingestion, email) and sweeps runs and entries: queued runs whose job
   * is lost, runs whose worker died. Several sweepers at once are safe: every change they make is a
   * conditional update, a duplicate job finds its run claimed, and the log refuses a second final event.
   */
  work(): void;
  /** Hands running runs back, then stops the catalog, usage meter, queue and bus, in that order. */
  close(): Promise<void>;
}

export async function openAgentRuns({ settings, database, logger, redis, queue, metrics, tools = {} }: AgentRunsOptions): Promise<AgentRuns> {
  const runtime = await startModelRuntime({ database, db: database.db, settings, log: logger, metrics, redis });
  const bus = createRunBus({ settings, db: database.db, log: logger, redis });
  const deps: RunDeps = {
    db: database.db,
    settings,
    log: logger,
    bus,
    queue,
    models: runtime.models,
    tools,
    charged: (userId) => runtime.meter.written(userId),
    refuseSpentKeyRpm: (keyId, rpm) => runtime.meter.refuseSpentKeyRpm(keyId, rpm),
  };
  const runner = new AgentRunner(deps);
  let sweeper: RunSweeper | null = null;
  let stopJobs = async (): Promise<void> => undefined;
  return {
    runs: { ...deps, runner },
    meter: runtime.meter,
    work() {
      // Jobs start once everything they use exists (jobs queued before wait in the queue).
      stopJobs = startJobs(queue, { settings, logger, db: database.db, models: runtime.models, runner });
      sweeper = new RunSweeper(deps, runner);
      sweeper.start();
    },
    async close() {
      // Running runs are handed back first (they resume at the next start or on another worker).
      await sweeper?.stop();
      await runner.close();
      await stopJobs();
      // Running jobs finish (their model calls metered) before the meter writes what it holds.
      await queue.close();
      await runtime.close();
      await bus.events.close();
      await bus.signals.close();
    },
  };
}
