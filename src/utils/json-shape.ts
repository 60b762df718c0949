/**
 * A JSON text's shape read before it is parsed: how deep it nests and how many values it holds.
 * JSON.parse's cost grows with the values, not the bytes: within a 20 MB body, 9.5 million nested
 * arrays took 2.6 s of the event loop to parse and a million small values ~1.6 s, where 20 MB of
 * one string (an image's base64) take 33 ms. Reading the structure first costs the characters
 * between strings (a string is skipped with indexOf) and stops at the first bound passed.
 */

/** A bound a JSON text passes: where (keys and indices down to that point), and what. */
export interface JsonShapeIssue {
  path: (string | number)[];
  kind: 'depth' | 'values';
}

const QUOTE = 34;
const BACKSLASH = 92;
const COMMA = 44;
const COLON = 58;
const OPEN_ARRAY = 91;
const CLOSE_ARRAY = 93;
const OPEN_OBJECT = 123;
const CLOSE_OBJECT = 125;

/** Whether the quote at `at` is escaped: an odd number of backslashes before it. */
function escaped(text: string, at: number): boolean {
  let before = at - 1;
  while (text.charCodeAt(before) === BACKSLASH) before--;
  return (at - 1 - before) % 2 === 1;
}

/** A key's text unescaped; as written when its escapes are not JSON's (the parse, never reached, would have refused it). */
function keyOf(raw: string): string {
  try {
    return JSON.parse(`"${raw}"`) as string;
  } catch {
    return raw;
  }
}

/**
 * The first place `text` nests past `maxDepth` arrays and objects, or holds more than `maxValues`
 * values (array items and object members, counted as they are separated or opened); undefined
 * within both, and for text that is not JSON (JSON.parse says what is wrong with it). The path
 * names the containers open there, down to the one that passes the bound.
 */
export function jsonShapeIssue(text: string, maxDepth: number, maxValues: number): JsonShapeIssue | undefined {
  // Per open container: an array (its item's index) or an object (its member's key, as the span of the text's string).
  const isArray: boolean[] = [];
  const index: number[] = [];
  const keyStart: number[] = [];
  const keyEnd: number[] = [];
  let depth = 0;
  let values = 1;
  let stringStart = -1;
  let stringEnd = -1;
  const pathTo = (levels: number): (string | number)[] => {
    const path: (string | number)[] = [];
    for (let level = 0; level < levels; level++) {
      if (isArray[level]) path.push(index[level]!);
      else if (keyStart[level]! >= 0) path.push(keyOf(text.slice(keyStart[level], keyEnd[level])));
    }
    return path;
  };
  for (let at = 0; at < text.length; at++) {
    switch (text.charCodeAt(at)) {
      case QUOTE: {
        let end = text.indexOf('"', at + 1);
        while (end > 0 && escaped(text, end)) end = text.indexOf('"', end + 1);
        if (end < 0) return undefined;
        stringStart = at + 1;
        stringEnd = end;
        at = end;
        break;
      }
      case COLON:
        if (depth > 0) {
          keyStart[depth - 1] = stringStart;
          keyEnd[depth - 1] = stringEnd;
        }
        break;
      case COMMA:
        if (++values > maxValues) return { path: pathTo(depth), kind: 'values' };
        if (depth > 0 && isArray[depth - 1]) index[depth - 1]! += 1;
        break;
      case OPEN_ARRAY:
      case OPEN_OBJECT:
        if (depth >= maxDepth) return { path: pathTo(depth), kind: 'depth' };
        if (++values > maxValues) return { path: pathTo(depth), kind: 'values' };
        isArray[depth] = text.charCodeAt(at) === OPEN_ARRAY;
        index[depth] = 0;
        keyStart[depth] = -1;
        depth++;
        break;
      case CLOSE_ARRAY:
      case CLOSE_OBJECT:
        depth--;
        break;
    }
  }
  return undefined;
}
