import { randomUUID } from 'node:crypto';
import { setMaxListeners } from 'node:events';

import Fastify, { type FastifyInstance, type FastifyReply, LogController } from 'fastify';
import { serializerCompiler, validatorCompiler, type ZodTypeProvider } from 'fastify-type-provider-zod';
import type { Redis } from 'ioredis';

import { registerAccessLog } from './core/access-log.js';
import type { Settings } from './core/config.js';
import { registerCors } from './core/cors.js';
import type { Database, Db } from './core/db.js';
import { registerErrorHandler, ShuttingDownError, UpstreamLoopError } from './core/errors.js';
import { HOP_HEADER, hopMark, hopsOf } from './core/hop.js';
import { serverOptions, shutdownCutAtMs, slashesInLastSegment, trackConnections } from './core/http-server.js';
import { codedBodyRefused, FORM_CONTENT_TYPE, jsonBodyParser, nonJsonBodyRefused } from './core/json-body.js';
import { lazyRequestLogger, type Logger } from './core/logger.js';
import { type EmbeddedMaintenance, startEmbeddedMaintenance } from './core/maintenance.js';
import { MAX_PARAM_LENGTH } from './core/method-not-allowed.js';
import { createMetrics, type Metrics } from './core/metrics.js';
import { registerDocs, registerOpenApi } from './core/openapi.js';
import { createQueue, type JobQueue } from './core/queue.js';
import { createRedis } from './core/redis.js';
import { TokenService } from './core/security.js';
import { prepareDummyHash } from './core/security.js';
import { securityHeaders } from './core/security-headers.js';

import { API_PREFIX, registerApi } from './api/main.js';
import { cacheApiKeys } from './crud/api-key.js';
import type { RunDeps } from './modules/agents/run-lifecycle.js';
import type { AgentRunner } from './modules/agents/runner.js';
import type { ToolImplementations } from './modules/agents/tools.js';
import type { ModelManager } from './modules/ai-models/index.js';
import { OPENAI_PREFIX, openaiRouter } from './routers/openai.js';
import { opsRouter } from './routers/ops.js';
import { openAgentRuns } from './services/agent-runs.js';
import { Mailer } from './services/email/mailer.js';
import { EventStreamSlots } from './services/event-streams.js';
import { openAIUnreadableUrl } from './services/openai-gateway.js';
import { closeStorage, getStorageService, type StorageService } from './services/storage-service.js';
import type { UsageMeterService } from './services/usage-meter.js';
import type { Principal } from './utils/authentication.js';

declare module 'fastify' {
  interface FastifyInstance {
    settings: Settings;
    database: Database;
    db: Db;
    redis: Redis | null;
    tokens: TokenService;
    mailer: Mailer;
    queue: JobQueue;
    metrics: Metrics;
    vectorSearch: boolean;
    /** The one model manager (catalog, providers, call path), fed from the database. */
    models: ModelManager;
    /** Meters every call of `models`: usage records, credits, API-key limits. */
    meter: UsageMeterService;
    /** The guide's `get_storage_service(prefix=…)`: files under `prefix` on STORAGE_BACKEND (SPEC §10). */
    storage: (prefix: string) => StorageService;
    /** Agent runs: their event bus, queue and model manager (RunDeps), and this process's runner. */
    runs: RunDeps & { runner: AgentRunner };
    /** Embedded maintenance (VACUUM, ANALYZE: core/maintenance.ts); null on a PostgreSQL server or with PGLITE_MAINTENANCE=false. */
    maintenance: EmbeddedMaintenance | null;
    /** The run-event streams each user holds open on this process (RUN_EVENTS_MAX_STREAMS_PER_USER). */
    eventStreams: EventStreamSlots;
    /**
     * Aborted (with a ShuttingDownError) when closing starts: what waits on a client's pace, such
     * as an upload whose body trickles in, ends then rather than hold the close up for as long as
     * HTTP_REQUEST_TIMEOUT_MS.
     */
    closingSignal: AbortSignal;
  }
  interface FastifyRequest {
    principal: Principal;
    /** Other Keel deployments' hop marks the request came with (core/hop.ts), sent on with this one's by its model calls; undefined: none. */
    hops: readonly string[] | undefined;
  }
}

export interface AppOptions {
  settings: Settings;
  database: Database;
  logger: Logger;
  /** Whether pgvector is enabled in this database (decided at start-up). */
  vectorSearch: boolean;
  /** Whether this process also runs background jobs (embedded: always; with Redis: `keel worker` does). */
  runJobs: boolean;
  /** Close the database when the app closes, after every other close hook (usage flush, queue) has run. */
  closeDatabase?: boolean;
  /** Implementations of the agents' tools by name (modules/agents/tools.ts); a tool without one answers the model with an error. */
  tools?: ToolImplementations;
}

const REQUEST_ID = /^[\w.:-]{1,128}$/;

/** The routes named by a model id, which may hold slashes (see slashesInLastSegment). */
const modelIdPaths = slashesInLastSegment([`${OPENAI_PREFIX}/models/`, `${API_PREFIX}/models/`]);

export async function buildApp({ settings, database, logger, vectorSearch, runJobs, closeDatabase = false, tools = {} }: AppOptions): Promise<FastifyInstance> {
  const trustProxy = settings.TRUST_PROXY;
  const app = Fastify({
    loggerInstance: logger,
    // One line per request (onResponse below) instead of Fastify's two.
    logController: new LogController({ disableRequestLogging: true, requestIdLogLabel: 'reqId' }),
    childLoggerFactory: lazyRequestLogger,
    // A hop count trusts that many proxies nearest to us (Fastify's types take it as a function).
    trustProxy: typeof trustProxy === 'number' ? (_address: string, hop: number) => hop < trustProxy : trustProxy,
    bodyLimit: settings.BODY_LIMIT_BYTES,
    requestIdHeader: false,
    // A caller's request id is kept (when sane) so one id follows a request across services.
    genReqId: (req) => {
      const given = req.headers['x-request-id'];
      return typeof given === 'string' && REQUEST_ID.test(given) ? given : randomUUID();
    },
    // A client joining a base URL that ends in a slash with a path that starts with one (`/v1/` + `/chat/completions`) asks for the route all the same.
    routerOptions: { ignoreTrailingSlash: true, ignoreDuplicateSlashes: true, maxParamLength: MAX_PARAM_LENGTH },
    rewriteUrl: (req) => modelIdPaths(req.url ?? '/'),
    // URLs the router cannot read (bad percent-encoding, over-long parameters) never reach the
    // error handler: answer them in the API's `{detail}` shape too.
    frameworkErrors: (error, request, reply) => {
      const status = error.statusCode === 414 ? 414 : 400;
      const answer = (reply as FastifyReply).code(status).header('x-request-id', request.id).type('application/json; charset=utf-8');
      // Under /v1, OpenAI's error object, as for every other refusal there.
      if (request.url === OPENAI_PREFIX || request.url.startsWith(`${OPENAI_PREFIX}/`)) {
        const { status: openAIStatus, body } = openAIUnreadableUrl(request.originalUrl, status);
        void answer.code(openAIStatus).send(body);
        return;
      }
      void answer.send({ detail: status === 414 ? 'URI too long' : 'Invalid URL' });
    },
    // Our own 503 once closing (below), in the API's shape: Fastify's has a shape of its own.
    return503OnClosing: false,
    forceCloseConnections: 'idle',
    ...serverOptions(settings),
  }).withTypeProvider<ZodTypeProvider>();

  // onClose hooks run last-registered first: registered before all others, this one runs last.
  if (closeDatabase) app.addHook('onClose', () => database.close());
  // Connections without a request in flight end when closing starts (see trackConnections).
  const connections = trackConnections(app.server);
  const closing = new AbortController();
  // One listener per upload in flight (routers/knowledge.ts): many at once are not a leak.
  setMaxListeners(0, closing.signal);
  app.decorate('closingSignal', closing.signal);
  app.addHook('preClose', (done) => {
    closing.abort(new ShuttingDownError());
    connections.startClosing();
    // Not cleared on close: Fastify waits for the connections after its onClose hooks, and a
    // connection it cuts is gone by then anyway.
    setTimeout(connections.cutUnreceivedBodies, shutdownCutAtMs(settings)).unref();
    done();
  });
  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(serializerCompiler);

  const redis = createRedis(settings);
  const queue = createQueue(settings, logger, undefined, undefined, { laneProducer: redis });
  const mailer = new Mailer(settings, queue);
  app.decorate('settings', settings);
  app.decorate('database', database);
  app.decorate('db', database.db);
  app.decorate('redis', redis);
  app.decorate('tokens', new TokenService(settings));
  app.decorate('mailer', mailer);
  app.decorate('queue', queue);
  const metrics = createMetrics();
  app.decorate('metrics', metrics);
  app.decorate('vectorSearch', vectorSearch);
  app.decorate('storage', (prefix: string) => getStorageService(settings, { prefix }));
  app.addHook('onClose', () => closeStorage(settings));
  await cacheApiKeys(database);
  const agentRuns = await openAgentRuns({ settings, database, logger, redis, queue, metrics: metrics.models, tools });
  app.decorate('meter', agentRuns.meter);
  app.decorate('models', agentRuns.runs.models);
  app.decorate('runs', agentRuns.runs);
  app.decorate('eventStreams', new EventStreamSlots(settings.RUN_EVENTS_MAX_STREAMS_PER_USER, metrics.eventStreams));
  // With Redis, `keel api` only queues runs (and other jobs): `keel worker` nodes run and sweep them.
  if (runJobs) agentRuns.work();
  app.decorateRequest('principal', null as unknown as Principal);
  app.decorateRequest('hops', undefined);

  registerErrorHandler(app);
  // Hashed on the thread pool while the routes are set up below.
  const dummyHash = prepareDummyHash();

  // ==================== Request bookkeeping ====================

  const headers = securityHeaders();
  app.addHook('onRequest', (request, reply, done) => {
    reply.headers(headers);
    reply.header('x-request-id', request.id);
    // API answers may carry secrets (tokens, new API keys): no cache keeps them.
    // The route's path, not the URL's: a doubled slash (`//api/v1/...`) reaches the route too.
    if ((request.routeOptions.url ?? request.url).startsWith(API_PREFIX)) reply.header('cache-control', 'no-store');
    done();
  });
  registerAccessLog(app, settings, logger);
  app.addHook('onClose', async () => {
    await agentRuns.close();
    if (redis) await redis.quit().catch(() => redis.disconnect());
  });
  // Embedded: autovacuum's job (none on a PostgreSQL server). Its close hook, registered after the
  // others, runs before them: maintenance stops first, the database closes last.
  const maintenance = startEmbeddedMaintenance(database, settings, logger);
  app.decorate('maintenance', maintenance);
  if (maintenance) app.addHook('onClose', () => maintenance.stop());

  // ==================== Plugins ====================

  await registerCors(app, settings);
  // A request that reaches the app once it is closing (pipelined, or on a connection that was busy
  // when closing began) is refused with a 503 the error handlers shape ({detail}, or OpenAI's under
  // /v1); Fastify's routing adds `Connection: close` then, so the client reconnects (to another
  // node). After the bookkeeping and CORS hooks, so the 503 carries their headers too. Callback
  // style: it runs on every request.
  app.addHook('onRequest', (_request, _reply, done) => {
    if (!closing.signal.aborted) return done();
    done(new ShuttingDownError());
  });
  // A request this deployment sent to one of its providers (core/hop.ts): a provider record points
  // at Keel itself, or at a deployment whose provider leads back here. Refused here, on every route,
  // before authentication, metering or a model call; other deployments' marks are kept to send on.
  const ownHop = hopMark(settings.SECRET_KEY);
  app.addHook('onRequest', (request, _reply, done) => {
    const marks = hopsOf(request.headers[HOP_HEADER], ownHop);
    if (!marks) return done();
    if (marks.loop) return done(new UpstreamLoopError(marks.loop));
    request.hops = marks.hops;
    done();
  });
  app.addContentTypeParser('application/json', { parseAs: 'string' }, jsonBodyParser(app));
  app.addHook('preParsing', codedBodyRefused);
  app.addContentTypeParser(FORM_CONTENT_TYPE, { parseAs: 'string', bodyLimit: settings.BODY_LIMIT_BYTES }, nonJsonBodyRefused);
  app.removeContentTypeParser('text/plain');
  app.addContentTypeParser('text/plain', { parseAs: 'string', bodyLimit: settings.BODY_LIMIT_BYTES }, nonJsonBodyRefused);
  await registerOpenApi(app, settings);

  // ==================== Routes ====================

  await app.register(opsRouter);
  await registerApi(app);
  await app.register(openaiRouter, { prefix: OPENAI_PREFIX });

  await registerDocs(app);

  await dummyHash;
  return app;
}
