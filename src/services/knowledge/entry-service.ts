import { randomUUID } from 'node:crypto';
import type { Readable } from 'node:stream';

import { type Db, transaction } from '../../core/db.js';
import { ConflictError, PayloadTooLargeError, PaymentRequiredError, ServiceUnavailableError, TooManyRequestsError, UnprocessableError } from '../../core/errors.js';

import { knowledgeEntries, type KnowledgeEntry, type KnowledgeFolder, knowledgeFolders } from '../../models/index.js';

import { type KnowledgeEntryListQuery, type KnowledgeEntryUpdate, nameProblem, normalizeName } from '../../schemas/knowledge.js';

import { forgetDeletedKnowledge } from '../../crud/agent.js';
import * as billingCrud from '../../crud/billing.js';
import {
  chargedBytes,
  claimUploadedFile,
  clearJobQueuedMarks,
  counts,
  entryCrud,
  entryNames,
  folderCrud,
  folderPolicy,
  forgetFileDeletions,
  jobQueuedMark,
  lockedFolderProject,
  MIN_CHARGED_BYTES,
  ownRows,
  recordUploadedFile,
  uploadsInFlight,
  usedBytes,
  writeUniquelyNamed,
} from '../../crud/knowledge.js';
import { matching } from '../../crud/owned.js';
import * as userCrud from '../../crud/user.js';
import { SNIFF_HEAD_BYTES, sniffFormat } from '../../modules/knowledge/sniff.js';
import { type DocumentFormat, DocumentRejectedError } from '../../modules/knowledge/types.js';
import type { Principal } from '../../utils/authentication.js';
import { bytesWithMiB as bytes } from '../../utils/text.js';
import type { ServiceContext } from '../context.js';
import { loadKeyLimits } from '../key-limits.js';
import { availableCredits, budgetLeft, notEnoughCreditsMessage, nothingLeft, overBudgetMessage } from '../money.js';
import { type OpenedFile, StorageTooLargeError } from '../storage-service.js';
import { hasVectorTable } from './embeddings.js';
import { deleteStoredFiles, entryKey, knowledgeStorage, purgeFilesOf, textKeyOf, uploadGraceMs } from './files.js';

// ==================== Limits ====================

/**
 * What one upload of a user may hold now: the per-file limit, or what is left of the quota if less
 * (the user's entries counted as chargedBytes counts them: their text too, where larger).
 */
export interface UploadAllowance {
  fileLimit: number;
  quota: number;
  used: number;
  /** The most bytes this upload may have. */
  max: number;
}

export async function uploadAllowance(ctx: ServiceContext, ownerId: string): Promise<UploadAllowance> {
  const { KB_MAX_FILE_BYTES: fileLimit, KB_MAX_BYTES_PER_USER: quota } = ctx.settings;
  const used = await usedBytes(ctx.db, ownerId);
  return { fileLimit, quota, used, max: Math.max(0, Math.min(fileLimit, quota - used)) };
}

/** 413 for a file of `size` bytes (or, with `atLeast`, more than that) over the allowance; its message has the figures. */
export function tooLarge(allowance: UploadAllowance, size: number, atLeast = false): PayloadTooLargeError {
  const what = atLeast ? `more than ${bytes(size)}` : bytes(size);
  if (atLeast ? size >= allowance.fileLimit : size > allowance.fileLimit) return new PayloadTooLargeError(`File too large: ${what}; the limit is ${bytes(allowance.fileLimit)} per file`);
  const left = Math.max(0, allowance.quota - allowance.used);
  const least = !atLeast && size < MIN_CHARGED_BYTES ? ` (each file counts for at least ${bytes(MIN_CHARGED_BYTES)})` : '';
  return new PayloadTooLargeError(
    `Storage quota exceeded: the file is ${what}${least} but only ${bytes(left)} of your ${bytes(allowance.quota)} are left (${bytes(allowance.used)} used); delete entries to make room`,
  );
}

/**
 * Refuses an upload whose declared size is over the allowance before reading it. `declared` is the
 * request's Content-Length less the most a form around one file can add (`formOverhead`), so a
 * file within the limits is never refused for its envelope.
 */
export function checkDeclaredSize(allowance: UploadAllowance, contentLength: number | undefined, formOverhead: number): void {
  if (contentLength === undefined) return;
  const fileAtLeast = contentLength - formOverhead;
  if (fileAtLeast > allowance.max) throw tooLarge(allowance, fileAtLeast, true);
}

// ==================== Payment ====================

/** The model ingestion will embed with, when it will embed at all and at a price (null otherwise). */
async function pricedEmbeddingModel(ctx: ServiceContext): Promise<string | null> {
  const id = ctx.settings.EMBEDDING_MODEL;
  // As ingestion decides: without the vector table (no pgvector) nothing is embedded.
  if (!id || !(await hasVectorTable(ctx.db))) return null;
  const info = ctx.models.modelAsCalled(id);
  // An unknown model fails the ingestion in words; a free one (a million tokens cost nothing) is never refused by the meter.
  if (!info || ctx.models.worstCase(info, 1_000_000, 0).cost === '0') return null;
  return info.id;
}

/**
 * 402 at once for an upload or reindex whose embeddings cannot be paid at all: billing on and the
 * owner's account with no credit available, or the requesting key's `max_budget` used up (what
 * the meter would refuse the first embedding call for, after the entry was taken). What the whole
 * document costs is unknown until it is chunked, so this asks only that something be left; the
 * meter still holds each batch's worst case, and a limit reached midway fails the entry
 * ("Embedding stopped: …"). Nothing is held here. One round trip: the balance and the key's
 * spend together (the key's limits come with its authentication); `ownerOf`, whose account pays,
 * is asked first, only when there is something to check (a reindex reads its entry for it: two).
 */
export async function checkEmbeddingPayable(ctx: ServiceContext, ownerOf: () => string | Promise<string>): Promise<void> {
  const { principal, settings } = ctx;
  const keyId = principal.apiKeyId;
  if (!settings.BILLING_ENABLED && keyId === null) return;
  const model = await pricedEmbeddingModel(ctx);
  if (model === null) return;
  const maxBudget = keyId === null ? null : (principal.apiKeyLimits ?? (await loadKeyLimits(ctx.db, keyId))).max_budget;
  if (!settings.BILLING_ENABLED && maxBudget === null) return;
  // The owner first (its 404 before any 402), its balance read as soon as it is known.
  const [credits, spend] = await Promise.all([
    Promise.resolve(ownerOf()).then((ownerId) => (settings.BILLING_ENABLED ? billingCrud.getBalance(ctx.db, ownerId) : null)),
    maxBudget === null ? null : billingCrud.keySpend(ctx.db, keyId!),
  ]);
  const needs = `nothing is left to embed this document with ${model}`;
  if (credits && nothingLeft(availableCredits(credits))) throw new PaymentRequiredError(`${notEnoughCreditsMessage(credits)}; ${needs}`);
  if (spend && nothingLeft(budgetLeft(maxBudget!, spend))) throw new PaymentRequiredError(`${overBudgetMessage(maxBudget!, spend)}; ${needs}`);
}

// ==================== Upload ====================

export interface UploadedFile {
  /** The file's bytes, as they arrive (never held whole). */
  stream: Readable;
  filename: string;
  /** What the client said the type is; the bytes decide where they can. */
  declaredMime: string;
  /**
   * Reads what the request sends after the file (a form's other parts) and rejects what it cannot
   * take (a second file): awaited once the file is stored and before the entry is written, so a
   * refused request leaves neither.
   */
  restOfForm?: () => Promise<void>;
}

/** A client's file name, checked as a rename is (422 on the `file` field otherwise). */
function checkedFilename(filename: string): string {
  const name = normalizeName(filename);
  const problem = nameProblem(name);
  if (problem) throw new UnprocessableError({ loc: ['body', 'file'], msg: `Invalid file name: ${problem}`, type: 'value_error' });
  return name;
}

/** The type each format is stored and served as. */
const MIME_TYPES: Record<DocumentFormat, string> = {
  text: 'text/plain',
  markdown: 'text/markdown',
  html: 'text/html',
  pdf: 'application/pdf',
  docx: 'application/vnd.openxmlformats-officedocument.wordprocessingml.document',
  csv: 'text/csv',
  json: 'application/json',
};

/**
 * The format and type of a file from its first bytes (the client's type and name only choose
 * between text formats). A file Keel cannot read is still stored, as `application/octet-stream`
 * with no format: its ingestion fails with the reason, which the user sees on the entry.
 */
async function sniffed(head: Uint8Array, filename: string, declaredMime: string): Promise<{ format: DocumentFormat | null; mime_type: string }> {
  try {
    const format = await sniffFormat(head, filename, declaredMime);
    return { format, mime_type: MIME_TYPES[format] };
  } catch (error) {
    if (error instanceof DocumentRejectedError) return { format: null, mime_type: 'application/octet-stream' };
    throw error;
  }
}

/** Passes `stream` through, keeping its first SNIFF_HEAD_BYTES bytes in `head`. */
async function* keepingHead(stream: AsyncIterable<Uint8Array>, head: Buffer[]): AsyncGenerator<Uint8Array> {
  let kept = 0;
  for await (const chunk of stream) {
    if (kept < SNIFF_HEAD_BYTES) {
      head.push(Buffer.from(chunk.subarray(0, SNIFF_HEAD_BYTES - kept)));
      kept += Math.min(chunk.length, SNIFF_HEAD_BYTES - kept);
    }
    yield chunk;
  }
}

/** busboy's own size cap: the storage stream's `maxBytes` usually refuses first; both mean the same 413. */
const isTooLarge = (error: unknown) => error instanceof StorageTooLargeError || (error as { code?: unknown }).code === 'FST_REQ_FILE_TOO_LARGE';

/**
 * Stores an uploaded file in `folder` and records it as a `pending` entry, then queues its
 * ingestion. The bytes stream to storage under the allowance (413 as soon as they pass it); the row
 * is written only once the file is complete and the rest of the request read (`restOfForm`), under
 * the owner's lock so that concurrent uploads cannot overrun the quota together. Anything that
 * fails leaves neither row nor file (nor a queued job).
 */
export async function upload(ctx: ServiceContext, folder: KnowledgeFolder, file: UploadedFile, allowance: UploadAllowance): Promise<KnowledgeEntry> {
  const filename = checkedFilename(file.filename);
  const ownerId = folder.owner_id;
  const id = randomUUID();
  const storage = knowledgeStorage(ctx.settings);
  const placed = { id, owner_id: ownerId, folder_id: folder.id };
  const head: Buffer[] = [];
  // Recorded before a byte is stored: a process killed between storing the file and writing the
  // entry leaves this row, and the sweeper deletes the file once the upload cannot be running. The
  // rows of the owner's uploads in progress are counted under the owner's lock: a bound on them.
  const recorded = await transaction(ctx.db, async (tx) => {
    await userCrud.lockUser(tx, ownerId);
    const limit = ctx.settings.KB_MAX_UPLOADS_IN_FLIGHT_PER_USER;
    if ((await uploadsInFlight(tx, `${storage.keyFor(ownerId)}/`, uploadInFlightMs(ctx.settings))) >= limit) {
      throw new TooManyRequestsError(5, `Too many uploads in progress: at most ${limit} at once per user (KB_MAX_UPLOADS_IN_FLIGHT_PER_USER); wait for one to finish`);
    }
    return recordUploadedFile(tx, entryKey(storage, placed), uploadGraceMs(ctx.settings));
  });
  let stored;
  try {
    stored = await storage.saveFile(keepingHead(file.stream, head), id, undefined, [ownerId, folder.id], { maxBytes: allowance.max });
  } catch (error) {
    await forgetFileDeletions(ctx.db, [recorded]);
    if (isTooLarge(error)) throw tooLarge(allowance, allowance.max, true);
    throw error;
  }
  try {
    await file.restOfForm?.();
    const type = await sniffed(Buffer.concat(head), filename, file.declaredMime);
    const entry = await transaction(ctx.db, async (tx) => {
      if (!(await claimUploadedFile(tx, recorded))) {
        throw new ServiceUnavailableError('The upload took too long to complete and its file was discarded; upload it again');
      }
      await userCrud.lockUser(tx, ownerId);
      const used = await usedBytes(tx, ownerId);
      if (used + chargedBytes(stored.size) > allowance.quota) throw tooLarge({ ...allowance, used }, stored.size);
      return writeUniquelyNamed(tx, entryNames(folder.id), filename, async (inner, name) =>
        entryCrud.create(inner, {
          ...placed,
          // The folder's project as it is now (it may have moved while the bytes arrived).
          project_id: await writableFolderProject(inner, ctx.principal, folder.id),
          filename: name,
          ...type,
          size_bytes: stored.size,
          sha256: stored.sha256,
          storage_key: stored.key,
          // The requester pays: a key's upload is embedded against that key's max_budget.
          api_key_id: ctx.principal.apiKeyId,
          // Its job is queued below: no sweep queues another while that one may be waiting its turn.
          lease_expires_at: jobQueuedMark(ctx.settings.KB_INGEST_LEASE_MS),
        }),
      );
    });
    await queueIngestion(ctx, entry.id);
    return entry;
  } catch (error) {
    // The file goes now; if storage refuses, the recorded row stays (when not already claimed)
    // and the sweeper retries once its grace has passed.
    const key = entryKey(storage, placed);
    if (!(await deleteStoredFiles(ctx, [key])).has(key)) await forgetFileDeletions(ctx.db, [recorded]);
    throw error;
  }
}

/**
 * How long an upload's record counts against KB_MAX_UPLOADS_IN_FLIGHT_PER_USER: the body's own
 * bound (HTTP_REQUEST_TIMEOUT_MS, which began before the record was written) and a minute for what
 * follows the last byte. Past it no byte of that upload can arrive (the server has cut the request
 * off), so it fills no more disk, and a process killed mid-upload no longer keeps its user at 429:
 * its file waits out the longer grace (uploadGraceMs) for the sweeper, uncounted.
 */
export function uploadInFlightMs(settings: { HTTP_REQUEST_TIMEOUT_MS: number }): number {
  return settings.HTTP_REQUEST_TIMEOUT_MS + UPLOAD_IN_FLIGHT_MARGIN_MS;
}

const UPLOAD_IN_FLIGHT_MARGIN_MS = 60 * 1000;

async function queueIngestion(ctx: ServiceContext, entryId: string): Promise<void> {
  // A job lost here (the queue down) is not lost for good: the sweeper finds the pending entry.
  await ctx.queue.add('ingest-entry', { entry_id: entryId }).catch(async (error: unknown) => {
    ctx.log.warn({ err: error, entryId }, 'ingestion could not be queued; the sweeper will pick the entry up');
    // No job waits for it: the next sweep may queue it (not only once the mark has passed).
    await clearJobQueuedMarks(ctx.db, [entryId]).catch(() => undefined);
  });
}

// ==================== Entries ====================

export function get(ctx: ServiceContext, id: string): Promise<KnowledgeEntry> {
  return entryCrud.getVisible(ctx.db, ctx.principal, id);
}

export function list(ctx: ServiceContext, query: KnowledgeEntryListQuery) {
  const filters = { folder_id: knowledgeEntries.folder_id, project_id: knowledgeEntries.project_id, status: knowledgeEntries.status };
  return entryCrud.list(ctx.db, ctx.principal, query, matching(filters, query));
}

/** Renames; a name taken in the folder gets a number (`report (1).pdf`). */
export async function update(ctx: ServiceContext, id: string, input: KnowledgeEntryUpdate): Promise<KnowledgeEntry> {
  const entry = await entryCrud.getVisible(ctx.db, ctx.principal, id, 'write');
  if (input.filename === undefined) return entry;
  return writeUniquelyNamed(ctx.db, entryNames(entry.folder_id), input.filename, (tx, filename) => entryCrud.update(tx, ctx.principal, id, { filename }), id);
}

/** The entry, its chunks and embeddings (cascade), its id in the owner's agents' knowledge, then its file and extracted text. */
export async function remove(ctx: ServiceContext, id: string): Promise<void> {
  // The key is the entry's for its life: read before, it is the one the deletion records.
  const { storage_key: key, owner_id: ownerId } = await entryCrud.getVisible(ctx.db, ctx.principal, id, 'write');
  await transaction(ctx.db, async (tx) => {
    // Its first statement: it waits for an ingestion's transaction holding the row, which then
    // commits first, or finds no row and writes nothing (see ingestion.ts).
    await entryCrud.remove(tx, ctx.principal, id);
    await forgetDeletedKnowledge(tx, ownerId);
  });
  await purgeFilesOf(ctx, [key]);
}

/** Into another of the owner's folders (404 for any other); a name taken there gets a number. */
export async function move(ctx: ServiceContext, id: string, folderId: string): Promise<KnowledgeEntry> {
  const entry = await entryCrud.getVisible(ctx.db, ctx.principal, id, 'write');
  const target = await folderCrud.getVisible(ctx.db, ctx.principal, folderId, 'write');
  if (target.owner_id !== entry.owner_id) throw folderPolicy.notFound();
  if (target.id === entry.folder_id) return entry;
  return writeUniquelyNamed(ctx.db, entryNames(target.id), entry.filename, async (tx, filename) =>
    entryCrud.update(tx, ctx.principal, id, { folder_id: target.id, project_id: await writableFolderProject(tx, ctx.principal, target.id), filename }),
  );
}

/**
 * The project of the folder an entry is written into, read with the folder's row share-locked
 * (lockedFolderProject), as the caller may still write there: the folder was checked before (at
 * an upload's start, before its bytes arrived), and a key scoped to a project whose folder has
 * moved to another since would put the entry outside its project. It gets 404, as for the folder now.
 */
async function writableFolderProject(tx: Db, principal: Principal, folderId: string): Promise<string | null> {
  const projectId = await lockedFolderProject(tx, folderId);
  if (principal.scopeProjectId !== null && projectId !== principal.scopeProjectId) throw folderPolicy.notFound();
  return projectId;
}

/**
 * Indexes the entry again from its stored file: back to `pending`, and queued. A running ingestion
 * loses its claim. The requester pays: the embeddings are charged to the key that asked (none for a
 * signed-in user), whoever uploaded the document. 402 when they cannot be paid at all (checkEmbeddingPayable).
 */
export async function reindex(ctx: ServiceContext, id: string): Promise<KnowledgeEntry> {
  // The owner's credits pay (a superuser may reindex another user's entry); 404 before 402.
  await checkEmbeddingPayable(ctx, async () => (await entryCrud.getVisible(ctx.db, ctx.principal, id, 'write')).owner_id);
  const entry = await entryCrud.update(ctx.db, ctx.principal, id, {
    api_key_id: ctx.principal.apiKeyId,
    status: 'pending',
    error: null,
    attempts: 0,
    lease_token: null,
    lease_expires_at: jobQueuedMark(ctx.settings.KB_INGEST_LEASE_MS),
  });
  await queueIngestion(ctx, entry.id);
  return entry;
}

// ==================== Reading ====================

export interface Download {
  entry: KnowledgeEntry;
  file: OpenedFile;
}

/** The stored file, streamed. */
export async function download(ctx: ServiceContext, id: string): Promise<Download> {
  const entry = await get(ctx, id);
  return { entry, file: await knowledgeStorage(ctx.settings).stream(entry.storage_key) };
}

/** The extracted text, streamed; 409 until ingestion has finished. */
export async function content(ctx: ServiceContext, id: string): Promise<Download> {
  const entry = await get(ctx, id);
  if (entry.status === 'failed') throw new ConflictError(`Entry has no extracted text: ingestion failed (${entry.error ?? 'unknown error'})`);
  if (entry.status !== 'ready') throw new ConflictError(`Entry has no extracted text yet: it is ${entry.status}; try again when it is ready`);
  return { entry, file: await knowledgeStorage(ctx.settings).stream(textKeyOf(entry.storage_key)) };
}

/**
 * The caller's folders, entries, bytes and index (a scoped key: its project's), and what the
 * account's entries count for against its quota (`quota_bytes_used`, each the larger of its file
 * and its text, at least MIN_CHARGED_BYTES: crud/knowledge.ts chargedBytes; the figure an upload's
 * 413 and an ingestion's quota check compare with KB_MAX_BYTES_PER_USER, the account's for a scoped
 * key too, as its 413 says).
 */
export async function stats(ctx: ServiceContext) {
  const { principal, settings } = ctx;
  const found = await counts(
    ctx.db,
    ownRows(principal, knowledgeFolders.owner_id, knowledgeFolders.project_id),
    ownRows(principal, knowledgeEntries.owner_id, knowledgeEntries.project_id),
  );
  const entryCount = Object.values(found.entries_by_status).reduce((a, b) => a + b, 0);
  return {
    ...found,
    entry_count: entryCount,
    quota_bytes_used: await usedBytes(ctx.db, principal.user.id),
    max_bytes_per_user: settings.KB_MAX_BYTES_PER_USER,
    max_file_bytes: settings.KB_MAX_FILE_BYTES,
    vector_search: Boolean(settings.EMBEDDING_MODEL) && (await hasVectorTable(ctx.db)),
  };
}
