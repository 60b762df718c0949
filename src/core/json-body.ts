import type { FastifyBodyParser, FastifyInstance, FastifyRequest } from 'fastify';

/** What refuses a body before it is parsed (an Error to answer with), or lets it through (undefined). */
export type JsonBodyCheck = (request: FastifyRequest, text: string) => Error | undefined;

/**
 * The app's JSON body parser: Fastify's own (`__proto__` and `constructor` keys refused), except
 * that an empty body sent as JSON is no body (as FastAPI reads it): a DELETE from a client that
 * sets `content-type: application/json` on every request works, and a route that needs a body
 * answers 422 `missing`, the same list shape as malformed JSON. `check` reads a body first (the
 * /v1 routes' shape check, before JSON.parse spends the event loop on it).
 */
export function jsonBodyParser(app: FastifyInstance, check?: JsonBodyCheck): FastifyBodyParser<string> {
  const parseJson = app.getDefaultJsonParser('error', 'error');
  return (request, text, done) => {
    if (text === '') return done(null, undefined);
    const refused = check?.(request, text);
    if (refused) return done(refused, undefined);
    return parseJson(request, text, done);
  };
}
