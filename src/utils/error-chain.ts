/** How far down an error's `cause`s a search goes (Drizzle, pg and the SDKs wrap an error two or three deep). */
const MAX_CAUSES = 4;

/** The first of `error` and its causes that `is` accepts, within MAX_CAUSES. */
export function findInCauses<E>(error: unknown, is: (e: unknown) => e is E): E | undefined;
export function findInCauses(error: unknown, is: (e: unknown) => boolean): unknown;
export function findInCauses(error: unknown, is: (e: unknown) => boolean): unknown {
  for (let e: unknown = error, depth = 0; e && depth < MAX_CAUSES; e = (e as { cause?: unknown }).cause, depth++) {
    if (is(e)) return e;
  }
  return undefined;
}
