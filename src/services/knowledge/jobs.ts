import type { Settings } from '../../core/config.js';
import type { Db } from '../../core/db.js';
import type { Logger } from '../../core/logger.js';
import type { JobHandlers } from '../../core/queue.js';

import type { ModelManager } from '../../modules/ai-models/index.js';
import { ingestEntry } from './ingestion.js';

/** The knowledge base's background jobs. */
export function knowledgeJobs(runtime: { settings: Settings; logger: Logger; db: Db; models: ModelManager }): JobHandlers {
  const deps = { db: runtime.db, settings: runtime.settings, log: runtime.logger, models: runtime.models };
  return {
    'ingest-entry': ({ entry_id }) => ingestEntry(deps, entry_id),
  };
}
