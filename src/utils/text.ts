/** A high surrogate with no low one after it, or a low one with no high one before it. */
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

/**
 * Text from outside (an upstream's error message) as PostgreSQL can store it, cut to at most `max`
 * UTF-16 units: without NUL characters (text and json refuse them) and well-formed (a surrogate
 * pair cut in two at the limit leaves a lone surrogate, which json input refuses). One such value
 * in a batched statement failed the whole batch, every time it was retried.
 */
export function storableText(text: string, max: number): string {
  const cut = text.length > max ? text.slice(0, max) : text;
  return cut.replaceAll('\u0000', '').replace(LONE_SURROGATE, '\ufffd');
}

/**
 * A model's text as a thread stores it: a NUL character (which text and json columns refuse, so
 * the answer was lost and its run failed) shown as U+FFFD, the character of what could not be kept.
 */
export function withoutNul(text: string): string {
  return text.includes('\u0000') ? text.replaceAll('\u0000', '\ufffd') : text;
}

/** `withoutNul` through a JSON value (a tool call's arguments, stored as jsonb): its strings and keys. */
export function withoutNulDeep(value: unknown): unknown {
  if (typeof value === 'string') return withoutNul(value);
  if (Array.isArray(value)) return value.map(withoutNulDeep);
  if (value === null || typeof value !== 'object') return value;
  return Object.fromEntries(Object.entries(value).map(([key, item]) => [withoutNul(key), withoutNulDeep(item)]));
}

/** Names for a message, the first ten of them: `a, b, c` or `a, ..., j and 5 more`. */
export function firstNames(names: readonly string[]): string {
  return names.slice(0, 10).join(', ') + (names.length > 10 ? ` and ${names.length - 10} more` : '');
}
