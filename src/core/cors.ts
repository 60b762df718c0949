import cors from '@fastify/cors';
import type { FastifyInstance } from 'fastify';

import type { Settings } from './config.js';

/** Every method the API answers, so a browser on an allowed origin can also edit and delete. */
export const CORS_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'];
/** The request headers the API reads. */
export const CORS_ALLOWED_HEADERS = ['authorization', 'x-api-key', 'content-type', 'x-request-id'];
/** The response headers a browser script may read. */
export const CORS_EXPOSED_HEADERS = ['x-request-id', 'retry-after'];

/**
 * CORS for the origins in `BACKEND_CORS_ORIGINS` (none: no CORS headers at all). Any other origin
 * gets no CORS headers at all, so its preflight is a plain OPTIONS (405 with `Allow`) and the
 * browser refuses the request.
 */
export async function registerCors(app: FastifyInstance, settings: Settings): Promise<void> {
  const allowed = new Set(settings.BACKEND_CORS_ORIGINS);
  await app.register(cors, {
    // No origins: a constant `false`, which the plugin settles per request without calling back or
    // adding `Vary: Origin` (nothing varies); with origins, the answer depends on the request's.
    origin: allowed.size === 0 ? false : (origin, callback) => callback(null, origin !== undefined && allowed.has(origin) ? origin : false),
    credentials: true,
    methods: CORS_METHODS,
    allowedHeaders: CORS_ALLOWED_HEADERS,
    exposedHeaders: CORS_EXPOSED_HEADERS,
  });
}
