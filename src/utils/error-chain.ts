/**
 * How many errors behind an error a search looks at (Drizzle, pg and the SDKs wrap an error two or
 * three deep; an AI SDK RetryError puts one more in front).
 */
const MAX_LINKS = 4;

/** The error behind `error`: the AI SDK RetryError's `lastError` (its last try's, which it keeps there, not as its `cause`), else its `cause`. */
function behind(error: unknown): unknown {
  const { lastError, cause } = error as { lastError?: unknown; cause?: unknown };
  return lastError ?? cause;
}

/** The first of `error` and the errors behind it (`lastError` or `cause`, MAX_LINKS of them at most) that `is` accepts. */
export function findInCauses<E>(error: unknown, is: (e: unknown) => e is E): E | undefined;
export function findInCauses(error: unknown, is: (e: unknown) => boolean): unknown;
export function findInCauses(error: unknown, is: (e: unknown) => boolean): unknown {
  for (let e: unknown = error, links = 0; e && links <= MAX_LINKS; links++) {
    if (is(e)) return e;
    const next = behind(e);
    // Its own cause: nothing further to find.
    if (next === e) break;
    e = next;
  }
  return undefined;
}

/** A file system's "no space left" (ENOSPC) or "over quota" (EDQUOT): a full disk, whatever asked for the room. */
export const isDiskFullCode = (code: unknown): boolean => code === 'ENOSPC' || code === 'EDQUOT';

/** `user:password@` in a URL (a connection string an error may quote): the password is masked, up to the last `@` of the authority (a raw `@` in a password). */
const URL_CREDENTIALS = /(\/\/[^/\s:@]*:)[^/\s]*@/g;

/**
 * One line saying why `error` happened, for an operator's log: the message of it and of each error
 * behind it (with its code where the message does not say it: a connection refused on every address
 * is an AggregateError with no message), without stacks, and any password in a URL masked.
 */
export function errorReason(error: unknown): string {
  const parts: string[] = [];
  for (let e: unknown = error, links = 0; e && links <= MAX_LINKS; links++) {
    const { message, name, code } = e as { message?: unknown; name?: unknown; code?: unknown };
    let part = typeof message === 'string' && message ? message : typeof name === 'string' && name ? name : typeof e === 'string' ? e : 'no message';
    if ((typeof code === 'string' || typeof code === 'number') && !part.includes(String(code))) part += ` (${code})`;
    if (!parts.includes(part)) parts.push(part);
    const next = behind(e);
    if (next === e) break;
    e = next;
  }
  return (parts.join(': ') || 'no reason given').replace(URL_CREDENTIALS, '$1[redacted]@');
}
