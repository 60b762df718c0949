import { z } from 'zod';

import { providerBaseUrl } from '../core/config.js';

import { PROVIDER_KINDS } from '../modules/ai-models/types.js';
import { Id, Timestamp } from './common.js';

/** How models name the provider: lower case, digits, `-`, `_`, `.` (`ollama`, `openrouter`). */
const ProviderName = z.string().regex(/^[a-z0-9][a-z0-9._-]{0,63}$/, { error: 'Use lower-case letters, digits, ".", "_" or "-" (at most 64)' });
const BaseUrl = providerBaseUrl();
/**
 * Headers the HTTP client writes itself, from the request it sends: one of these set here would
 * contradict them (a wrong length, another host), and every call to the provider would fail. So
 * would the body's encodings: the JSON it sends (`content-type`, `content-encoding`) and what it
 * reads (`accept-encoding`: a compressed answer, which the direct path reads as it comes, failed
 * every call there as "Invalid JSON response" while the SDK's fetch inflated it).
 */
const FRAMING_HEADERS = new Set([
  'host',
  'content-length',
  'transfer-encoding',
  'connection',
  'keep-alive',
  'upgrade',
  'expect',
  'te',
  'trailer',
  'proxy-connection',
  'content-type',
  'content-encoding',
  'accept-encoding',
]);
const HeaderName = z
  .string()
  .regex(/^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$/, { error: 'Not an HTTP header name' })
  // Keel's own: the model manager tells the SDK's fetch what answer to expect in one (answer-limit.ts),
  // and every request carries the deployment's hop mark in another (core/hop.ts), which a record must not replace.
  .refine((name) => !name.toLowerCase().startsWith('x-keel-'), { error: 'Header names starting with x-keel- are reserved for Keel' })
  .refine((name) => !FRAMING_HEADERS.has(name.toLowerCase()), { error: 'The HTTP client sets this header itself' });
/** What an HTTP header's value may hold: no line breaks or other control characters (the client refuses them), no characters past Latin-1. */
const HeaderValue = z
  .string()
  .max(8192)
  .regex(/^[\t\x20-\x7e\x80-\xff]*$/, { error: 'A header value holds no line breaks, control characters or characters past Latin-1' });
/** The first of `headers`' names that repeats an earlier one but for its case, if any. */
function caseRepeated(headers: Record<string, string>): string | undefined {
  const seen = new Set<string>();
  return Object.keys(headers).find((name) => seen.size === seen.add(name.toLowerCase()).size);
}
/**
 * A stored record's headers as they may be sent: a record written before a check above (framing
 * headers, a name given twice but for its case) would go on failing every call, or go with other
 * credentials on each path, and its values are never shown to be mended one by one. Such headers
 * are left out (of a name given twice, all but its last value); `dropped` names them, for the log.
 */
export function sendableHeaders(headers: Record<string, string>): { headers: Record<string, string>; dropped: string[] } {
  const last = new Map(Object.keys(headers).map((name) => [name.toLowerCase(), name]));
  const kept = Object.entries(headers).filter(([name]) => !FRAMING_HEADERS.has(name.toLowerCase()) && last.get(name.toLowerCase()) === name);
  return { headers: Object.fromEntries(kept), dropped: Object.keys(headers).filter((name) => !kept.some(([k]) => k === name)) };
}

/**
 * Header names are case-insensitive: `Authorization` and `authorization` are one header, which the
 * direct path sent with the last value and the SDK's fetch with both joined (`Bearer a, Bearer b`).
 */
const Headers = z
  .record(HeaderName, HeaderValue)
  .refine((headers) => Object.keys(headers).length <= 20, { error: 'At most 20 headers' })
  .superRefine((headers, ctx) => {
    const name = caseRepeated(headers);
    if (name !== undefined) ctx.addIssue({ code: 'custom', path: [name], message: 'Header names are case-insensitive: this one is given twice' });
  });

const ProviderFields = {
  kind: z.enum(PROVIDER_KINDS),
  /** Default: the SDK's own (OpenAI, Anthropic, Google); required for `openai-compatible`. */
  base_url: BaseUrl.nullable(),
  /** Stored sealed, never returned; null removes it. */
  api_key: z
    .string()
    .min(1)
    .max(4096)
    // It travels in a header (Authorization, x-api-key): a space or line break in it (a key pasted with its newline) fails every call.
    .regex(/^[\x21-\x7e]+$/, { error: 'An API key is visible ASCII characters: no spaces or line breaks' })
    .nullable(),
  /** Sent with every request (sealed like the key; only their names are returned). */
  headers: Headers.nullable(),
  enabled: z.boolean(),
};

/** Said when an openai-compatible provider would be left without a base URL (on create, and by an update: provider-service). */
export const BASE_URL_NEEDED = 'An openai-compatible provider needs a base_url';

export const ProviderCreate = z
  .strictObject({ name: ProviderName, ...ProviderFields })
  .partial({ base_url: true, api_key: true, headers: true, enabled: true })
  .refine((value) => value.kind !== 'openai-compatible' || !!value.base_url, { path: ['base_url'], error: BASE_URL_NEEDED })
  .meta({ id: 'ProviderCreate' });
export type ProviderCreate = z.infer<typeof ProviderCreate>;

/** The name is the id models refer to: it does not change (delete and create to rename). */
export const ProviderUpdate = z.strictObject(ProviderFields).partial().meta({ id: 'ProviderUpdate' });
export type ProviderUpdate = z.infer<typeof ProviderUpdate>;

export const ProviderPublic = z
  .object({
    id: Id,
    name: z.string(),
    kind: z.enum(PROVIDER_KINDS),
    base_url: z.string().nullable(),
    has_api_key: z.boolean(),
    header_names: z.array(z.string()),
    enabled: z.boolean(),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'ProviderPublic' });
export type ProviderPublic = z.infer<typeof ProviderPublic>;
