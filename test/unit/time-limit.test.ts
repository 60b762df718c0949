import { describe, expect, it } from 'vitest';

import { fulfilledWithin } from '../../src/utils/time-limit.js';

describe('fulfilledWithin', () => {
  it('is true for work done in time, false for work that fails or is still running', async () => {
    expect(await fulfilledWithin(1_000, Promise.resolve('done'))).toBe(true);
    expect(await fulfilledWithin(1_000, Promise.reject(new Error('down')))).toBe(false);
    const started = performance.now();
    expect(await fulfilledWithin(20, new Promise(() => undefined))).toBe(false);
    expect(performance.now() - started).toBeLessThan(1_000);
  });
});
