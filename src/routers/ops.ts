import { createHash, timingSafeEqual } from 'node:crypto';

import type { FastifyBaseLogger, FastifyRequest } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';

import { UnauthorizedError } from '../core/errors.js';

import { ErrorBody } from '../schemas/common.js';

import { storageReachable } from '../services/storage-service.js';
import { errorReason } from '../utils/error-chain.js';
import { type Outcome, settledWithin } from '../utils/time-limit.js';

const tags = ['ops'];
const CHECK_TIMEOUT_MS = 2_000;

const Health = z.object({ status: z.literal('ok') }).meta({ id: 'Health' });
const Readiness = z
  .object({
    status: z.enum(['ready', 'unavailable']),
    checks: z.record(z.string(), z.enum(['ok', 'unavailable'])),
    database: z.enum(['pglite', 'postgres']),
    vector_search: z.boolean(),
  })
  .meta({ id: 'Readiness' });

type CheckState = 'ok' | 'unavailable';

/**
 * Logs each check's changes of state: why it became unavailable (warn), and that it is back (info),
 * once per change. A load balancer asks every few seconds on every node; each failed answer
 * logged would bury the cause under repeats, and none logged left an operator only "unavailable".
 */
function stateChangeLogger() {
  const last = new Map<string, CheckState>();
  return (log: FastifyBaseLogger, check: string, outcome: Outcome): CheckState => {
    const state: CheckState = outcome.ok ? 'ok' : 'unavailable';
    const before = last.get(check);
    last.set(check, state);
    if (!outcome.ok && before !== 'unavailable') log.warn({ check, reason: errorReason(outcome.error) }, `readiness: ${check} unavailable`);
    if (outcome.ok && before === 'unavailable') log.info({ check }, `readiness: ${check} available again`);
    return state;
  };
}

const digest = (value: string) => createHash('sha256').update(value).digest();

/** onRequest of /metrics when METRICS_TOKEN is set: `Authorization: Bearer <token>`, compared in constant time. */
function requireMetricsToken(token: string) {
  const expected = digest(token);
  return async (request: FastifyRequest) => {
    const header = request.headers.authorization ?? '';
    const given = /^bearer /i.test(header) ? header.slice(7).trim() : '';
    if (!given || !timingSafeEqual(digest(given), expected)) throw new UnauthorizedError('Not authenticated');
  };
}

/** Liveness, readiness and metrics: outside /api/v1, as load balancers and Prometheus expect. */
export const opsRouter: FastifyPluginAsyncZod = async (app) => {
  const noted = stateChangeLogger();
  app.get(
    '/health',
    { schema: { operationId: 'health', summary: 'Liveness', tags, security: [], response: { 200: Health } } },
    async () => ({ status: 'ok' as const }),
  );

  app.get(
    '/ready',
    {
      schema: {
        operationId: 'ready',
        summary: 'Readiness',
        description: 'Whether the database (and Redis, when configured, and the S3 bucket with STORAGE_BACKEND=s3) answer; 503 otherwise.',
        tags,
        security: [],
        response: { 200: Readiness, 503: Readiness },
      },
    },
    async (request, reply) => {
      const checks: Record<string, CheckState> = {
        database: noted(request.log, 'database', await settledWithin(CHECK_TIMEOUT_MS, app.database.ping())),
      };
      if (app.redis) checks.redis = noted(request.log, 'redis', await settledWithin(CHECK_TIMEOUT_MS, app.redis.ping()));
      // STORAGE_BACKEND=s3: uploads and downloads need the bucket (checked at most every few seconds).
      const storage = storageReachable(app.settings, CHECK_TIMEOUT_MS);
      if (storage) checks.storage = noted(request.log, 'storage', await storage);
      const ready = Object.values(checks).every((c) => c === 'ok');
      return reply.code(ready ? 200 : 503).send({
        status: ready ? 'ready' : 'unavailable',
        checks,
        database: app.database.kind,
        vector_search: app.vectorSearch,
      });
    },
  );

  app.get(
    '/metrics',
    {
      schema: {
        operationId: 'metrics',
        summary: 'Prometheus Metrics',
        description: 'Needs `Authorization: Bearer <METRICS_TOKEN>` when that setting is set.',
        tags,
        // Open, or the token's own scheme: neither a user's token nor an API key opens it.
        security: app.settings.METRICS_TOKEN ? [{ metricsToken: [] }] : [],
        // Each answer with its own media type (`produces` put the JSON 401 under text/plain too).
        response: { 200: { description: 'Prometheus text exposition format', content: { 'text/plain': { schema: z.string() } } }, 401: ErrorBody },
      },
      ...(app.settings.METRICS_TOKEN ? { onRequest: requireMetricsToken(app.settings.METRICS_TOKEN) } : {}),
    },
    async (_request, reply) => {
      const served = app.metrics.served();
      reply.type(served.contentType);
      return served.metrics();
    },
  );
};
