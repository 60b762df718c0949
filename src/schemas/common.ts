import { z } from 'zod';

import { hasUnpairedSurrogate, UNPAIRED_SURROGATE_MESSAGE, unpairedSurrogateAt } from '../utils/text.js';

/**
 * The instants a timestamp may name: the years 1 to 9999 in UTC, what PostgreSQL's timestamptz
 * takes in ISO 8601 and what an ISO 8601 UTC string writes with four digits. An offset can carry a
 * valid-looking text past them (`9999-12-31T23:59:59-23:59` is in the year 10000 UTC), and
 * PostgreSQL refuses the statement then (a 500, not the client's 422).
 */
export const MIN_INSTANT_MS = Date.parse('0001-01-01T00:00:00Z');
export const MAX_INSTANT_MS = Date.parse('9999-12-31T23:59:59.999Z');

/** ISO 8601 text whose instant is within MIN_INSTANT_MS–MAX_INSTANT_MS (see there). */
export const withinStorableYears = (text: string): boolean => {
  const ms = Date.parse(text);
  return ms >= MIN_INSTANT_MS && ms <= MAX_INSTANT_MS;
};
export const STORABLE_YEARS_ERROR = 'Input should be an instant between the years 1 and 9999 (UTC)';

/** A timestamp: a Date in code, ISO 8601 UTC on the wire. */
export const Timestamp = z.codec(z.iso.datetime({ offset: true }).refine(withinStorableYears, { error: STORABLE_YEARS_ERROR }), z.date(), {
  decode: (text) => new Date(text),
  encode: (date) => date.toISOString(),
});

/** A UUID, in lower case as the database answers it: one sent in capitals names the same row (a cache, a comparison in code, would miss it). */
export const Id = z.uuid().toLowerCase();

export const Message = z.object({ message: z.string() }).meta({ id: 'Message' });

/** An error answer, `{detail}`. Its OpenAPI name stays `HTTPError`, as FastAPI clients know it. */
export const ErrorBody = z.object({ detail: z.string() }).meta({ id: 'HTTPError' });

export const ValidationError = z
  .object({
    detail: z.array(
      z.object({
        loc: z.array(z.union([z.string(), z.number()])),
        msg: z.string(),
        type: z.string(),
      }),
    ),
  })
  .meta({ id: 'HTTPValidationError' });

/** A number as a parameter writes it: decimal digits, a sign and a fraction at most. */
const DECIMAL = /^-?[0-9]{1,16}(\.[0-9]+)?$/;

/**
 * A query or path parameter holding one integer written in decimal: what `Number()` would also
 * take (`0x10`, `1e1`, ` 5`, an empty value as 0) is not a number here, nor is a repeated
 * parameter (an array); a fraction is a number but no integer. Documented as the integer it is.
 */
export function integerParam(min: number, max: number, fallback?: number) {
  const integer = z.number({ error: 'Input should be a single integer' }).int({ error: 'Input should be an integer' }).min(min).max(max);
  // The default inside the pipe, where the document shows it; an absent parameter reaches it as it is.
  const parse = (value: unknown) => (value === undefined ? undefined : typeof value === 'string' && DECIMAL.test(value) ? Number(value) : Number.NaN);
  return fallback === undefined ? z.preprocess(parse, integer) : z.preprocess(parse, integer.default(fallback));
}

const STRING_BOOLEAN = z.stringbool();

/**
 * A query parameter holding a boolean, written as `z.stringbool()` takes it (`true`/`false`, `1`/`0`,
 * `yes`/`no`…), documented as the boolean it is (a string, generated clients refused `true`).
 */
export function booleanParam(fallback: boolean) {
  const parse = (value: unknown) => (typeof value === 'string' ? (STRING_BOOLEAN.safeParse(value).data ?? value) : value);
  return z.preprocess(parse, z.boolean({ error: 'Input should be a valid boolean' }).default(fallback));
}

/** `?limit=&offset=`, and nothing else: an unknown parameter (`?skip=`, `?page=`) answers 422. */
export const Pagination = z.strictObject({
  limit: integerParam(1, 100, 20),
  offset: integerParam(0, 1_000_000_000, 0),
});

/** `{data, count}`: one page of a list and the total it was cut from. */
export function listOf<T extends z.ZodType>(item: T) {
  return z.object({ data: z.array(item), count: z.number().int() });
}

/** Responses every authenticated route may give, besides its own. */
export const authErrors = { 401: ErrorBody, 403: ErrorBody, 422: ValidationError } as const;

export const Email = z.email().max(255);

// ==================== Bounded client data ====================

/**
 * Text a client sends to be kept (titles, names, descriptions, messages, tags): a string without
 * half of a UTF-16 surrogate pair (422 at the field, UNPAIRED_SURROGATE_MESSAGE). PostgreSQL's
 * text kept one silently as U+FFFD and its json refused it as "Value out of range"; one rule
 * refuses both. Chain the field's own bounds after it (`Text.trim().max(255)`).
 */
export const Text = z.string().refine((value) => !hasUnpairedSurrogate(value), { error: UNPAIRED_SURROGATE_MESSAGE });

/**
 * A new password: Text's rule too, as hashing encodes it to UTF-8 with half of a surrogate pair
 * as U+FFFD, so two different strings ("pw\uD800…", "pw\uFFFD…") were one password.
 */
export const Password = Text.min(8).max(128);

/** Bounds of a `metadata` object: its JSON size in bytes, how deep it nests, how long a key is. */
export const METADATA_MAX_BYTES = 16_384;
export const METADATA_MAX_DEPTH = 5;
export const METADATA_MAX_KEY_LENGTH = 255;

/**
 * Whether a JSON value nests at most `max` levels (a scalar 0, `{}` or `[]` 1, `{"a": {}}` 2). The
 * walk stops at the first level past `max`, so it never recurses deeper than that however deep
 * the value goes: it is what to ask before anything recursive (JSON.stringify) touches a client's
 * free-form JSON, which could otherwise exhaust the call stack.
 */
export function nestsWithin(value: unknown, max: number): boolean {
  if (value === null || typeof value !== 'object') return true;
  if (max <= 0) return false;
  if (Array.isArray(value)) {
    for (const item of value) if (!nestsWithin(item, max - 1)) return false;
    return true;
  }
  for (const key in value) if (!nestsWithin((value as Record<string, unknown>)[key], max - 1)) return false;
  return true;
}

/** A client's free-form JSON object, bounded in size and depth (a client sends nothing unbounded). */
export const Metadata = z
  .record(z.string().max(METADATA_MAX_KEY_LENGTH), z.unknown())
  .superRefine((value, ctx) => {
    // Depth first: measuring the size serializes the value, recursively.
    if (!nestsWithin(value, METADATA_MAX_DEPTH)) {
      ctx.addIssue({ code: 'custom', message: `Metadata nests deeper than ${METADATA_MAX_DEPTH} levels` });
      return;
    }
    // Text's rule, for every string and key in it (a bounded walk: the depth is checked).
    const unpaired = unpairedSurrogateAt(value);
    if (unpaired) {
      ctx.addIssue({ code: 'custom', message: UNPAIRED_SURROGATE_MESSAGE, path: unpaired });
      return;
    }
    const bytes = Buffer.byteLength(JSON.stringify(value));
    if (bytes > METADATA_MAX_BYTES) ctx.addIssue({ code: 'custom', message: `Metadata is ${bytes} bytes as JSON; at most ${METADATA_MAX_BYTES} are kept` });
  })
  .meta({
    id: 'Metadata',
    description: `A JSON object of the client's own: at most ${METADATA_MAX_BYTES} bytes as JSON, ${METADATA_MAX_DEPTH} levels deep, keys of at most ${METADATA_MAX_KEY_LENGTH} characters.`,
  });

/** Labels: up to 32 of up to 64 characters each; repeats are dropped. */
export const Tags = z
  .array(Text.trim().min(1).max(64))
  .max(32)
  .overwrite((tags) => [...new Set(tags)]);
