/**
 * A run's error as its owner reads it (`describeRunError`), for the meter's refusals: the words
 * that say what stopped the run, not the client's generic 401.
 */
import { writeFileSync } from 'node:fs';

import { describe, expect, it } from 'vitest';

import { CredentialsGoneError, PaymentRequiredError, UnauthorizedError } from '../../src/core/errors.js';

import { describeRunError } from '../../src/modules/agents/runner.js';

const run = { model: 'fake-billed' };

describe('describeRunError', () => {
  it.each([
    ['api_key_revoked', 'API key revoked'],
    ['api_key_deleted', 'API key deleted'],
    ['user_deactivated', 'User deactivated'],
    ['user_deleted', 'User deleted'],
  ] as const)('a call refused because its credentials went away (%s) reads as the cancellation that goes with it: %s', (reason, words) => {
    const error = new CredentialsGoneError(reason);
    // The client of a request is told the generic 401, as a call made with those credentials now is.
    expect(error).toBeInstanceOf(UnauthorizedError);
    expect([error.statusCode, error.detail]).toEqual([401, 'Could not validate credentials']);
    expect(describeRunError(error, run)).toBe(words);
  });

  it('other refusals keep their own words', () => {
    expect(describeRunError(new UnauthorizedError(), run)).toBe('Could not validate credentials');
    expect(describeRunError(new PaymentRequiredError('Not enough credits: available 0'), run)).toBe('Not enough credits: available 0');
  });

  it('a write the disk had no room for says so, not an internal error', () => {
    const full = (() => {
      try {
        writeFileSync('/dev/full', 'x');
      } catch (error) {
        return error;
      }
    })();
    expect(describeRunError(full, run)).toBe('The server is out of storage space; try again later');
    const database = Object.assign(new Error('could not extend file "base/5/16941": No space left on device'), { code: '53100' });
    expect(describeRunError(new Error('Failed query: insert into "messages" ...', { cause: database }), run)).toBe('The server is out of storage space; try again later');
  });
});
