import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { hasZodFastifySchemaValidationErrors, isResponseSerializationError } from 'fastify-type-provider-zod';

import { findInCauses, isDiskFullCode } from '../utils/error-chain.js';
import { UNPAIRED_SURROGATE_MESSAGE } from '../utils/text.js';
import { DATABASE_RETRY_AFTER_SECONDS, databaseError, isDatabaseUnavailableCode } from './db-errors.js';
import { integrityAnswer, unknownQueryMessage } from './error-mapping.js';
import { MAX_HOPS } from './hop.js';
import { drainingRequests, lingerOnUnreadBody } from './http-server.js';
import { RepeatedLine } from './logger.js';
import { trackAllowedMethods } from './method-not-allowed.js';

// ==================== Typed errors ====================

/**
 * An error whose `detail` is safe to show the client. Its `message` is the same, unless a subclass
 * keeps more for the log (UpstreamError: the provider's own words), which the handler then logs.
 */
export class HttpError extends Error {
  constructor(
    readonly statusCode: number,
    readonly detail: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(detail);
    this.name = new.target.name;
  }
}

export class BadRequestError extends HttpError {
  constructor(detail = 'Bad request') {
    super(400, detail);
  }
}

export class UnauthorizedError extends HttpError {
  constructor(detail = 'Could not validate credentials', headers: Record<string, string> = {}) {
    super(401, detail, { 'www-authenticate': 'Bearer', ...headers });
  }
}

/** What went away of a call's credentials between its authentication and its credit hold. */
export type CredentialsGone = 'api_key_deleted' | 'api_key_revoked' | 'user_deleted' | 'user_deactivated';

/**
 * 401 for a metered call whose API key or user went away after the call was authenticated (the
 * meter's hold found it so): the client is told what a call made with those credentials now is
 * told (the generic 401, which says nothing of the key's state either). `reason` is for the
 * work no client waits on, a run or an ingestion, whose owner reads why it stopped.
 */
export class CredentialsGoneError extends UnauthorizedError {
  constructor(readonly reason: CredentialsGone) {
    super();
  }
}

/** 402: a metered call or a spend cap the balance (or the key's budget) cannot cover. */
export class PaymentRequiredError extends HttpError {
  constructor(detail = 'Not enough credits') {
    super(402, detail);
  }
}

export class ForbiddenError extends HttpError {
  constructor(detail = 'Not enough privileges') {
    super(403, detail);
  }
}

export class NotFoundError extends HttpError {
  constructor(detail = 'Not found') {
    super(404, detail);
  }
}

export class ConflictError extends HttpError {
  constructor(detail = 'Conflict') {
    super(409, detail);
  }
}

/** 410: what was there is gone for good (expired), and asking again will not bring it back. */
export class GoneError extends HttpError {
  constructor(detail = 'Gone') {
    super(410, detail);
  }
}

/**
 * 422 in the validation shape (`{detail: [{loc, msg, type}]}`) for what a schema cannot check:
 * rules that need the database or the model catalog (an unknown model, a cursor of another thread).
 */
export class UnprocessableError extends HttpError {
  readonly issues: ValidationIssue[];

  constructor(issues: ValidationIssue | ValidationIssue[]) {
    const list = Array.isArray(issues) ? issues : [issues];
    super(422, list.map((issue) => issue.msg).join('; '));
    this.issues = list;
  }
}

/**
 * 422 for a form with a second file: an upload takes one (the multipart plugin's `files: 1`, whose
 * FST_FILES_LIMIT the handler answers with this), and keeps none of them.
 */
export const oneFilePerUpload = () =>
  new UnprocessableError({ loc: ['body', 'file'], msg: 'One file per upload: the form has more than one file; send each file in its own request', type: 'value_error' });

/** A body sent with a content coding (gzip, br, ...): no parser here inflates one. */
export class UnsupportedContentEncodingError extends HttpError {
  constructor(encoding: string) {
    super(415, `Content-Encoding ${encoding.slice(0, 40)} is not supported: send the body uncompressed`);
  }
}

/** 413: an upload (or body) over a size limit; the message gives the figures. */
export class PayloadTooLargeError extends HttpError {
  constructor(detail = 'Request body too large') {
    super(413, detail);
  }
}

export class TooManyRequestsError extends HttpError {
  constructor(retryAfterSeconds: number, detail = 'Too many requests, try again later') {
    super(429, detail, { 'retry-after': String(Math.max(1, Math.ceil(retryAfterSeconds))) });
  }
}

export class ServiceUnavailableError extends HttpError {
  constructor(detail = 'Service unavailable', headers: Record<string, string> = {}) {
    super(503, detail, headers);
  }
}

/**
 * 507: the server's disk is full (the files' under DATA_DIR, a quota, the database's): the write
 * failed whole, and the same request may succeed once an operator frees space.
 */
export class InsufficientStorageError extends HttpError {
  constructor() {
    super(507, 'The server is out of storage space; try again later');
  }
}

/** Out of space: the file system's ENOSPC or EDQUOT, or the database's disk_full (53100), on the error or a cause. */
export function isOutOfSpace(error: unknown): boolean {
  return (
    findInCauses(error, (e) => {
      const code = (e as { code?: unknown }).code;
      return isDiskFullCode(code) || code === '53100';
    }) !== undefined
  );
}

/**
 * Seconds a client is told to wait (Retry-After) when the rate limiter's counters (Redis) cannot be
 * reached. Short: an outage of Redis is mostly a restart or failover of seconds, and the limiter
 * fails closed, so every request of a client that does not wait would fail too; a client told
 * nothing retries at once (or not at all), one told minutes stays away long after Redis is back.
 * As the database's (DATABASE_RETRY_AFTER_SECONDS), and within what OpenAI's clients honour (≤ 60 s).
 */
export const RATE_LIMITER_RETRY_AFTER_SECONDS = 5;

/** 503: the rate limiter's counters cannot be reached; requests it guards are refused (it never fails open), with a short Retry-After. */
export class RateLimiterUnavailableError extends ServiceUnavailableError {
  constructor() {
    super('Rate limiter unavailable, try again later', { 'retry-after': String(RATE_LIMITER_RETRY_AFTER_SECONDS) });
  }
}

/**
 * A model call refused because this process already holds USAGE_MAX_PENDING_ROWS records (usage
 * records, credit settlements; a billed call's two as one) the database has not taken: serving it would leave a call
 * unrecorded, or memory without bound.
 */
export class UsageBacklogError extends ServiceUnavailableError {
  constructor() {
    super('Model calls are paused: usage records cannot be written to the database yet; try again later', { 'retry-after': String(DATABASE_RETRY_AFTER_SECONDS) });
  }
}

/** A request that reaches the app once it is closing, or a model call still running near the shutdown deadline. */
export class ShuttingDownError extends ServiceUnavailableError {
  constructor() {
    super('The server is shutting down');
  }
}

/**
 * A request this deployment sent to a model provider that came back to it (its hop mark: hop.ts),
 * so a provider record's base_url points at Keel itself. A 400, not 508 Loop Detected: the Keel
 * that sent it tries a 5xx again (MODEL_MAX_RETRIES) and tells its client only "status 508", while
 * an upstream 400 is not tried again, and its message and code reach the first caller as the
 * provider's refusal. So one client call makes exactly one nested request.
 */
export class UpstreamLoopError extends HttpError {
  /** `chain`: the request came through other Keel deployments that led back here, or through too many of them. */
  constructor(through: 'self' | 'chain' = 'self') {
    super(
      400,
      through === 'self'
        ? 'Loop detected: this request was sent by this Keel deployment to one of its model providers, so a provider record\'s base_url points at Keel itself; point it at the model provider instead'
        : `Loop detected: this request came back through Keel deployments that use each other as model providers (or through ${MAX_HOPS} of them); point their provider records at the model providers instead`,
    );
  }
}

/** 404 for a URL no route answers (`path`: without the query string). */
export class RouteNotFoundError extends HttpError {
  constructor(
    readonly method: string,
    readonly path: string,
  ) {
    super(404, 'Not Found');
  }
}

/** 405 for a URL whose routes answer other methods, listed in `Allow`. */
export class MethodNotAllowedError extends HttpError {
  constructor(
    readonly method: string,
    readonly path: string,
    readonly allow: readonly string[],
  ) {
    super(405, 'Method Not Allowed', { allow: allow.join(', ') });
  }
}

declare module 'fastify' {
  interface FastifyInstance {
    /**
     * The not-found handler (RouteNotFoundError, or MethodNotAllowedError for a known URL): it
     * throws, so a context that answers errors in a shape of its own (/v1) sets it as its own.
     */
    routeNotFound(request: FastifyRequest): never;
  }
}

// ==================== Error bodies ====================

export interface ValidationIssue {
  loc: (string | number)[];
  msg: string;
  type: string;
}

const LOCATION_NAMES: Record<string, string> = {
  body: 'body',
  querystring: 'query',
  params: 'path',
  headers: 'header',
};

/** Zod's own words for a union no option took (when the schema gives none). */
const ZOD_UNION_MESSAGE = 'Invalid input';

/** A Zod issue as a union's `errors` hold it (each option's issues, their paths from the union's value). */
type InnerIssue = { code: string; message: string; path?: (string | number)[] } & Record<string, unknown>;

/**
 * Of a union's options (their issues each), the first issue of the option the value was meant for:
 * not one that refused its type outright (a text where a list of parts came), and of the others the
 * one whose issue lies deepest in the value. None when every option refused the value as a whole.
 */
function meantOption(options: unknown): InnerIssue | undefined {
  if (!Array.isArray(options)) return undefined;
  let meant: InnerIssue | undefined;
  for (const issues of options as InnerIssue[][]) {
    const [first] = issues;
    if (!first || (first.code === 'invalid_type' && !first.path?.length)) continue;
    if (!meant || (first.path?.length ?? 0) > (meant.path?.length ?? 0)) meant = first;
  }
  return meant;
}

/** What a union's options expected when each refused the value's type outright ("a string or an array"), undefined otherwise. */
function typesExpected(options: unknown): string | undefined {
  if (!Array.isArray(options)) return undefined;
  const expected = (options as InnerIssue[][]).map(([first]) => (first?.code === 'invalid_type' && !first.path?.length && typeof first.expected === 'string' ? first.expected : undefined));
  if (expected.length === 0 || expected.includes(undefined)) return undefined;
  return `Invalid input: expected ${[...new Set(expected)].join(' or ')}`;
}

/**
 * A FastAPI-style issue: Zod issue codes in the vocabulary (and wording) FastAPI clients already
 * know; `at`, where a nested issue lies below the one Zod reported.
 */
function describeIssue(code: string, params: Record<string, unknown>, message: string): { type: string; msg: string; at?: (string | number)[] } {
  const own = { msg: message };
  if (code === 'invalid_type') {
    // Zod 4 issues carry no input; its message says what was received.
    if (/received undefined$/.test(message)) return { type: 'missing', msg: 'Field required' };
    if (params.received === 'NaN') return { type: 'float_parsing', msg: 'Input should be a valid number, unable to parse string as a number' };
    if (params.expected === 'int') return { type: 'int_from_float', msg: 'Input should be a valid integer, got a number with a fractional part' };
    return { type: typeof params.expected === 'string' ? `${params.expected}_type` : 'type_error', ...own };
  }
  const numeric = params.origin === 'number' || params.origin === 'bigint';
  switch (code) {
    case 'unrecognized_keys':
      return { type: 'extra_forbidden', msg: 'Extra inputs are not permitted' };
    case 'too_small':
      if (numeric) {
        const inclusive = params.inclusive !== false;
        const bound = `greater than${inclusive ? ' or equal to' : ''} ${String(params.minimum)}`;
        return { type: inclusive ? 'greater_than_equal' : 'greater_than', msg: `Input should be ${bound}` };
      }
      return { type: params.origin === 'string' ? 'string_too_short' : 'too_short', ...own };
    case 'too_big':
      if (numeric) {
        const inclusive = params.inclusive !== false;
        const bound = `less than${inclusive ? ' or equal to' : ''} ${String(params.maximum)}`;
        return { type: inclusive ? 'less_than_equal' : 'less_than', msg: `Input should be ${bound}` };
      }
      return { type: params.origin === 'string' ? 'string_too_long' : 'too_long', ...own };
    case 'invalid_format':
      return { type: `${typeof params.format === 'string' ? params.format : 'string'}_parsing`, ...own };
    case 'invalid_value':
      return { type: 'enum', ...own };
    // A schema's own rule (a refinement), as pydantic names a validator's error.
    case 'custom':
      return { type: 'value_error', ...own };
    // A record's key its key schema refused: Zod says only "Invalid key in record" and holds that schema's own issues.
    case 'invalid_key': {
      const [inner] = Array.isArray(params.issues) ? (params.issues as ({ code: string; message: string } & Record<string, unknown>)[]) : [];
      return inner ? describeIssue(inner.code, inner, inner.message) : { type: code, ...own };
    }
    // A union none of whose options took the value: Zod says only "Invalid input" (a content part
    // of a type not served, a tool_choice of a shape not taken) and holds each option's issues. The
    // option the value was meant for says what is wrong, and where. A union the schema gave words of
    // its own (embeddings' `input`) keeps them.
    case 'invalid_union': {
      if (message !== ZOD_UNION_MESSAGE) return { type: code, ...own };
      const inner = meantOption(params.errors);
      if (!inner) return { type: code, msg: typesExpected(params.errors) ?? message };
      const described = describeIssue(inner.code, inner, inner.message);
      return { ...described, at: [...(inner.path ?? []), ...(described.at ?? [])] };
    }
    default:
      return { type: code, ...own };
  }
}

/** At most this many issues are listed in a 422; a last entry says how many were left out. */
export const MAX_VALIDATION_ISSUES = 50;

function validationIssues(error: FastifyError, request: FastifyRequest): ValidationIssue[] {
  const where = LOCATION_NAMES[error.validationContext ?? 'body'] ?? 'body';
  if (!hasZodFastifySchemaValidationErrors(error)) {
    return [{ loc: [where], msg: error.message, type: 'value_error' }];
  }
  const issues: ValidationIssue[] = [];
  let total = 0;
  for (const issue of error.validation) {
    const params = issue.params;
    const keys = Array.isArray(params.keys) ? (params.keys as string[]) : null;
    // An unknown field is reported at the field itself, as FastAPI does.
    const extras = keys ?? [null];
    const room = MAX_VALIDATION_ISSUES - issues.length;
    total += extras.length;
    if (room <= 0) continue;
    const path = issue.instancePath.split('/').filter(Boolean);
    // No body at all (an empty one included) is a missing body, as FastAPI says.
    const described =
      where === 'body' && path.length === 0 && (request.body === null || request.body === undefined)
        ? { type: 'missing', msg: 'Field required' }
        : describeIssue(issue.keyword, params, issue.message ?? 'Invalid value');
    const { type, at = [] } = described;
    // An unknown query parameter's message names the accepted ones.
    const msg = keys && where === 'query' ? unknownQueryMessage(request) : described.msg;
    for (const extra of extras.slice(0, room)) {
      issues.push({ loc: [where, ...path, ...at, ...(extra === null ? [] : [extra])], msg, type });
    }
  }
  if (total > issues.length) {
    issues.push({ loc: [where], msg: `${total - issues.length} more issues not listed`, type: 'too_many_errors' });
  }
  return issues;
}

// Where the rest of the code has always found it; it lives beside the SQLSTATE rules, which db.ts reads without the HTTP layer.
export { databaseError };

/** Socket errors of a dependency that cannot be reached (the driver's error or its cause). */
const CONNECTION_ERRORS = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN']);

/** What node-postgres says, without a code, when it loses or cannot get a connection. */
const CONNECTION_MESSAGES = /Connection terminated|Query read timeout|timeout exceeded when trying to connect|not queryable|Cannot use a pool after calling end/;

function connectionError(error: unknown): boolean {
  return (
    findInCauses(error, (e) => {
      const { code, message } = e as { code?: unknown; message?: unknown };
      return (typeof code === 'string' && CONNECTION_ERRORS.has(code)) || (typeof message === 'string' && CONNECTION_MESSAGES.test(message));
    }) !== undefined
  );
}

/**
 * The error as it may be logged: Drizzle's query errors carry the statement's parameters (emails,
 * password hashes) in `params` and in the message, so those are logged as the query and its cause.
 */
function loggable(error: FastifyError): { err: unknown; query?: string } {
  const query = (error as { query?: unknown }).query;
  if (typeof query === 'string' && 'params' in error) return { err: error.cause ?? new Error('database query failed'), query };
  return { err: error };
}

/**
 * Whether `error` is (or was caused by) the request's own body stream failing: the client closed
 * the connection before its body was read (Node destroys the request with ECONNRESET, "aborted").
 * Matched by identity with the error the request stream holds, so a dependency's ECONNRESET is
 * still the dependency's. Read as a database's, it wrote an error line any client could set off
 * by hanging up mid-upload, and used up the window's one line from a real outage.
 */
function requestBodyAborted(error: unknown, request: FastifyRequest): boolean {
  const own = request.raw.errored;
  return own !== null && findInCauses(error, (e) => e === own) !== undefined;
}

// ==================== The one handler ====================

/**
 * Why text with a NUL character (\u0000) is refused (422): PostgreSQL's text and jsonb cannot store
 * it. Said alike by a service that checks a client's text first (thread-service checkContent) and by
 * the handler below when the database refuses one (SQLSTATE 22021, 22P05).
 */
export const UNSTORABLE_CHARACTER_MESSAGE = 'Text contains a character that cannot be stored';

/** What the client is told of a value the database refused, by SQLSTATE. */
const VALUE_REFUSALS = new Map([
  // string_data_right_truncation: text past a varchar's length.
  ['22001', 'Value too long for its field'],
  // numeric_value_out_of_range: a number past its column's type (integer, numeric(p, s)).
  ['22003', 'Number out of range for its field'],
  // invalid_text_representation: text that is no value of its field's type (an integer, a UUID, JSON).
  ['22P02', 'Invalid value for its field\'s type'],
]);

function send(reply: FastifyReply, status: number, body: unknown, headers: Record<string, string> = {}): FastifyReply {
  return reply.code(status).headers(headers).type('application/json; charset=utf-8').send(body);
}

/**
 * A body refused before it was read to its end (413 from its declared length or as it grew past
 * the limit, 415): the connection is kept and the rest read and dropped, within bounds
 * (`lingerOnUnreadBody`). Fastify asks for `Connection: close` there, and Node then closed the
 * socket with the body unread: a client still sending got EPIPE or ECONNRESET instead of the 413
 * (fetch, for an 8 MB body, 4 times in 5).
 */
function readTheRest(request: FastifyRequest, reply: FastifyReply): void {
  // Draining: the close stays (the client is to move to another node), as it was before.
  if (request.raw.complete || drainingRequests.has(request.raw)) return;
  reply.removeHeader('connection');
  lingerOnUnreadBody(request, reply);
}

export function registerErrorHandler(app: FastifyInstance): void {
  const allowedMethods = trackAllowedMethods(app);
  // Written once per window while the database is down, or the disk full: per app (one a process
  // in service), so that apps built one after the other (tests) each write their first line.
  const databaseUnavailable = new RepeatedLine();
  const outOfSpace = new RepeatedLine();
  app.decorate('routeNotFound', (request: FastifyRequest): never => {
    const allow = allowedMethods(request);
    // As the client wrote it (a model id's slashes, escaped by the app's rewriteUrl, are its own).
    const path = request.originalUrl.split('?', 1)[0]!.slice(0, 200);
    throw allow.length ? new MethodNotAllowedError(request.method, path, allow) : new RouteNotFoundError(request.method, path);
  });
  app.setNotFoundHandler((request) => app.routeNotFound(request));

  app.setErrorHandler((error: FastifyError, request: FastifyRequest, reply: FastifyReply) => {
    if (error.code?.startsWith('FST_ERR_CTP_') || error instanceof UnsupportedContentEncodingError) readTheRest(request, reply);
    if (error instanceof UnprocessableError) return send(reply, 422, { detail: error.issues });
    // A multipart form past its `files` limit (the plugin's 413, but nothing in it is too large).
    if (error.code === 'FST_FILES_LIMIT') return send(reply, 422, { detail: oneFilePerUpload().issues });
    // Past its `fields` or `parts` limit: a form is one file and a few small fields (knowledge.ts).
    if (error.code === 'FST_FIELDS_LIMIT' || error.code === 'FST_PARTS_LIMIT') return send(reply, 413, { detail: 'Form has too many fields: send the file with at most 10 other fields' });
    if (error instanceof HttpError) {
      if (error.message !== error.detail) request.log.warn({ err: error }, 'request failed; details withheld from the client');
      return send(reply, error.statusCode, { detail: error.detail }, error.headers);
    }
    if (error.validation) {
      return send(reply, 422, { detail: validationIssues(error, request) });
    }
    if (error.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || (error instanceof SyntaxError && error.statusCode === 400)) {
      return send(reply, 422, { detail: [{ loc: ['body'], msg: 'JSON decode error', type: 'json_invalid' }] });
    }
    // As Fastify answers a JSON body cut off (400), to a client no longer there to read it.
    if (requestBodyAborted(error, request)) return send(reply, 400, { detail: 'Request body incomplete: the client closed the connection' });
    const db = databaseError(error);
    const integrity = db && integrityAnswer(db);
    if (integrity) return send(reply, integrity.status, { detail: integrity.detail });
    // JSON (json, jsonb) holding half of a surrogate pair as an escape (`"\ud800"`): the DETAIL names the surrogate.
    if (db?.code === '22P02' && db.detail?.includes('surrogate')) {
      return send(reply, 422, { detail: [{ loc: ['body'], msg: UNPAIRED_SURROGATE_MESSAGE, type: 'value_error' }] });
    }
    // A value PostgreSQL would not take that no schema bounded, each in its own words (all three
    // were "Value out of range", which a text too long or a malformed value is not).
    const refusedValue = db && VALUE_REFUSALS.get(db.code);
    if (refusedValue) return send(reply, 422, { detail: [{ loc: ['body'], msg: refusedValue, type: 'value_error' }] });
    // A NUL character (\u0000) in text (22021) or in JSON (22P05, the escape jsonb refuses): PostgreSQL cannot store it.
    if (db?.code === '22021' || db?.code === '22P05') {
      return send(reply, 422, { detail: [{ loc: ['body'], msg: UNSTORABLE_CHARACTER_MESSAGE, type: 'value_error' }] });
    }
    // Fastify's own client errors (415 media type, 413 body limit, 400 malformed) keep their status.
    if (!isResponseSerializationError(error) && error.statusCode && error.statusCode >= 400 && error.statusCode < 500) {
      const detail = error.statusCode === 413 ? 'Request body too large' : error.message;
      return send(reply, error.statusCode, { detail });
    }
    // Input nested deeper than the call stack goes, past every check that should have refused it
    // (the schemas bound the free-form JSON they take): still the request's fault, not a crash.
    if (error instanceof RangeError && /call stack/i.test(error.message)) {
      request.log.warn({ err: error }, 'input nested too deeply for the call stack');
      return send(reply, 422, { detail: [{ loc: ['body'], msg: 'Input is nested too deeply', type: 'value_error' }] });
    }
    if ((db && isDatabaseUnavailableCode(db.code)) || connectionError(error)) {
      // A database out of reach is one fact every request repeats: written once a window. A statement
      // out of time (57014) or a lock not taken (55P03) is the statement's own, named with it: each one.
      const line = db?.code === '57014' || db?.code === '55P03' ? {} : databaseUnavailable.take();
      if (line) request.log.error({ ...loggable(error), ...line }, 'database unavailable');
      return send(reply, 503, { detail: 'Service unavailable' }, { 'retry-after': String(DATABASE_RETRY_AFTER_SECONDS) });
    }
    if (isOutOfSpace(error)) {
      // A full disk is one fact every write repeats until space is freed: written once a window.
      const line = outOfSpace.take();
      if (line) request.log.error({ ...loggable(error), ...line }, 'out of storage space');
      return send(reply, 507, { detail: new InsufficientStorageError().detail });
    }
    request.log.error(loggable(error), 'unhandled error');
    return send(reply, 500, { detail: 'Internal server error' });
  });
}
