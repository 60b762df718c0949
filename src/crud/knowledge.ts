import { and, eq, inArray, isNotNull, isNull, lt, lte, or, type SQL, sql } from 'drizzle-orm';
import type { PgColumn } from 'drizzle-orm/pg-core';

import { type Db, transaction } from '../core/db.js';
import { constraintAnswers } from '../core/error-mapping.js';
import { ConflictError, databaseError } from '../core/errors.js';

import {
  knowledgeChunks,
  knowledgeEntries,
  type KnowledgeEntry,
  knowledgeFileDeletions,
  type KnowledgeFolder,
  knowledgeFolders,
  type NewKnowledgeEntry,
  type NewKnowledgeFolder,
} from '../models/index.js';

import { definePolicy } from '../utils/access.js';
import type { Principal } from '../utils/authentication.js';
import { pairSafeEnd } from '../utils/text.js';
import { ownedCrud } from './owned.js';
import { lockUserKeyShare } from './user.js';

// ==================== Access ====================

/** Folders: their owner's (or any superuser's); a project-scoped key reads and writes its project's. */
export const folderPolicy = definePolicy<KnowledgeFolder>({
  noun: 'Folder',
  owner: knowledgeFolders.owner_id,
  project: knowledgeFolders.project_id,
  scopedKey: 'write',
  superuserSeesAll: true,
});

/** Entries: as their folder (an entry's `project_id` is its folder's). */
export const entryPolicy = definePolicy<KnowledgeEntry>({
  noun: 'Entry',
  owner: knowledgeEntries.owner_id,
  project: knowledgeEntries.project_id,
  scopedKey: 'write',
  superuserSeesAll: true,
});

export const folderCrud = ownedCrud<KnowledgeFolder, NewKnowledgeFolder>(knowledgeFolders, folderPolicy);
export const entryCrud = ownedCrud<KnowledgeEntry, NewKnowledgeEntry>(knowledgeEntries, entryPolicy);

const FOLDER_NAME_UNIQUE = 'ux_knowledge_folders_owner_id_name';
const ENTRY_NAME_UNIQUE = 'ux_knowledge_entries_folder_id_filename';

constraintAnswers({
  knowledge_folders_project_id_projects_id_fk: { status: 404, detail: 'Project not found' },
  knowledge_entries_folder_id_knowledge_folders_id_fk: { status: 404, detail: 'Folder not found' },
});

/**
 * The caller's own rows whatever their privileges (a superuser's search and stats are their own
 * too); with a project-scoped key, its project's only.
 */
export function ownRows(principal: Principal, owner: PgColumn, project: PgColumn): SQL {
  const scope = principal.scopeProjectId;
  return and(eq(owner, principal.user.id), scope === null ? undefined : eq(project, scope))!;
}

// ==================== Unique names ====================

/** Where a name must be unique: folders per owner, files per folder. */
export interface NameScope {
  column: PgColumn;
  /** The rows the name must differ from (`owner_id = …`, `folder_id = …`). */
  within: SQL;
  constraint: string;
}

export const folderNames = (ownerId: string): NameScope => ({
  column: knowledgeFolders.name,
  within: eq(knowledgeFolders.owner_id, ownerId),
  constraint: FOLDER_NAME_UNIQUE,
});

export const entryNames = (folderId: string): NameScope => ({
  column: knowledgeEntries.filename,
  within: eq(knowledgeEntries.folder_id, folderId),
  constraint: ENTRY_NAME_UNIQUE,
});

/** `report.pdf` → [`report`, `.pdf`]; a leading dot is part of the stem (`.env` has no extension). */
function splitExtension(name: string): [string, string] {
  const dot = name.lastIndexOf('.');
  return dot > 0 ? [name.slice(0, dot), name.slice(dot)] : [name, ''];
}

/** The longest start of `text` of at most `units` UTF-16 units that cuts no surrogate pair in two. */
function cutAt(text: string, units: number): string {
  return text.slice(0, pairSafeEnd(text, Math.max(0, Math.min(text.length, units))));
}

/**
 * The `n`th variant of `name`: `report (n).pdf`, fitting `maxChars` (UTF-16 units, as names are
 * measured): the stem shortened first (to one character at least), then the extension's end;
 * never inside a surrogate pair (a lone half is no name: it was stored as U+FFFD, so the name was
 * never seen as taken again and a third clash ended in 409).
 */
export function numberedName(name: string, n: number, maxChars = 255): string {
  const [stem, extension] = splitExtension(name);
  const suffix = ` (${n})`;
  const shortStem = cutAt(stem, maxChars - suffix.length - extension.length) || [...stem].slice(0, 1).join('');
  const head = `${shortStem}${suffix}`;
  return `${head}${cutAt(extension, maxChars - head.length)}`;
}

/** Numbered names looked up per statement. */
const NAME_CANDIDATES = 100;

/**
 * `name` if no row in `scope` has it (or only `self` does), else the first free `name (n)`. The
 * names are asked for exactly, a hundred at a time: a long name's numbered forms are shortened, so
 * no pattern on the name finds them all.
 */
async function freeName(db: Db, scope: NameScope, name: string, self?: string): Promise<string> {
  const table = scope.column.table;
  const idColumn = (table as unknown as { id: PgColumn }).id;
  for (let first = 1; ; first += NAME_CANDIDATES) {
    const candidates = Array.from({ length: NAME_CANDIDATES }, (_, i) => numberedName(name, first + i));
    if (first === 1) candidates.unshift(name);
    const rows = await db
      .select({ name: scope.column })
      .from(table)
      .where(and(scope.within, self ? sql`${idColumn} <> ${self}` : undefined, inArray(scope.column, candidates)));
    const taken = new Set(rows.map((row) => row.name));
    const free = candidates.find((candidate) => !taken.has(candidate));
    if (free !== undefined) return free;
  }
}

const NAME_ATTEMPTS = 20;

/**
 * Writes a row under a name unique in `scope`: `name`, or `name (1)`, `name (2)`, … when taken.
 * Race-free: the unique index decides, and a write that loses a race to the same name (23505 on
 * the scope's constraint, rolled back to a savepoint) tries the next free one.
 */
export async function writeUniquelyNamed<T>(db: Db, scope: NameScope, name: string, write: (tx: Db, name: string) => Promise<T>, self?: string): Promise<T> {
  for (let attempt = 0; attempt < NAME_ATTEMPTS; attempt++) {
    const candidate = await freeName(db, scope, name, self);
    try {
      return await transaction(db, (tx) => write(tx, candidate));
    } catch (error) {
      if (databaseError(error)?.constraint !== scope.constraint) throw error;
    }
  }
  throw new ConflictError(`Could not find a free name for "${name}"; try another name`);
}

// ==================== Usage ====================

/**
 * The least an entry counts for against KB_MAX_BYTES_PER_USER, however small its file: a stored
 * file takes a disk block (and a row, an index entry, an ingestion), so a quota of bytes would
 * otherwise let a user hold millions of empty or one-byte entries.
 */
export const MIN_CHARGED_BYTES = 4096;

/**
 * What an entry counts for against the quota: the larger of its file and the text its chunks
 * hold, counted once, each chunk for at least MIN_CHUNK_CHARGE_BYTES (`text_bytes`), at least MIN_CHARGED_BYTES. The text because that is what the database
 * keeps of it, and a compressed PDF or DOCX extracts to ~100× its file; not their sum, as the
 * file's size already bounds a document that extracts to no more than itself (plain text).
 */
export const chargedBytes = (size: number, textBytes = 0) => Math.max(size, textBytes, MIN_CHARGED_BYTES);

/** `chargedBytes` in SQL, of each row. */
const chargedBytesOf = sql`greatest(${knowledgeEntries.size_bytes}, ${knowledgeEntries.text_bytes}, ${MIN_CHARGED_BYTES})`;

/** What the user's entries count for together (`chargedBytes` each): what KB_MAX_BYTES_PER_USER bounds. */
export async function usedBytes(db: Db, ownerId: string): Promise<number> {
  const [row] = await db
    .select({ total: sql<string>`coalesce(sum(${chargedBytesOf}), 0)` })
    .from(knowledgeEntries)
    .where(eq(knowledgeEntries.owner_id, ownerId));
  return Number(row?.total ?? 0);
}

export interface FileDeletion {
  id: string;
  storage_key: string;
}

const fileDeletionColumns = { id: knowledgeFileDeletions.id, storage_key: knowledgeFileDeletions.storage_key };

/** A recorded deletion that is due: a deleted entry's, or an upload's whose grace has passed (`of_upload`: to take first, `takeUploadedFiles`). */
export interface DueFileDeletion extends FileDeletion {
  of_upload: boolean;
}

/** Keys of deleted entries' files still to delete, oldest first (an upload's only once its `not_before` has passed). */
export async function pendingFileDeletions(db: Db, limit: number): Promise<DueFileDeletion[]> {
  return db
    .select({ ...fileDeletionColumns, of_upload: sql<boolean>`${knowledgeFileDeletions.not_before} is not null` })
    .from(knowledgeFileDeletions)
    .where(or(isNull(knowledgeFileDeletions.not_before), lte(knowledgeFileDeletions.not_before, sql`now()`)))
    .orderBy(knowledgeFileDeletions.created_at)
    .limit(limit);
}

/**
 * Uploads of the owner whose key starts with `ownerPrefix` still in progress: recorded within the
 * last `inFlightMs` (the longest a live upload can take: a dead process's count no longer than
 * that, though their files wait out their grace) and not claimed or taken. `not_before > now()`
 * (true of every such row: its grace is longer) is there for the partial index on it.
 */
export async function uploadsInFlight(db: Db, ownerPrefix: string, inFlightMs: number): Promise<number> {
  const f = knowledgeFileDeletions;
  return db.$count(
    f,
    and(
      sql`${f.not_before} > now()`,
      sql`${f.created_at} > now() - ${inFlightMs} * interval '1 millisecond'`,
      sql`starts_with(${f.storage_key}, ${ownerPrefix})`,
    ),
  );
}

/**
 * Records the key an upload is about to store its file under, to be deleted unless the upload's
 * entry is written (`claimUploadedFile`) before `graceMs` from now: what finds the file of an
 * upload whose process died between storing it and recording its entry. Returns the row's id.
 */
export async function recordUploadedFile(db: Db, storageKey: string, graceMs: number): Promise<string> {
  const [row] = await db
    .insert(knowledgeFileDeletions)
    .values({ storage_key: storageKey, not_before: sql`now() + ${graceMs} * interval '1 millisecond'` })
    .returning({ id: knowledgeFileDeletions.id });
  return row!.id;
}

/**
 * In the transaction that writes an upload's entry: takes its file off the list of files to delete.
 * False when the row is gone or the sweeper has taken it (`takeUploadedFiles`; the upload outlived
 * its grace): its file is being deleted, or is gone. The row's lock orders this against the
 * sweeper's take: whichever writes first wins, the other finds the row no longer its own.
 */
export async function claimUploadedFile(db: Db, id: string): Promise<boolean> {
  const rows = await db
    .delete(knowledgeFileDeletions)
    .where(and(eq(knowledgeFileDeletions.id, id), isNotNull(knowledgeFileDeletions.not_before)))
    .returning({ id: knowledgeFileDeletions.id });
  return rows.length > 0;
}

/**
 * The sweeper's take of uploads' records whose grace has passed, before it deletes their files:
 * each becomes a plain deletion record (`not_before` null, as a deleted entry's), which the upload
 * can no longer claim (`claimUploadedFile`), and which stays until its file is deleted (a crash
 * or storage refusing in between: the next sweep deletes it). A conditional write, not a read: a
 * record its upload claimed meanwhile (the entry written, or being written: the take waits for its
 * commit) is not taken, and its file stays. Returns the ids taken.
 */
export async function takeUploadedFiles(db: Db, ids: string[]): Promise<Set<string>> {
  if (!ids.length) return new Set();
  const f = knowledgeFileDeletions;
  const rows = await db
    .update(f)
    .set({ not_before: null })
    .where(and(inArray(f.id, ids), isNotNull(f.not_before), lte(f.not_before, sql`now()`)))
    .returning({ id: f.id });
  return new Set(rows.map((row) => row.id));
}

/**
 * The deletions recorded for these keys (a key is an entry's for its life: recorded once it is
 * deleted). Deleted entries' records only: an upload's (`not_before` set) is its upload's to claim
 * until the sweeper takes it.
 */
export async function fileDeletionsOf(db: Db, storageKeys: string[]): Promise<FileDeletion[]> {
  if (!storageKeys.length) return [];
  return db
    .select(fileDeletionColumns)
    .from(knowledgeFileDeletions)
    .where(and(inArray(knowledgeFileDeletions.storage_key, storageKeys), isNull(knowledgeFileDeletions.not_before)));
}

/** Storage keys of up to `limit` of the folder's entries. */
export async function entryKeysIn(db: Db, folderId: string, limit: number): Promise<string[]> {
  const rows = await db.select({ storage_key: knowledgeEntries.storage_key }).from(knowledgeEntries).where(eq(knowledgeEntries.folder_id, folderId)).limit(limit);
  return rows.map((row) => row.storage_key);
}

export async function forgetFileDeletions(db: Db, ids: string[]): Promise<void> {
  if (ids.length) await db.delete(knowledgeFileDeletions).where(inArray(knowledgeFileDeletions.id, ids));
}

/**
 * The project of the folder an entry is written into, the folder's row share-locked to the end of
 * the transaction: a change of its project (which moves its entries with it, setEntriesProject)
 * waits for the entry to be written and then moves it too, and one committed first is the project
 * read here. Read before the transaction, or in a subquery that does not wait, the old project was
 * written while the change moved only the entries it saw. 404 for a folder gone meanwhile.
 */
export async function lockedFolderProject(tx: Db, folderId: string): Promise<string | null> {
  const [row] = await tx.select({ project_id: knowledgeFolders.project_id }).from(knowledgeFolders).where(eq(knowledgeFolders.id, folderId)).for('share');
  if (!row) throw folderPolicy.notFound();
  return row.project_id;
}

/** Keeps the entries' project equal to their folder's (what the scoped-key rule reads). */
export async function setEntriesProject(db: Db, folderId: string, projectId: string | null): Promise<void> {
  await db.update(knowledgeEntries).set({ project_id: projectId }).where(eq(knowledgeEntries.folder_id, folderId));
}

// ==================== Stats ====================

export interface KnowledgeCounts {
  folder_count: number;
  entries_by_status: Record<KnowledgeEntry['status'], number>;
  size_bytes: number;
  chunk_count: number;
  token_count: number;
}

/** Counts over the folders and entries matching `folders` / `entries` (the caller's visible rows). */
export async function counts(db: Db, folders: SQL | undefined, entries: SQL | undefined): Promise<KnowledgeCounts> {
  const [folderRow] = await db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(knowledgeFolders).where(folders);
  const rows = await db
    .select({
      status: knowledgeEntries.status,
      n: sql<number>`count(*)`.mapWith(Number),
      bytes: sql<number>`coalesce(sum(${knowledgeEntries.size_bytes}), 0)`.mapWith(Number),
      chunks: sql<number>`coalesce(sum(${knowledgeEntries.chunk_count}), 0)`.mapWith(Number),
      tokens: sql<number>`coalesce(sum(${knowledgeEntries.token_count}), 0)`.mapWith(Number),
    })
    .from(knowledgeEntries)
    .where(entries)
    .groupBy(knowledgeEntries.status);
  const byStatus = { pending: 0, processing: 0, ready: 0, failed: 0 };
  let [bytes, chunks, tokens] = [0, 0, 0];
  for (const row of rows) {
    byStatus[row.status] = row.n;
    bytes += row.bytes;
    chunks += row.chunks;
    tokens += row.tokens;
  }
  return { folder_count: folderRow?.n ?? 0, entries_by_status: byStatus, size_bytes: bytes, chunk_count: chunks, token_count: tokens };
}

// ==================== What the sweeper looks for ====================

/**
 * The mark of a pending entry whose job was queued (at its upload or reindex, or by a sweep):
 * `lease_expires_at`, which nothing else reads on a pending entry (the claim takes a pending entry
 * whatever it says), set `markMs` ahead. No sweep queues the entry again before it passes.
 */
export const jobQueuedMark = (markMs: number): SQL => sql`now() + ${markMs} * interval '1 millisecond'`;

/** Drops pending entries' marks: the jobs they were set for could not be queued. */
export async function clearJobQueuedMarks(db: Db, entryIds: string[]): Promise<void> {
  const e = knowledgeEntries;
  await db.update(e).set({ lease_expires_at: null, updated_at: sql`${e.updated_at}` }).where(and(inArray(e.id, entryIds), eq(e.status, 'pending')));
}

/**
 * The sweep's pick of entries to queue again, marked as picked (`jobQueuedMark`) in the same
 * statement: pending ones older than `pendingAgeMs` whose mark has passed (or that have none), and
 * processing ones whose lease ran out (their worker died), handed back as pending with the mark.
 * Without the mark every sweep queued another job for each entry of a backlog (entries only waiting
 * their turn behind JOB_CONCURRENCY in Redis), and the copies piled up. Rows locked with SKIP
 * LOCKED: two workers' sweeps never both pick an entry. `ignoreMarks`: an in-process queue's
 * start-up sweep (its jobs died with the process) takes every pending entry at once. An entry
 * handed back counts again for the text its chunks hold (`text_bytes_stored`), not for a dead
 * worker's last reservation, while its job waits its turn (as the claim does: services/knowledge/
 * ingestion.ts). No job holds an entry picked here (a pending one has no claim; an expired one's is
 * taken), so no reservation is live.
 */
export function unfinishedWithoutJob(db: Db, pick: { pendingAgeMs: number; markMs: number; ignoreMarks: boolean; limit: number }): Promise<Pick<KnowledgeEntry, 'id'>[]> {
  const e = knowledgeEntries;
  const unmarked = pick.ignoreMarks ? undefined : or(isNull(e.lease_expires_at), lte(e.lease_expires_at, sql`now()`));
  const leaseRunOut = and(eq(e.status, 'processing'), lt(e.lease_expires_at, sql`now()`));
  const picked = db
    .select({ id: e.id })
    .from(e)
    .where(or(and(eq(e.status, 'pending'), lt(e.updated_at, sql`now() - ${pick.pendingAgeMs} * interval '1 millisecond'`), unmarked), leaseRunOut))
    .limit(pick.limit)
    .for('update', { skipLocked: true });
  return db
    .update(e)
    // updated_at stays: the sweep's bookkeeping is no change of the entry's.
    .set({ status: 'pending', lease_token: null, lease_expires_at: jobQueuedMark(pick.markMs), text_bytes: sql`${e.text_bytes_stored}`, updated_at: sql`${e.updated_at}` })
    .where(and(inArray(e.id, picked), or(eq(e.status, 'pending'), leaseRunOut)))
    .returning({ id: e.id });
}

// ==================== Chunks ====================

/**
 * The entry's owner's row FOR KEY SHARE (crud/user.ts lockUserKeyShare), found from the entry's id:
 * for a transaction that has only that id, before it locks the entry's row. Nothing when the
 * entry or its owner is gone (a delete committed while this waited).
 */
export async function lockEntryOwnerKeyShare(db: Db, entryId: string): Promise<void> {
  await lockUserKeyShare(db, db.select({ id: knowledgeEntries.owner_id }).from(knowledgeEntries).where(eq(knowledgeEntries.id, entryId)));
}

export async function deleteChunks(db: Db, entryId: string): Promise<void> {
  await db.delete(knowledgeChunks).where(eq(knowledgeChunks.entry_id, entryId));
}

// ==================== Agent knowledge ====================

export interface KnowledgeRefs {
  folders: { id: string; name: string }[];
  entries: { id: string; filename: string; folder_id: string; status: KnowledgeEntry['status'] }[];
}

/**
 * Of the named folders and entries, those `ownerId` has (with `projectId`: in that project only),
 * with their names: what an agent of `ownerId` may be given to search.
 */
export async function usableKnowledge(db: Db, ownerId: string, projectId: string | null, ids: { folder_ids: string[]; entry_ids: string[] }): Promise<KnowledgeRefs> {
  const inScope = (owner: PgColumn, project: PgColumn) => and(eq(owner, ownerId), projectId === null ? undefined : eq(project, projectId));
  // One after the other: `db` may be a transaction, which runs one statement at a time.
  const folders = ids.folder_ids.length
    ? await db
        .select({ id: knowledgeFolders.id, name: knowledgeFolders.name })
        .from(knowledgeFolders)
        .where(and(inArray(knowledgeFolders.id, ids.folder_ids), inScope(knowledgeFolders.owner_id, knowledgeFolders.project_id)))
    : [];
  const entries = ids.entry_ids.length
    ? await db
        .select({ id: knowledgeEntries.id, filename: knowledgeEntries.filename, folder_id: knowledgeEntries.folder_id, status: knowledgeEntries.status })
        .from(knowledgeEntries)
        .where(and(inArray(knowledgeEntries.id, ids.entry_ids), inScope(knowledgeEntries.owner_id, knowledgeEntries.project_id)))
    : [];
  // In the order the agent names them.
  const order = (list: string[]) => (a: { id: string }, b: { id: string }) => list.indexOf(a.id) - list.indexOf(b.id);
  return { folders: folders.sort(order(ids.folder_ids)), entries: entries.sort(order(ids.entry_ids)) };
}
