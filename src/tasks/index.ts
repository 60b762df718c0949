import type { Settings } from '../core/config.js';
import type { Logger } from '../core/logger.js';
import type { JobHandlers } from '../core/queue.js';

import { emailJobs } from '../services/email/mailer.js';

/** Every background job Keel runs, by name: what `keel worker` (or an embedded node) executes. */
export function jobHandlers(settings: Settings, logger: Logger): JobHandlers {
  return { ...emailJobs(settings, logger) };
}
