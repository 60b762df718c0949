import { errorCodes, type FastifyBodyParser, type FastifyInstance, type FastifyRequest, type preParsingHookHandler } from 'fastify';

import { UnsupportedContentEncodingError } from './errors.js';

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

export const FORM_CONTENT_TYPE = 'application/x-www-form-urlencoded';

/**
 * A form or text body outside the login routes (which parse the OAuth2 password form:
 * routers/login.ts): an empty one is no body, as an empty JSON body is (a `curl -d ''` or a
 * `$.post(url)` to cancel a run, which sends the form's content type with nothing in it), and any
 * other is 415, as every body that is not JSON (SPEC §2: JSON in). Text was read as a string the
 * schema then refused as "expected object", and a route without a body schema ran with it: with
 * forms, the bodies a browser sends cross-origin without asking first (a CORS "simple request").
 */
export const nonJsonBodyRefused: FastifyBodyParser<string> = (_request, text, done) =>
  text === '' ? done(null, undefined) : done(new errorCodes.FST_ERR_CTP_INVALID_MEDIA_TYPE(), undefined);

/**
 * preParsing: a body with a content coding other than identity is refused (415) whatever it holds.
 * Only a body that failed to parse was refused so: one labelled gzip that was plain JSON was read
 * as JSON, while the same one compressed was refused.
 */
export const codedBodyRefused: preParsingHookHandler = (request, _reply, payload, done) => {
  const encoding = request.headers['content-encoding']?.trim().toLowerCase();
  const hasBody = request.headers['transfer-encoding'] !== undefined || (request.headers['content-length'] ?? '0') !== '0';
  if (hasBody && encoding && encoding !== 'identity') return done(new UnsupportedContentEncodingError(encoding));
  done(null, payload);
};
