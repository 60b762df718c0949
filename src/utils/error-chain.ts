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
