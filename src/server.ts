import type { FastifyInstance } from 'fastify';
import type pino from 'pino';

import { ConfigError, type Settings } from './core/config.js';
import type { Database } from './core/db.js';
import type { Logger } from './core/logger.js';
import { migrateUp, pendingMigrations } from './core/migrate.js';
import { checkListenAddress, checkRedis, openCheckedDatabase } from './core/preflight.js';
import { createQueue } from './core/queue.js';

import { buildApp } from './app.js';
import { cacheUsers } from './crud/user.js';
import { logStartupNotices } from './services/startup-notices.js';
import { ensureFirstSuperuser } from './services/user-service.js';
import { jobHandlers } from './tasks/index.js';

export interface StartOptions {
  /** `start` migrates itself; `api` (scaled mode) expects `keel migrate` to have run. */
  migrate: boolean;
}

/** Whether the vector extension is enabled in this database (it is created by migrate where available). */
async function vectorEnabled(database: Database): Promise<boolean> {
  return database.withSession(async (session) => {
    const rows = await session.query<{ enabled: boolean }>(`select exists(select 1 from pg_extension where extname = 'vector') as enabled`);
    return rows[0]?.enabled === true;
  });
}

/** Opens the database, prepares it, builds the app and listens; returns the running app. */
export async function startServer(settings: Settings, logger: Logger, options: StartOptions): Promise<FastifyInstance> {
  // Each of these fails with one line naming the setting, before anything is changed.
  await checkListenAddress(settings);
  await checkRedis(settings);
  const database = await openCheckedDatabase(settings);
  try {
    if (options.migrate) {
      await migrateUp(database, logger);
    } else {
      const pending = await pendingMigrations(database);
      if (pending.length) throw new ConfigError(`the database is missing migrations (${pending.join(', ')}): run \`keel migrate\` first`);
    }
    await ensureFirstSuperuser(database.db, settings, logger);
    await logStartupNotices(database.db, settings, logger);
    await cacheUsers(database);
    const vectorSearch = await vectorEnabled(database);
    if (!vectorSearch) logger.info('pgvector is not available in this database: knowledge search (a later feature) will be full-text only');

    // `start` is the whole system in one process; `api` leaves jobs to `keel worker` when Redis
    // carries them, and runs them itself otherwise (nothing else could).
    const runJobs = options.migrate || !settings.REDIS_URL;
    const app = await buildApp({ settings, database, logger, vectorSearch, runJobs });
    app.addHook('onClose', () => database.close());
    await app.listen({ host: settings.HOST, port: settings.PORT });
    return app;
  } catch (error) {
    await database.close();
    throw error;
  }
}

/** `keel worker`: runs the queue's jobs (with Redis; embedded, `keel start` runs them itself). */
export function startWorker(settings: Settings, logger: pino.Logger): { close: () => Promise<void> } {
  if (!settings.REDIS_URL) {
    throw new ConfigError('REDIS_URL: `keel worker` takes jobs from Redis; without it, `keel start` or `keel api` runs them');
  }
  const queue = createQueue(settings, logger);
  queue.work(jobHandlers(settings, logger));
  logger.info({ concurrency: settings.JOB_CONCURRENCY }, 'worker started');
  return { close: () => queue.close() };
}

/**
 * On SIGTERM/SIGINT: the server stops accepting and lets in-flight requests finish, a worker lets
 * its running jobs finish (up to the deadline); then everything is closed.
 */
export function closeOnSignals(app: { close(): PromiseLike<unknown> }, settings: Settings, logger: pino.Logger): void {
  let closing = false;
  const shutdown = (signal: NodeJS.Signals) => {
    if (closing) return;
    closing = true;
    logger.info({ signal }, 'shutting down');
    const deadline = setTimeout(() => {
      logger.error('shutdown deadline passed; exiting with work still running');
      logger.flush();
      process.exit(1);
    }, settings.SHUTDOWN_TIMEOUT_MS);
    deadline.unref();
    app.close().then(
      () => {
        logger.info('shut down cleanly');
        logger.flush();
        process.exitCode = 0;
      },
      (error: unknown) => {
        logger.error({ err: error }, 'error while shutting down');
        logger.flush();
        process.exitCode = 1;
      },
    );
  };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);
}
