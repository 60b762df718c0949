import type { Settings } from '../../core/config.js';
import type { Logger } from '../../core/logger.js';

import { getStorageService, type StorageService } from '../storage-service.js';

/** Where knowledge-base files live (SPEC §7: prefix `knowledge-base`, path `owner/folder/entry`). */
export const KNOWLEDGE_PREFIX = 'knowledge-base';

export function knowledgeStorage(settings: Settings): StorageService {
  return getStorageService(settings, { prefix: KNOWLEDGE_PREFIX });
}

/**
 * The key of an entry's file: `knowledge-base/<owner>/<folder at upload>/<entry id>`. Fixed for
 * the entry's life: a rename changes only the row, and a move too (no copy-and-delete on S3,
 * which is not atomic); see docs/decisions.md.
 */
export function entryKey(storage: StorageService, entry: { id: string; owner_id: string; folder_id: string }): string {
  return storage.keyFor(entry.id, [entry.owner_id, entry.folder_id]);
}

/** The extracted text ingestion writes beside the file (what `GET …/content` returns). */
export const textKeyOf = (storageKey: string) => `${storageKey}.txt`;

/**
 * Deletes entries' stored files and extracted text, after their rows are gone. A failure is logged,
 * not thrown: the rows (what the user sees, and the quota) are already gone, and a file left
 * behind is only space.
 */
export async function deleteStoredFiles(ctx: { settings: Settings; log: Logger }, storageKeys: string[]): Promise<void> {
  const storage = knowledgeStorage(ctx.settings);
  const keys = storageKeys.flatMap((key) => [key, textKeyOf(key)]);
  // A few at a time: a folder of thousands must not open thousands of requests at once.
  for (let i = 0; i < keys.length; i += 16) {
    await Promise.all(
      keys.slice(i, i + 16).map((key) =>
        storage.deleteFile(key).catch((error: unknown) => {
          ctx.log.warn({ err: error, key }, 'knowledge file could not be deleted; it is left behind');
        }),
      ),
    );
  }
}
