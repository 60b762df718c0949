import type { FastifyInstance } from 'fastify';
import type pino from 'pino';

import { ConfigError, type Settings } from './core/config.js';
import { drainingRequests } from './core/http-server.js';
import type { Logger } from './core/logger.js';
import { unservedModelMetrics } from './core/metrics.js';
import { migrateUp, requireMigrated } from './core/migrate.js';
import { checkListenAddress, checkRedis, openCheckedDatabase } from './core/preflight.js';
import { createQueue } from './core/queue.js';
import { createRedis } from './core/redis.js';

import { cacheUsers } from './crud/user.js';
import { openAgentRuns } from './services/agent-runs.js';
import { hasVectorTable } from './services/knowledge/embeddings.js';
import { logStartupNotices } from './services/startup-notices.js';
import { closeStorage } from './services/storage-service.js';
import { releaseHoldsLeftBehind } from './services/usage-meter.js';
import { ensureFirstSuperuser } from './services/user-service.js';

export interface StartOptions {
  /** `start` migrates itself; `api` (scaled mode) expects `keel migrate` to have run. */
  migrate: boolean;
}

/** Opens the database, prepares it, builds the app and listens; returns the running app. */
export async function startServer(settings: Settings, logger: Logger, options: StartOptions): Promise<FastifyInstance> {
  // Each of these fails with one line naming the setting, before anything is changed.
  await checkListenAddress(settings);
  await checkRedis(settings);
  const database = await openCheckedDatabase(settings);
  let app: FastifyInstance | undefined;
  try {
    if (options.migrate) await migrateUp(database, logger);
    else await requireMigrated(database);
    await ensureFirstSuperuser(database.db, settings, logger);
    // Before the app's meters exist (embedded: the holds a killed process left; scaled: nothing).
    await releaseHoldsLeftBehind(database, logger);
    await logStartupNotices(database.db, settings, logger);
    await cacheUsers(database);
    // The embeddings table exists only where pgvector was enabled when the knowledge migration ran
    // (its column is of pgvector's type); search asks the same, cached, question.
    const vectorSearch = await hasVectorTable(database.db);
    if (!vectorSearch) logger.info('pgvector is not available in this database: knowledge search is full-text only');

    // `start` is the whole system in one process; `api` leaves jobs to `keel worker` when Redis
    // carries them, and runs them itself otherwise (nothing else could).
    const runJobs = options.migrate || !settings.REDIS_URL;
    // Imported here: `keel worker` shares this module and needs none of Fastify and the routes.
    const { buildApp } = await import('./app.js');
    app = await buildApp({ settings, database, logger, vectorSearch, runJobs, closeDatabase: true });
    drainable(app);
    await app.listen({ host: settings.HOST, port: settings.PORT });
    return app;
  } catch (error) {
    // The app's own work (embedded maintenance, runs) stops with it; it closes the database too.
    if (app) await app.close().catch(() => undefined);
    await database.close();
    throw error;
  }
}

/**
 * `keel worker` (scaled mode): runs the queue's jobs — agent runs among them — and sweeps runs
 * (queued ones whose job was lost, running ones whose worker died). It needs Redis (where the jobs,
 * run events and cancels travel) and the database (the truth about runs); embedded, `keel start`
 * does all of it itself.
 */
export async function startWorker(settings: Settings, logger: pino.Logger): Promise<{ close: () => Promise<void>; usage: UnwrittenUsageKeeper }> {
  if (!settings.REDIS_URL) {
    throw new ConfigError('REDIS_URL: `keel worker` takes jobs from Redis; without it, `keel start` or `keel api` runs them');
  }
  const database = await openCheckedDatabase(settings);
  try {
    await requireMigrated(database);
    await releaseHoldsLeftBehind(database, logger);
    const redis = createRedis(settings)!;
    const agentRuns = await openAgentRuns({ settings, database, logger, redis, queue: createQueue(settings, logger, undefined, undefined, { laneProducer: redis }), metrics: unservedModelMetrics() });
    agentRuns.work();
    logger.info({ concurrency: settings.JOB_CONCURRENCY, runConcurrency: settings.RUN_CONCURRENCY, emailConcurrency: settings.EMAIL_CONCURRENCY }, 'worker started');
    return {
      usage: agentRuns.meter,
      close: async () => {
        await agentRuns.close();
        await closeStorage(settings);
        await redis.quit().catch(() => redis.disconnect());
        await database.close();
      },
    };
  } catch (error) {
    await database.close();
    throw error;
  }
}

/** Servers that can drain: the function that starts it. */
const drains = new WeakMap<object, () => void>();

/**
 * Draining, before a shutdown: `/ready` answers 503 so load balancers take the node out, while
 * every request (new connections too) is still served; responses ask clients to reconnect
 * (`Connection: close`), so kept-alive connections move to other nodes.
 */
function drainable(app: FastifyInstance): void {
  let draining = false;
  drains.set(app, () => (draining = true));
  // Callback style: it runs on every request, and an async hook costs a promise each time.
  app.addHook('onRequest', (request, reply, done) => {
    if (!draining) return done();
    reply.header('connection', 'close');
    drainingRequests.add(request.raw);
    if (request.routeOptions.url !== '/ready') return done();
    void reply.code(503).send({
      status: 'unavailable',
      checks: { shutdown: 'unavailable' },
      database: app.database.kind,
      vector_search: app.vectorSearch,
    });
  });
}

/** How long a server drains on SIGTERM: SHUTDOWN_DRAIN_MS, else 5 s (none in `local`: nothing balances load there). */
export function drainMs(settings: Settings): number {
  return settings.SHUTDOWN_DRAIN_MS ?? (settings.ENVIRONMENT === 'local' ? 0 : 5_000);
}

/** The usage meter's part in a shutdown: what must outlive the process, and what could not. */
export interface UnwrittenUsageKeeper {
  /** Saves the usage not yet written under DATA_DIR (synchronous: the deadline calls it before exiting). */
  saveUnwritten(): void;
  /** What could be neither written nor saved, in words; null when nothing was lost. */
  lostAtShutdown(): string | null;
}

/**
 * On SIGTERM/SIGINT: a server first drains for SHUTDOWN_DRAIN_MS (a second signal cuts that
 * short), then stops accepting and lets in-flight requests finish; a worker lets its running jobs
 * finish (up to SHUTDOWN_TIMEOUT_MS after the drain); then everything is closed. Usage that could
 * be neither written nor saved makes the exit status 1, its count and cause the last line logged.
 */
export function closeOnSignals(app: { close(): PromiseLike<unknown> }, settings: Settings, logger: pino.Logger, usage?: UnwrittenUsageKeeper): void {
  let closing = false;
  let endDrain: (() => void) | null = null;
  /** Logs what was lost last; whether anything was. */
  const reportLost = (): boolean => {
    const lost = usage?.lostAtShutdown();
    if (lost) logger.error(`shutdown lost usage: ${lost}`);
    return Boolean(lost);
  };
  const close = () => {
    endDrain = null;
    const deadline = setTimeout(() => {
      logger.error('shutdown deadline passed; exiting with work still running');
      // What must outlive the process (the usage not yet written), saved before it goes.
      usage?.saveUnwritten();
      reportLost();
      logger.flush();
      process.exit(1);
    }, settings.SHUTDOWN_TIMEOUT_MS);
    deadline.unref();
    app.close().then(
      () => {
        if (reportLost()) {
          process.exitCode = 1;
        } else {
          logger.info('shut down cleanly');
          process.exitCode = 0;
        }
        logger.flush();
      },
      (error: unknown) => {
        logger.error({ err: error }, 'error while shutting down');
        reportLost();
        logger.flush();
        process.exitCode = 1;
      },
    );
  };
  const shutdown = (signal: NodeJS.Signals) => {
    if (closing) {
      endDrain?.();
      return;
    }
    closing = true;
    const startDraining = drains.get(app);
    const ms = startDraining ? drainMs(settings) : 0;
    if (!startDraining || ms === 0) {
      logger.info({ signal }, 'shutting down');
      close();
      return;
    }
    startDraining();
    logger.info({ signal, drainMs: ms }, 'shutting down: draining (/ready answers 503) before closing');
    const timer = setTimeout(close, ms);
    endDrain = () => {
      clearTimeout(timer);
      close();
    };
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}
