/**
 * Half of a UTF-16 surrogate pair standing alone: a `u` regex reads a whole pair as one character
 * (not `Cs`) and only half of one as `Cs`. Global, for `replace`; `test` uses UNPAIRED_SURROGATE.
 */
const UNPAIRED_SURROGATES = /\p{Cs}/gu;
const UNPAIRED_SURROGATE = /\p{Cs}/u;

/**
 * Why text with half of a surrogate pair is refused. It is no character: PostgreSQL's text would
 * keep it as U+FFFD (the driver encodes to UTF-8) and its json refuses it (22P02).
 */
export const UNPAIRED_SURROGATE_MESSAGE = 'Text holds an unpaired surrogate (half of a UTF-16 surrogate pair, which is no character): send whole characters';

/** Whether `text` holds half of a UTF-16 surrogate pair standing alone (well-formed text holds none). */
export function hasUnpairedSurrogate(text: string): boolean {
  return UNPAIRED_SURROGATE.test(text);
}

/**
 * Where in a JSON value a string or a key holds an unpaired surrogate (the path to it, a key's
 * own path for a key), or undefined when none does. Recursive: for values whose depth is bounded.
 */
export function unpairedSurrogateAt(value: unknown): (string | number)[] | undefined {
  if (typeof value === 'string') return hasUnpairedSurrogate(value) ? [] : undefined;
  if (value === null || typeof value !== 'object') return undefined;
  const entries: [string | number, unknown][] = Array.isArray(value) ? value.map((item, i) => [i, item]) : Object.entries(value);
  for (const [key, item] of entries) {
    if (typeof key === 'string' && hasUnpairedSurrogate(key)) return [key];
    const inside = unpairedSurrogateAt(item);
    if (inside) return [key, ...inside];
  }
  return undefined;
}

/**
 * Text from outside (an upstream's error message) as PostgreSQL can store it, cut to at most `max`
 * UTF-16 units: without NUL characters (text and json refuse them) and well-formed (a surrogate
 * pair cut in two at the limit leaves a lone surrogate, which json input refuses). One such value
 * in a batched statement failed the whole batch, every time it was retried.
 */
export function storableText(text: string, max: number): string {
  const cut = text.length > max ? text.slice(0, max) : text;
  return cut.replaceAll('\u0000', '').replace(UNPAIRED_SURROGATES, '\ufffd');
}

/**
 * A model's text as a thread stores it: a NUL character (which text and json columns refuse, so
 * the answer was lost and its run failed) and half of a UTF-16 surrogate pair standing alone
 * (which jsonb refuses, 22P02: a tool call with one in its arguments failed its step; text would
 * keep it as U+FFFD) shown as U+FFFD, the character of what could not be kept.
 */
export function storableModelText(text: string): string {
  const kept = text.includes('\u0000') ? text.replaceAll('\u0000', '\ufffd') : text;
  return hasUnpairedSurrogate(kept) ? kept.replace(UNPAIRED_SURROGATES, '\ufffd') : kept;
}

/** `storableModelText` through a JSON value (a tool call's arguments, stored as jsonb): its strings and keys. */
export function storableModelValue(value: unknown): unknown {
  if (typeof value === 'string') return storableModelText(value);
  if (Array.isArray(value)) return value.map(storableModelValue);
  if (value === null || typeof value !== 'object') return value;
  return Object.fromEntries(Object.entries(value).map(([key, item]) => [storableModelText(key), storableModelValue(item)]));
}

/** Whether a UTF-16 unit is the first half of a surrogate pair. */
export const isHighSurrogate = (code: number): boolean => code >= 0xd800 && code <= 0xdbff;

/** `end`, or one less where a cut of `text` there would split a surrogate pair (its first half the last unit kept). */
export function pairSafeEnd(text: string, end: number): number {
  return end > 0 && end < text.length && isHighSurrogate(text.charCodeAt(end - 1)) ? end - 1 : end;
}

/**
 * `storableModelText` for text that comes in pieces (a model's streamed deltas): a piece that ends
 * with the first half of a pair keeps it for the next piece, which may hold the other half (a
 * provider may cut an emoji between two chunks), so the pieces joined are `storableModelText` of
 * the text joined. `end()` gives what is left (U+FFFD for a half that no piece completed).
 */
export function storableModelPieces(): { next: (piece: string) => string; end: () => string } {
  let held = '';
  return {
    next(piece: string): string {
      const text = held + piece;
      held = text.length && isHighSurrogate(text.charCodeAt(text.length - 1)) ? text.slice(-1) : '';
      return storableModelText(held ? text.slice(0, -1) : text);
    },
    end(): string {
      const rest = held;
      held = '';
      return storableModelText(rest);
    },
  };
}

/** Names for a message, the first ten of them: `a, b, c` or `a, ..., j and 5 more`. */
export function firstNames(names: readonly string[]): string {
  return names.slice(0, 10).join(', ') + (names.length > 10 ? ` and ${names.length - 10} more` : '');
}

const MIB = 1024 * 1024;

/** A size for a message that quotes a limit: `1048576 bytes (1.0 MiB)` (exact, and readable at a glance). */
export const bytesWithMiB = (n: number): string => `${n} bytes (${(n / MIB).toFixed(1)} MiB)`;

/** Text with no character but white space, or none: what Anthropic refuses as a text block. */
export const isBlank = (text: string): boolean => !/\S/.test(text);
