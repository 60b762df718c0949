import cors from '@fastify/cors';
import type { FastifyInstance } from 'fastify';

import type { Settings } from './config.js';

/** Every method the API answers, so a browser on an allowed origin can also edit and delete. */
export const CORS_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'];
/**
 * The request headers the API reads, and those the official `openai` client sends with every
 * request (its platform headers, retry count and timeout, its helpers' name; organization and
 * project when set): a browser refuses a request whose preflight does not allow all of them.
 */
export const CORS_ALLOWED_HEADERS = [
  'authorization',
  'x-api-key',
  'content-type',
  'x-request-id',
  // A run's event stream resumes after it (a fetch-based reader sends it itself; EventSource's own needs no preflight).
  'last-event-id',
  'x-stainless-arch',
  'x-stainless-lang',
  'x-stainless-os',
  'x-stainless-package-version',
  'x-stainless-runtime',
  'x-stainless-runtime-version',
  'x-stainless-retry-count',
  'x-stainless-timeout',
  'x-stainless-helper-method',
  'openai-organization',
  'openai-project',
];
/**
 * The response headers a browser script may read: `x-should-retry`, `retry-after` (what the openai
 * client's retries go by), a creation's `location`, a download's `content-disposition` (its file's
 * name), and the thread and run an `agent:` completion ran on (to go on in that thread).
 */
export const CORS_EXPOSED_HEADERS = ['x-request-id', 'retry-after', 'x-should-retry', 'location', 'content-disposition', 'x-keel-thread-id', 'x-keel-run-id'];

/**
 * CORS for the origins in `BACKEND_CORS_ORIGINS` (none: no CORS headers at all). Any other origin
 * gets no CORS headers at all, so its preflight is a plain OPTIONS (405 with `Allow`) and the
 * browser refuses the request.
 */
export async function registerCors(app: FastifyInstance, settings: Settings): Promise<void> {
  const allowed = new Set(settings.BACKEND_CORS_ORIGINS);
  // No origins: no plugin, so no hook on every request (it cost ~1.5 % of a gateway call's CPU to
  // add `Vary: Origin` and answer "no"); a preflight is then a plain OPTIONS, as it is for an
  // origin that is not allowed.
  if (allowed.size === 0) return;
  await app.register(cors, {
    origin: (origin, callback) => callback(null, origin !== undefined && allowed.has(origin) ? origin : false),
    credentials: true,
    methods: CORS_METHODS,
    allowedHeaders: CORS_ALLOWED_HEADERS,
    exposedHeaders: CORS_EXPOSED_HEADERS,
  });
}
