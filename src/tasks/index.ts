import type { Settings } from '../core/config.js';
import type { Db } from '../core/db.js';
import type { Logger } from '../core/logger.js';
import type { JobHandlers, JobQueue } from '../core/queue.js';

import type { ModelManager } from '../modules/ai-models/index.js';
import { emailJobs } from '../services/email/mailer.js';
import { startIngestionSweeper } from '../services/knowledge/ingestion.js';
import { knowledgeJobs } from '../services/knowledge/jobs.js';

/** What jobs run with: the process's settings, log, database and model manager. */
export interface JobRuntime {
  settings: Settings;
  logger: Logger;
  db: Db;
  models: ModelManager;
}

/** Every background job Keel runs, by name: what `keel worker` (or an embedded node) executes. */
export function jobHandlers(runtime: JobRuntime): JobHandlers {
  return { ...emailJobs(runtime.settings, runtime.logger), ...knowledgeJobs(runtime) };
}

/**
 * Runs the jobs of `queue` in this process, and the sweeps that re-queue work a stopped process
 * left behind. Returns what stops the sweeps (the queue closes on its own).
 */
export function startJobs(queue: JobQueue, runtime: JobRuntime): () => Promise<void> {
  queue.work(jobHandlers(runtime));
  return startIngestionSweeper({ db: runtime.db, settings: runtime.settings, log: runtime.logger }, queue);
}
