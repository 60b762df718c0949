import type { FastifyInstance, FastifyRequest, HTTPMethods } from 'fastify';
import FindMyWay, { type HTTPMethod } from 'find-my-way';

/**
 * The longest path parameter the routers read (longer: 414). Room for the longest email address
 * Keel takes (255 characters, `Email`) percent-encoded at three bytes a character, since
 * `POST /password-recovery/{email}` must answer 200 for every address an account can have.
 */
export const MAX_PARAM_LENGTH = 768;

/**
 * The methods each path answers, for a `405 Method Not Allowed` with its `Allow` header (as
 * FastAPI does) where Fastify would say 404. Call before any route is added: an `onRoute` hook
 * copies every route (HEAD ones included) into a router of our own that matches concrete URLs
 * the way Fastify's does. The CORS plugin's catch-all `OPTIONS *` is left out: it answers
 * preflights only, and hands a plain OPTIONS to the not-found handler.
 */
export function trackAllowedMethods(app: FastifyInstance): (request: FastifyRequest) => string[] {
  const router = FindMyWay({ ignoreTrailingSlash: true, maxParamLength: MAX_PARAM_LENGTH });
  const methods = new Set<HTTPMethod>();
  const noop = () => undefined;
  app.addHook('onRoute', (route) => {
    if (route.url === '*' || route.url === '/*') return;
    for (const method of ([] as HTTPMethods[]).concat(route.method)) {
      const upper = method.toUpperCase() as HTTPMethod;
      methods.add(upper);
      router.on(upper, route.url, noop);
    }
  });
  return (request) => [...methods].filter((method) => router.find(method, request.url) !== null).sort();
}
