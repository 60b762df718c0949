import { describe, expect, it } from 'vitest';

import { isoFormatter } from '../../src/utils/iso-time.js';

describe('isoFormatter', () => {
  it('writes what Date#toISOString writes, asked again and again, forwards and back', () => {
    const iso = isoFormatter();
    const now = Date.UTC(2026, 11, 3, 6, 0, 0, 999);
    for (const ms of [now, now, now + 1, now + 1, now, 0, -1, 8.64e15, now + 1000.5, now + 1000]) {
      expect(iso(ms)).toBe(new Date(ms).toISOString());
    }
  });

  it('throws as Date does for a time it cannot write', () => {
    const iso = isoFormatter();
    expect(() => iso(Number.NaN)).toThrow(RangeError);
    expect(() => iso(Number.NaN)).toThrow(RangeError);
  });
});
