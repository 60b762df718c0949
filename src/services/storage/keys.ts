import { HttpError } from '../../core/errors.js';

/**
 * Storage keys: `<prefix>/<part>/<part>/…`, built only from parts that pass `checkPart`, so no
 * string a client sends (a file name, a folder name) can leave the prefix on either backend.
 *
 * The rules, and why:
 * - a part is not empty, not `.` or `..`, and not only dots or spaces (Windows and some S3 tools
 *   strip trailing dots and spaces, which would make `..` out of `.. `);
 * - no `/` or `\` inside a part (separators on one platform or the other);
 * - no control characters (C0, DEL, C1: NUL truncates C strings, newlines forge log lines), no
 *   format characters (bidi overrides, zero-width joiners: names that read as something else), no
 *   line/paragraph separators, no lone surrogates (not representable in UTF-8 file names);
 * - the part must already be in Unicode NFKC form. NFKC folds compatibility look-alikes onto their
 *   ASCII originals (U+FF0F fullwidth solidus → `/`, U+FF3C → `\`, U+FF0E → `.`, U+2024 one-dot
 *   leader → `.`, U+FE52 small full stop → `.`), and a part NFKC would change is refused outright
 *   rather than silently rewritten: a stored key is then exactly the string that was checked;
 * - look-alikes of `/` and `\` that NFKC leaves alone (U+2044 fraction slash, U+2215 division
 *   slash, U+2216 set minus, U+29F5/U+29F8/U+29F9, U+FE68 small reverse solidus) are refused too;
 * - a part is at most MAX_PART_BYTES UTF-8 bytes (NAME_MAX on Linux file systems), a key at most
 *   MAX_KEY_BYTES (S3's limit) and MAX_PARTS deep.
 */

export const MAX_PART_BYTES = 255;
export const MAX_KEY_BYTES = 1024;
export const MAX_PARTS = 32;

/** A path part or key was refused: it could leave its prefix, or no backend can store it. */
export class StoragePathError extends HttpError {
  constructor(reason: string) {
    super(422, `Invalid storage path: ${reason}`);
  }
}

/** No stored file under that key. */
export class StorageNotFoundError extends HttpError {
  constructor() {
    super(404, 'File not found');
  }
}

/** A move onto a key that already holds a file; on local disk, a folder part that is a file already. */
export class StorageConflictError extends HttpError {
  constructor(detail = 'A file already exists at the destination') {
    super(409, detail);
  }
}

/** A byte range outside the file (HTTP 416). */
export class StorageRangeError extends HttpError {
  constructor(readonly size: number) {
    super(416, `Range not satisfiable (the file has ${size} bytes)`, { 'content-range': `bytes */${size}` });
  }
}

const FORBIDDEN = /[\p{Cc}\p{Cf}\p{Cs}\p{Zl}\p{Zp}]/u;
const SEPARATOR_LOOKALIKES = /[/\\\u2044\u2215\u2216\u29f5\u29f8\u29f9\ufe68\uff0f\uff3c]/u;
const ONLY_DOTS_AND_SPACES = /^[.\s]*$/u;
const PREFIX = /^[a-z0-9][a-z0-9-]{0,62}$/;

/** Checks one path part; throws StoragePathError saying what is wrong with it. */
export function checkPart(part: unknown): string {
  if (typeof part !== 'string') throw new StoragePathError('a path part must be a string');
  if (part === '') throw new StoragePathError('empty path part');
  if (FORBIDDEN.test(part)) throw new StoragePathError('a path part holds a control or format character');
  if (SEPARATOR_LOOKALIKES.test(part)) throw new StoragePathError('a path part holds a slash, a backslash or a look-alike of one');
  if (ONLY_DOTS_AND_SPACES.test(part)) throw new StoragePathError('a path part cannot be only dots and spaces');
  if (part.normalize('NFKC') !== part) throw new StoragePathError('a path part must be in Unicode NFKC form (no compatibility look-alikes)');
  if (Buffer.byteLength(part) > MAX_PART_BYTES) throw new StoragePathError(`a path part is longer than ${MAX_PART_BYTES} bytes`);
  return part;
}

/** A prefix is chosen by the code, never a client: lower-case letters, digits and dashes. */
export function checkPrefix(prefix: string): string {
  if (!PREFIX.test(prefix)) throw new StoragePathError(`prefix ${JSON.stringify(prefix)} must match ${PREFIX.source}`);
  return prefix;
}

/** The key of `parts` under `prefix`, every part checked. */
export function buildKey(prefix: string, parts: readonly unknown[]): string {
  if (parts.length === 0) throw new StoragePathError('no path parts');
  if (parts.length > MAX_PARTS) throw new StoragePathError(`more than ${MAX_PARTS} path parts`);
  const key = [prefix, ...parts.map(checkPart)].join('/');
  if (Buffer.byteLength(key) > MAX_KEY_BYTES) throw new StoragePathError(`the key is longer than ${MAX_KEY_BYTES} bytes`);
  return key;
}

/** The parts of a key handed back (from a database row, say): it must lie under `prefix` and pass every check. */
export function splitKey(prefix: string, key: unknown): string[] {
  if (typeof key !== 'string') throw new StoragePathError('a key must be a string');
  const [head, ...parts] = key.split('/');
  if (head !== prefix) throw new StoragePathError(`the key is not under ${prefix}/`);
  buildKey(prefix, parts);
  return parts;
}
