/**
 * How an entry's failed embedding ends (`outcomeOf`) when its credentials went away midway: the
 * entry fails saying which, but for a deleted key, whose indexing goes on paid by the account
 * (docs/decisions.md): another try, which finds no key and so no key's limits. And when a write
 * kept losing to a database conflict (a deadlock, a serialization failure): another try, and on
 * the last one the entry fails saying so.
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

describe('outcomeOf, a write that kept losing to a conflict', () => {
  // deadlockRetried gave up (each of its runs aborted): nothing of the write was kept, and the queue's next try resumes from what is stored.
  const conflict = (code: string) => new Error('Failed query', { cause: Object.assign(new Error('conflict'), { code }) });

  it.each(['40P01', '40001'])('tries the entry again (%s)', (code) => {
    expect(outcomeOf(conflict(code), { attempts: 1 }, 3)).toEqual({ retry: 'a database write kept conflicting with another' });
  });

  it.each(['40P01', '40001'])('fails it once its attempts are spent, saying the database kept conflicting and to try again (%s)', (code) => {
    expect(outcomeOf(conflict(code), { attempts: 3 }, 3)).toEqual({
      fail: 'Ingestion stopped: a database write kept conflicting with another (after 3 attempts; the database was busy with other changes to the same rows); reindex the entry to try again',
    });
  });

  it('fails it at once for another database error', () => {
    expect(outcomeOf(conflict('23505'), { attempts: 1 }, 3)).toEqual({ fail: 'Ingestion failed because of an internal error (it is in the server log); reindex the entry to try again' });
  });
});
