import { z } from 'zod';

/** A timestamp: a Date in code, ISO 8601 UTC on the wire. */
export const Timestamp = z.codec(z.iso.datetime({ offset: true }), z.date(), {
  decode: (text) => new Date(text),
  encode: (date) => date.toISOString(),
});

export const Id = z.uuid();

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

/** A query parameter holding one integer (a repeated parameter arrives as an array: not one integer). */
const queryInteger = () => z.coerce.number({ error: 'Input should be a single integer' }).int({ error: 'Input should be an integer' });

/** `?limit=&offset=`, and nothing else: an unknown parameter (`?skip=`, `?page=`) answers 422. */
export const Pagination = z.strictObject({
  limit: queryInteger().min(1).max(100).default(20),
  offset: queryInteger().min(0).max(1_000_000_000).default(0),
});

/** `{data, count}`: one page of a list and the total it was cut from. */
export function listOf<T extends z.ZodType>(item: T) {
  return z.object({ data: z.array(item), count: z.number().int() });
}

/** Responses every authenticated route may give, besides its own. */
export const authErrors = { 401: ErrorBody, 403: ErrorBody, 422: ValidationError } as const;

export const Password = z.string().min(8).max(128);
export const Email = z.email().max(255);
