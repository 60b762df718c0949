import { describe, expect, it } from 'vitest';

import { buildKey, checkPrefix, MAX_KEY_BYTES, MAX_PART_BYTES, MAX_PARTS, splitKey, StoragePathError } from '../../src/services/storage/keys.js';
import { BAD_PARTS } from '../helpers/storage.js';

describe('storage keys', () => {
  it('builds a key from ordinary parts, unicode included', () => {
    expect(buildKey('knowledge-base', ['user-1', 'Résumé (1).pdf'])).toBe('knowledge-base/user-1/Résumé (1).pdf');
    expect(buildKey('kb', ['.hidden', 'a..b', 'x'.repeat(MAX_PART_BYTES)])).toBe(`kb/.hidden/a..b/${'x'.repeat(MAX_PART_BYTES)}`);
  });

  it.each(BAD_PARTS)('refuses a part: %s', (_name, part) => {
    expect(() => buildKey('kb', ['folder', part])).toThrow(StoragePathError);
  });

  it('refuses no parts, too many parts and a key over the byte limit', () => {
    expect(() => buildKey('kb', [])).toThrow(StoragePathError);
    expect(() => buildKey('kb', Array(MAX_PARTS + 1).fill('a'))).toThrow(/more than 32/);
    expect(buildKey('kb', Array(MAX_PARTS).fill('a'))).toHaveLength(2 + MAX_PARTS * 2);
    const long = Array(5).fill('y'.repeat(MAX_PART_BYTES));
    expect(() => buildKey('kb', long)).toThrow(new RegExp(`longer than ${MAX_KEY_BYTES}`));
  });

  it('answers 422 with a reason', () => {
    try {
      buildKey('kb', ['..']);
      expect.unreachable();
    } catch (error) {
      expect(error).toBeInstanceOf(StoragePathError);
      expect((error as StoragePathError).statusCode).toBe(422);
      expect((error as StoragePathError).detail).toMatch(/dots/);
    }
  });

  it('checks keys handed back: under the prefix, every part valid', () => {
    expect(splitKey('kb', 'kb/a/b.txt')).toEqual(['a', 'b.txt']);
    for (const key of ['other/a.txt', 'kb', 'kb/', 'kb//a', 'kb/../x', '/kb/a', 'kb/a/../../etc/passwd', 'kb\\..\\x', 7]) {
      expect(() => splitKey('kb', key), String(key)).toThrow(StoragePathError);
    }
  });

  it('only takes code-chosen prefixes', () => {
    expect(checkPrefix('knowledge-base')).toBe('knowledge-base');
    for (const prefix of ['', '.tmp', '..', 'a/b', 'Upper', '-x', 'x'.repeat(64)]) expect(() => checkPrefix(prefix)).toThrow(StoragePathError);
  });
});
