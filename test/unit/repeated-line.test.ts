import { describe, expect, it } from 'vitest';

import { RepeatedLine } from '../../src/core/logger.js';

describe('RepeatedLine', () => {
  it('writes the first line of each window, with how many it left out before it', () => {
    const line = new RepeatedLine(1_000);
    expect(line.take(0)).toEqual({});
    expect(line.take(10)).toBeNull();
    expect(line.take(999)).toBeNull();
    expect(line.take(1_000)).toEqual({ repeated: 2 });
    expect(line.take(1_500)).toBeNull();
    // A quiet spell: the next line comes at once, and says what the last window left out.
    expect(line.take(60_000)).toEqual({ repeated: 1 });
    expect(line.take(120_000)).toEqual({});
  });
});
