import { APICallError, RetryError } from 'ai';
import { describe, expect, it } from 'vitest';

import { errorReason, findInCauses } from '../../src/utils/error-chain.js';
import { settledWithin, TimedOutError } from '../../src/utils/time-limit.js';

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

describe('errorReason', () => {
  it('gives the message of the error and of those behind it, with a code the message does not say', () => {
    const refused = Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:1'), { code: 'ECONNREFUSED' });
    expect(errorReason(refused)).toBe('connect ECONNREFUSED 127.0.0.1:1');
    // A connection refused on every address (localhost's ::1 and 127.0.0.1): no message, only a code.
    expect(errorReason(Object.assign(new AggregateError([refused], ''), { code: 'ECONNREFUSED' }))).toBe('AggregateError (ECONNREFUSED)');
    expect(errorReason(new Error('File storage is unavailable', { cause: new Error('The specified bucket does not exist') }))).toBe(
      'File storage is unavailable: The specified bucket does not exist',
    );
    expect(errorReason('thrown as a string')).toBe('thrown as a string');
    expect(errorReason(undefined)).toBe('no reason given');
  });

  it('masks the password of a URL an error quotes, and keeps the rest', () => {
    expect(errorReason(new Error('cannot reach postgres://keel:s3cret@db.internal:5432/keel or redis://:other-secret@cache:6379/0'))).toBe(
      'cannot reach postgres://keel:[redacted]@db.internal:5432/keel or redis://:[redacted]@cache:6379/0',
    );
    expect(errorReason(new Error('see https://example.com/a:b/c'))).toBe('see https://example.com/a:b/c');
    // A raw `@` in the password (not percent-encoded): masked up to the authority's last `@`.
    expect(errorReason(new Error('cannot reach postgres://keel:p@ss@w0rd@db:5432/keel'))).toBe('cannot reach postgres://keel:[redacted]@db:5432/keel');
  });

  it('says how long work went unanswered (settledWithin)', async () => {
    const outcome = await settledWithin(20, new Promise(() => undefined));
    expect(outcome).toEqual({ ok: false, error: expect.any(TimedOutError) as TimedOutError });
    expect(errorReason((outcome as { error: unknown }).error)).toBe('no answer within 20 ms');
    expect(await settledWithin(1_000, Promise.resolve())).toEqual({ ok: true });
  });
});
