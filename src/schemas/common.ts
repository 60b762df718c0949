import { z } from 'zod';

/** A timestamp: a Date in code, ISO 8601 UTC on the wire. */
export const Timestamp = z.codec(z.iso.datetime({ offset: true }), z.date(), {
  decode: (text) => new Date(text),
  encode: (date) => date.toISOString(),
});

export const Id = z.uuid();

export const Message = z.object({ message: z.string() }).meta({ id: 'Message' });

export const HTTPError = z.object({ detail: z.string() }).meta({ id: 'HTTPError' });

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

export const Pagination = z.object({
  limit: z.coerce.number().int().min(1).max(100).default(20),
  offset: z.coerce.number().int().min(0).max(1_000_000_000).default(0),
});
export type Pagination = z.infer<typeof Pagination>;

/** `{data, count}`: one page of a list and the total it was cut from. */
export function listOf<T extends z.ZodType>(item: T) {
  return z.object({ data: z.array(item), count: z.number().int() });
}

/** Responses every authenticated route may give, besides its own. */
export const authErrors = { 401: HTTPError, 403: HTTPError, 422: ValidationError } as const;

export const Password = z.string().min(8).max(128);
export const Email = z.email().max(255);
