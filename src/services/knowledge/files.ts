import { HTTP_REQUEST_TIMEOUT_MAX_MS, type Settings } from '../../core/config.js';
import type { Db } from '../../core/db.js';
import type { Logger } from '../../core/logger.js';

import { type FileDeletion, fileDeletionsOf, forgetFileDeletions, pendingFileDeletions, takeUploadedFiles } from '../../crud/knowledge.js';
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
 * How long an upload's recorded file is safe from the sweeper: the request's own bound (its body
 * must arrive within HTTP_REQUEST_TIMEOUT_MS) and a margin for what follows the last byte (the
 * storage write's completion, the entry's transaction). The same grace spares a write still going
 * from `abandonStaleWrites`: an upload's, and an ingestion's extracted text (up to
 * KB_MAX_TEXT_CHARS, written at once from memory: 15 minutes is ~90 KB/s for the largest; one
 * slower fails and its ingestion is tried again).
 */
export function uploadGraceMs(settings: { HTTP_REQUEST_TIMEOUT_MS: number }): number {
  return settings.HTTP_REQUEST_TIMEOUT_MS + UPLOAD_GRACE_MARGIN_MS;
}

const UPLOAD_GRACE_MARGIN_MS = 15 * 60 * 1000;

/**
 * How long an unfinished write is spared by `abandonStaleWrites`: the grace of an upload on a node
 * with the longest HTTP_REQUEST_TIMEOUT_MS there can be. A write in the bucket does not say which
 * node began it, and the sweeping worker's own setting may be shorter than an API node's (an upload
 * still arriving there had its parts aborted and failed with 503). A killed write's parts wait an
 * hour longer at most.
 */
export const ABANDONED_WRITE_GRACE_MS = uploadGraceMs({ HTTP_REQUEST_TIMEOUT_MS: HTTP_REQUEST_TIMEOUT_MAX_MS });

/**
 * Discards the knowledge base's writes that a killed process left unfinished (on S3 a multipart
 * upload's parts, billed and listed nowhere else until aborted), once past ABANDONED_WRITE_GRACE_MS:
 * the sweeper's work. Returns how many.
 */
export function abandonStaleWrites(settings: Settings): Promise<number> {
  return knowledgeStorage(settings).abandonStaleWrites(ABANDONED_WRITE_GRACE_MS);
}

/**
 * Deletes stored files and their extracted text; returns the keys whose deletion failed (logged).
 * A file already gone is no failure.
 */
export async function deleteStoredFiles(ctx: { settings: Settings; log: Logger }, storageKeys: string[]): Promise<Set<string>> {
  const storage = knowledgeStorage(ctx.settings);
  const failed = new Set<string>();
  // A few at a time: a folder of thousands must not open thousands of requests at once.
  for (let i = 0; i < storageKeys.length; i += 16) {
    await Promise.all(
      storageKeys.slice(i, i + 16).map(async (key) => {
        // Both tried, and both awaited: one failing does not leave the other's delete running on past the answer.
        const outcomes = await Promise.allSettled([storage.deleteFile(key), storage.deleteFile(textKeyOf(key))]);
        const refused = outcomes.find((outcome) => outcome.status === 'rejected');
        if (refused) {
          ctx.log.warn({ err: refused.reason, key }, 'knowledge file could not be deleted; will try again');
          failed.add(key);
        }
      }),
    );
  }
  return failed;
}

/** Keys handled per round of `purgeDeletedFiles`, and at most by a deleting request (`purgeFilesOf`). */
export const PURGE_BATCH = 500;

/** Deletes the files of these recorded deletions and forgets those done; a failed one stays recorded. Returns the rows done. */
async function purge(ctx: { db: Db; settings: Settings; log: Logger }, recorded: FileDeletion[]): Promise<number> {
  const failed = await deleteStoredFiles(ctx, [...new Set(recorded.map((row) => row.storage_key))]);
  const deleted = recorded.filter((row) => !failed.has(row.storage_key));
  await forgetFileDeletions(
    ctx.db,
    deleted.map((row) => row.id),
  );
  return deleted.length;
}

/**
 * Deletes the files of deleted entries (the rows a trigger leaves in knowledge_file_deletions),
 * everyone's, and of uploads whose grace has passed, round after round until none is left or
 * storage fails; a key whose deletion failed stays for the next purge. An upload's record is taken
 * from its upload first (`takeUploadedFiles`): one its upload claimed after this read (the entry
 * written just as its grace passed) is left, with its file. The sweeper's work: a request purges
 * only its own (`purgeFilesOf`). Returns the keys done.
 */
export async function purgeDeletedFiles(ctx: { db: Db; settings: Settings; log: Logger }): Promise<number> {
  let done = 0;
  for (;;) {
    const due = await pendingFileDeletions(ctx.db, PURGE_BATCH);
    if (!due.length) return done;
    const taken = await takeUploadedFiles(
      ctx.db,
      due.filter((row) => row.of_upload).map((row) => row.id),
    );
    const pending = due.filter((row) => !row.of_upload || taken.has(row.id));
    const deleted = await purge(ctx, pending);
    done += deleted;
    if (deleted < pending.length || due.length < PURGE_BATCH) return done;
  }
}

/**
 * After a deletion through the API: deletes the files of the entries it deleted, given their keys
 * (up to PURGE_BATCH of them), so that the request's time does not depend on other deletions
 * waiting for the sweeper, which takes what is left or failed. Only keys with a recorded deletion
 * of an entry are touched: a key read before the deletion whose entry lives on (moved out of a
 * folder meanwhile) keeps its file, and so does an upload's (`fileDeletionsOf`). Returns the keys done.
 */
export async function purgeFilesOf(ctx: { db: Db; settings: Settings; log: Logger }, storageKeys: string[]): Promise<number> {
  return purge(ctx, await fileDeletionsOf(ctx.db, storageKeys.slice(0, PURGE_BATCH)));
}
