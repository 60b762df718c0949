import type { Settings } from '../core/config.js';
import type { Db } from '../core/db.js';
import type { Logger } from '../core/logger.js';
import type { JobHandlers, JobQueue } from '../core/queue.js';

import type { AgentRunner } from '../modules/agents/runner.js';
import type { ModelManager } from '../modules/ai-models/index.js';
import { emailJobs } from '../services/email/mailer.js';
import { startIngestionSweeper } from '../services/knowledge/ingestion.js';
import { knowledgeJobs } from '../services/knowledge/jobs.js';

/** What jobs run with: the process's settings, log, database and model manager, and its runner. */
export interface JobRuntime {
  settings: Settings;
  logger: Logger;
  db: Db;
  models: ModelManager;
  /** `run-agent` needs a runner: a process without one leaves those jobs to the processes that have it. */
  runner?: AgentRunner;
}

/** Every background job Keel runs, by name: what `keel worker` (or an embedded node) executes. */
export function jobHandlers(runtime: JobRuntime): JobHandlers {
  const { runner } = runtime;
  return {
    ...emailJobs(runtime.settings, runtime.logger),
    ...knowledgeJobs(runtime),
    ...(runner ? { 'run-agent': ({ run_id }) => runner.execute(run_id) } : {}),
  };
}

/**
 * Runs the jobs of `queue` in this process, and the sweeps that re-queue ingestion work a stopped
 * process left behind (runs have their own sweeper). Returns what stops the sweeps (the queue
 * closes on its own).
 */
export function startJobs(queue: JobQueue, runtime: JobRuntime): () => Promise<void> {
  queue.work(jobHandlers(runtime));
  return startIngestionSweeper({ db: runtime.db, settings: runtime.settings, log: runtime.logger }, queue);
}
