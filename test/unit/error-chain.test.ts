import { APICallError, RetryError } from 'ai';
import { describe, expect, it } from 'vitest';

import { findInCauses } from '../../src/utils/error-chain.js';

const isApiCallError = (e: unknown): e is APICallError => APICallError.isInstance(e);
const apiCallError = () => new APICallError({ message: 'overloaded', url: 'http://upstream/v1/chat/completions', requestBodyValues: {}, statusCode: 503 });
/** `error` behind `depth` wrappers, each the cause of the one before. */
const wrapped = (error: unknown, depth: number): unknown => (depth === 0 ? error : new Error(`wrapper ${depth}`, { cause: wrapped(error, depth - 1) }));

describe('findInCauses', () => {
  it('finds the error itself or one of its causes, up to four behind it (a database error behind Drizzle, pg and a pool)', () => {
    const found = { code: '40001' };
    const hasCode = (e: unknown) => typeof (e as { code?: unknown }).code === 'string';
    for (const depth of [0, 1, 4]) expect(findInCauses(wrapped(found, depth), hasCode), `${depth}`).toBe(found);
    expect(findInCauses(wrapped(found, 5), hasCode)).toBeUndefined();
  });

  it("follows the AI SDK RetryError's last try (its lastError, not a cause), as the model manager's classification reads it", () => {
    const last = apiCallError();
    const retry = new RetryError({ message: 'Failed after 2 attempts', reason: 'maxRetriesExceeded', errors: [new Error('first try'), last] });
    expect(findInCauses(retry, isApiCallError)).toBe(last);
    expect(findInCauses(new Error('stream failed', { cause: retry }), isApiCallError)).toBe(last);
  });

  it('stops at an error that is its own cause, and at the end of the chain', () => {
    const looped = new Error('looped');
    looped.cause = looped;
    let looks = 0;
    expect(findInCauses(looped, () => (looks++, false))).toBeUndefined();
    expect(looks).toBe(1);
    expect(findInCauses(new Error('alone'), isApiCallError)).toBeUndefined();
    expect(findInCauses(undefined, isApiCallError)).toBeUndefined();
  });
});
