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
 * CORS for the origins in `BACKEND_CORS_ORIGINS` (none: no CORS headers at all). A preflight from
 * another origin gets no `Access-Control-Allow-*` headers (and the 405 of a plain OPTIONS), so the
 * browser refuses the request.
 */
export async function registerCors(app: FastifyInstance, settings: Settings): Promise<void> {
  await app.register(cors, {
    origin: settings.BACKEND_CORS_ORIGINS.length ? settings.BACKEND_CORS_ORIGINS : false,
    credentials: true,
    methods: CORS_METHODS,
    allowedHeaders: CORS_ALLOWED_HEADERS,
    exposedHeaders: CORS_EXPOSED_HEADERS,
  });
}
