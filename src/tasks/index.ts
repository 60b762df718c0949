import type { Settings } from '../core/config.js';
import type { Logger } from '../core/logger.js';
import type { JobHandlers } from '../core/queue.js';

import type { AgentRunner } from '../modules/agents/runner.js';
import { emailJobs } from '../services/email/mailer.js';

/**
 * Every background job Keel runs, by name: what `keel worker` (or an embedded node) executes.
 * `run-agent` needs a runner (a database and the model manager): a process without one leaves
 * those jobs to the processes that have it.
 */
export function jobHandlers(settings: Settings, logger: Logger, runner?: AgentRunner): JobHandlers {
  return {
    ...emailJobs(settings, logger),
    ...(runner ? { 'run-agent': ({ run_id }) => runner.execute(run_id) } : {}),
  };
}
