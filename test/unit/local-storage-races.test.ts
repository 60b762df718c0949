/**
 * LocalStorageBackend.remove prunes the directories a key made once they are empty (local.ts
 * pruneEmptyParents), while a put into the same directory may have made it (makeParent) and not
 * yet renamed its file in: the put makes it again. It failed with ENOENT: the upload of a file
 * into a folder whose last entry was being deleted answered 500.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { LocalStorageBackend } from '../../src/services/storage/local.js';

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'keel-local-races-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

async function* bytes(text: string): AsyncGenerator<Uint8Array> {
  yield Buffer.from(text);
}

describe('local storage, a put beside a remove of the last file in its directory', () => {
  it('stores the new file every time', async () => {
    const backend = new LocalStorageBackend(root);
    const failures: string[] = [];
    for (let i = 0; i < 1_000; i++) {
      await backend.put(`knowledge-base/owner/folder/old-${i}`, bytes('old'));
      const [, put] = await Promise.allSettled([backend.remove(`knowledge-base/owner/folder/old-${i}`), backend.put(`knowledge-base/owner/folder/new-${i}`, bytes('new'))]);
      if (put.status === 'rejected') failures.push((put.reason as NodeJS.ErrnoException).code ?? String(put.reason));
      await backend.remove(`knowledge-base/owner/folder/new-${i}`);
    }
    expect(failures).toEqual([]);
  }, 60_000);
});
