/**
 * How an entry's failed embedding ends (`outcomeOf`) when its credentials went away midway: the
 * entry fails saying which, but for a deleted key, whose indexing goes on paid by the account
 * (docs/decisions.md): another try, which finds no key and so no key's limits.
 */
import { describe, expect, it } from 'vitest';

import { CredentialsGoneError } from '../../src/core/errors.js';

import { outcomeOf } from '../../src/services/knowledge/ingestion.js';

describe('outcomeOf, credentials gone', () => {
  it('tries a deleted key\'s entry again (the try finds no key)', () => {
    expect(outcomeOf(new CredentialsGoneError('api_key_deleted'), { attempts: 1 }, 3)).toEqual({ retry: 'Embedding paused: the API key that asked for this indexing was deleted' });
  });

  it.each([
    ['api_key_revoked', 'the API key that asked for this indexing was revoked'],
    ['user_deactivated', "the owner's account was deactivated"],
    ['user_deleted', "the owner's account was deleted"],
  ] as const)('fails the entry when %s, saying so', (reason, words) => {
    expect(outcomeOf(new CredentialsGoneError(reason), { attempts: 1 }, 3)).toEqual({ fail: `Embedding stopped: ${words}; reindex the entry to index it again` });
  });
});
