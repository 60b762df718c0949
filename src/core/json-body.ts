import { errorCodes, type FastifyBodyParser, type FastifyInstance, type FastifyRequest, type preParsingHookHandler } from 'fastify';

import { UnprocessableError, UnsupportedContentEncodingError } from './errors.js';

/** What refuses a body before it is parsed (an Error to answer with), or lets it through (undefined). */
export type JsonBodyCheck = (request: FastifyRequest, text: string) => Error | undefined;

/**
 * The app's JSON body parser: Fastify's own (`__proto__` and `constructor` keys refused), except
 * that an empty body sent as JSON is no body (as FastAPI reads it): a DELETE from a client that
 * sets `content-type: application/json` on every request works, and a route that needs a body
 * answers 422 `missing`, the same list shape as malformed JSON. `check` reads a body first (the
 * /v1 routes' shape check, before JSON.parse spends the event loop on it). A number too large for
 * a double (`1e400`) is refused (422) wherever it is: JSON.parse reads it as Infinity, which the
 * schemas of free-form fields (metadata, tool arguments, JSON schemas) let through and
 * serializing stores or forwards as `null`.
 */
export function jsonBodyParser(app: FastifyInstance, check?: JsonBodyCheck): FastifyBodyParser<string> {
  const parseJson = app.getDefaultJsonParser('error', 'error');
  return (request, text, done) => {
    if (text === '') return done(null, undefined);
    const refused = check?.(request, text);
    if (refused) return done(refused, undefined);
    return parseJson(request, text, (error, body) => {
      if (error) return done(error, undefined);
      const at = mayOverflow(text) ? nonFiniteAt(body) : undefined;
      if (at) return done(new UnprocessableError({ loc: ['body', ...at], msg: 'Number is too large to be stored (past ±1.8e308)', type: 'finite_number' }), undefined);
      return done(null, body);
    });
  };
}

/** Whether JSON text may hold a number past a double's range: one with an exponent, or of 309 digits or more (the walk is skipped otherwise). */
const mayOverflow = (text: string) => /\d[eE]|\d{309}/.test(text);

/** A value met in the walk: its parent's step and its key there, to spell its path only when one is found. */
interface Step {
  value: unknown;
  parent?: Step;
  key?: string | number;
}

/**
 * The path of the first non-finite number in a parsed JSON value; undefined when there is none.
 * Iterative, and each value holds its parent rather than a copy of its path: a body may nest
 * deeper than the stack goes, and copies would cost the depth's square.
 */
function nonFiniteAt(value: unknown): (string | number)[] | undefined {
  const pending: Step[] = [{ value }];
  for (let step = pending.pop(); step; step = pending.pop()) {
    const item = step.value;
    if (typeof item === 'number' && !Number.isFinite(item)) {
      const path: (string | number)[] = [];
      for (let at: Step | undefined = step; at?.key !== undefined; at = at.parent) path.unshift(at.key);
      return path;
    }
    // An array's items by their index as a number, as in every other 422's `loc`.
    if (Array.isArray(item)) item.forEach((child: unknown, key) => pending.push({ value: child, parent: step, key }));
    else if (item !== null && typeof item === 'object') {
      for (const [key, child] of Object.entries(item)) pending.push({ value: child, parent: step, key });
    }
  }
  return undefined;
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
