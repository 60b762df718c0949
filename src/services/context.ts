import type { FastifyRequest } from 'fastify';

import type { Settings } from '../core/config.js';
import type { Db } from '../core/db.js';
import type { Logger } from '../core/logger.js';
import type { JobQueue } from '../core/queue.js';

import type { RunDeps } from '../modules/agents/run-lifecycle.js';
import type { ModelManager } from '../modules/ai-models/index.js';
import type { Principal } from '../utils/authentication.js';

/** What every service call of an authenticated request works with, passed as one object. */
export interface ServiceContext {
  db: Db;
  settings: Settings;
  log: Logger;
  principal: Principal;
  /** The app's one model manager (the catalog a model name is checked against). */
  models: ModelManager;
  /** Background work (ingestion, email). */
  queue: JobQueue;
  /** Agent runs: what a change elsewhere ends (a revoked API key's runs). */
  runs: RunDeps;
}

export function contextOf(request: FastifyRequest): ServiceContext {
  const { db, settings, models, queue, runs } = request.server;
  return { db, settings, log: request.log, principal: request.principal, models, queue, runs };
}
