/**
 * Ingestion of one entry (job `ingest-entry`): claim it, extract its text, split it into chunks,
 * index them for full text, embed them where an embedding model and pgvector are there, and mark
 * it `ready` — or `failed` with an error the user can act on. A claim is a lease the job renews as
 * it goes; the sweeper re-queues entries left `pending` or whose lease ran out (a worker that died),
 * so no entry stays `processing` forever.
 */
import { randomUUID } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';

import { and, eq, gte, inArray, lt, or, type SQL, sql, type SQLWrapper } from 'drizzle-orm';

import type { Settings } from '../../core/config.js';
import { type Db, deadlockRetried, isTransientConflict } from '../../core/db.js';
import { type CredentialsGone, CredentialsGoneError, HttpError, InsufficientStorageError, isOutOfSpace, PaymentRequiredError } from '../../core/errors.js';
import type { Logger } from '../../core/logger.js';
import type { JobQueue } from '../../core/queue.js';

import { knowledgeChunks, knowledgeEntries, type KnowledgeEntry } from '../../models/index.js';

import { chargedBytes, clearJobQueuedMarks, deleteChunks, jobQueuedMark, lockEntryOwnerKeyShare, unfinishedWithoutJob, usedBytes } from '../../crud/knowledge.js';
import { lockUser, lockUserKeyShare } from '../../crud/user.js';
import type { ModelManager } from '../../modules/ai-models/index.js';
import { chargedChunkBytes, type ChunkCutter, MIN_CHUNK_CHARGE_BYTES } from '../../modules/knowledge/chunk.js';
import { extractDocument, extractLimitsFrom } from '../../modules/knowledge/extract.js';
import { type DocumentChunk, DocumentRejectedError, type DocumentSection, type ExtractedDocument } from '../../modules/knowledge/types.js';
import { bytesWithMiB, pairSafeEnd } from '../../utils/text.js';
import { StorageNotFoundError, type StorageService } from '../storage-service.js';
import { ensureVectorIndex, hasVectorTable, writeEmbeddings } from './embeddings.js';
import { abandonStaleWrites, knowledgeStorage, purgeDeletedFiles, textKeyOf } from './files.js';
import { refreshSearchStatistics } from './search.js';

export interface IngestionDeps {
  db: Db;
  settings: Settings;
  log: Logger;
  models: ModelManager;
}

/** The job's claim was taken over (a reindex, the sweeper after a stall) or its entry deleted: its work is dropped. */
class ClaimLostError extends Error {}

/**
 * The entry's text would take its owner past KB_MAX_BYTES_PER_USER (ChunkWriter.reserve). The
 * entry fails at once, keeping none of its text: trying again stores the same text, which fits
 * only once the owner has made room (a reindex then). The message names the per-passage minimum:
 * a document of many tiny sections counts for far more than its file, and its owner would
 * otherwise read a count they cannot find in their text.
 */
export class TextOverQuotaError extends Error {
  constructor(figures: { countedBytes: number; fileBytes: number; quota: number; usedByOthers: number }) {
    const { countedBytes, fileBytes, quota, usedByOthers } = figures;
    const left = Math.max(0, quota - usedByOthers);
    super(
      `Storage quota exceeded by the extracted text: the document's text counts for at least ${bytesWithMiB(countedBytes)} ` +
        `(each passage counts for at least ${MIN_CHUNK_CHARGE_BYTES} bytes, so many short sections count for more than their text; its file ${bytesWithMiB(fileBytes)}; ` +
        `an entry counts for the larger) but only ${bytesWithMiB(left)} of your ${bytesWithMiB(quota)} are left for it (${bytesWithMiB(usedByOthers)} used by your other entries); ` +
        'delete entries to make room and reindex this one, or upload a shorter document or one of fewer, longer sections',
    );
  }
}

// ==================== Claims ====================

/**
 * Takes the entry for this job: from `pending`, or from `processing` whose lease ran out. One
 * conditional update, so two jobs for one entry never both hold it. Null: nothing to do.
 *
 * What the claim does with the chunks already stored, in the same transaction:
 * - The first claim of an indexing (an upload's, a reindex's: `attempts` back at 0) of an entry
 *   that was `ready` (`chunk_count` > 0: its chunks are a finished indexing's) clears them: they
 *   may be older code's, whose vectors could be a fallback model's stored under EMBEDDING_MODEL's
 *   id (before `sameModel`), and a reindex of a ready entry is asked for to embed it anew. Except
 *   when the entry records another KB_SEARCH_LANGUAGE than this one (`search_language`, see
 *   `languageChanged`): that reindex is the one README asks for after changing the language,
 *   which changes none of the embeddings, so the job resumes from them and redoes only the
 *   full-text vectors (see `ChunkWriter`) rather than embedding, and charging, the whole document
 *   again.
 * - Otherwise the chunks there are this code's, of an indexing that did not finish: an earlier
 *   attempt of this one (a retry after a passing fault, or after a worker died), or a failed
 *   indexing (`fail` keeps what was embedded and paid for, and sets `chunk_count` to 0; before it
 *   did, failing deleted them, so no failed entry holds older code's chunks). The job resumes from
 *   them (`resuming`): it stores only the chunks that are missing or differ, so the embeddings
 *   already paid for are not asked for, and paid, again.
 *
 * And the entry counts again for the text its chunks hold (`text_bytes_stored`), not for what an
 * earlier job reserved ahead: a worker killed between a batch's reservation and its write (or whose
 * claim was taken by a reindex meanwhile) left `text_bytes` up to a batch over the chunks stored,
 * counted against the owner's quota. The claim takes the entry from any job that held it, so no
 * reservation is left to keep; this job reserves anew what it stores past them.
 */
async function claim(db: Db, settings: Settings, entryId: string): Promise<Claim | null> {
  // Each of the job's writes is run again if PostgreSQL aborts it for a deadlock or serialization
  // failure (deadlockRetried): an owner's rows meet many writers (a move, a folder's deletion, an
  // upload's quota check, a reindex), and a passing conflict is no reason to fail the entry.
  return deadlockRetried(db, async (tx) => {
    // The owner's row first, as a batch's write (ChunkWriter.writeBatch): a second update of the
    // entry's row in one transaction checks its foreign keys again (its row version is this
    // transaction's), taking KEY SHARE on the users row while holding the entry's, which a
    // deletion of the owner (users row, then the entry's through the cascade) waited for in turn.
    await lockEntryOwnerKeyShare(tx, entryId);
    const [entry] = await tx
      .update(knowledgeEntries)
      .set({
        status: 'processing',
        lease_token: randomUUID(),
        lease_expires_at: sql`now() + ${settings.KB_INGEST_LEASE_MS} * interval '1 millisecond'`,
        processing_started_at: sql`now()`,
        attempts: sql`${knowledgeEntries.attempts} + 1`,
        error: null,
        text_bytes: sql`${knowledgeEntries.text_bytes_stored}`,
      })
      .where(
        and(
          eq(knowledgeEntries.id, entryId),
          or(eq(knowledgeEntries.status, 'pending'), and(eq(knowledgeEntries.status, 'processing'), lt(knowledgeEntries.lease_expires_at, sql`now()`))),
        ),
      )
      .returning();
    if (!entry) return null;
    if (entry.attempts === 1 && entry.chunk_count > 0) {
      const keep = languageChanged(entry, settings);
      // Until this indexing ends ready, the chunks are this code's, each in this language or the
      // one before: a reindex asked for meanwhile (under this language, or set back to the other)
      // resumes from them, rather than clearing and embedding again what was paid for.
      await tx.update(knowledgeEntries).set({ search_language: INDEXING_UNDER_WAY }).where(eq(knowledgeEntries.id, entry.id));
      if (!keep) {
        await deleteChunks(tx, entry.id);
        // Nothing of the text is stored any more: the entry counts for its file until this indexing's text is reserved.
        await tx.update(knowledgeEntries).set({ text_bytes: 0, text_bytes_stored: 0 }).where(eq(knowledgeEntries.id, entry.id));
        return { entry: { ...entry, text_bytes: 0, text_bytes_stored: 0 }, resuming: false };
      }
    }
    // Nothing stored: nothing to compare (no read per batch).
    const [stored] = await tx.select({ id: knowledgeChunks.id }).from(knowledgeChunks).where(eq(knowledgeChunks.entry_id, entry.id)).limit(1);
    return { entry, resuming: stored !== undefined };
  });
}

/**
 * Whether a `tsv` column holds what `language` makes of the row's text: the one test of a chunk's
 * full-text language (a tsvector does not record the configuration that made it).
 */
const fullTextIn = (language: string): SQL<boolean> => sql<boolean>`${knowledgeChunks.tsv} = ${fullTextOf(language, knowledgeChunks.text)}`;

/** The full-text vector `language` makes of `text` (a value, or the row's own column): how every chunk's `tsv` is written. */
const fullTextOf = (language: string, text: string | SQLWrapper): SQL => sql`to_tsvector(${language}::regconfig, ${text})`;

/**
 * `search_language` from a reindex's first claim until it ends ready (see `claim`): the chunks are
 * this code's, their full-text vectors of either language. No language is named so: every
 * KB_SEARCH_LANGUAGE reads it as a change, and the next reindex resumes from the chunks.
 */
const INDEXING_UNDER_WAY = '';

/**
 * Whether the entry's chunks were indexed under another KB_SEARCH_LANGUAGE than this one (or are
 * an unfinished reindex's, INDEXING_UNDER_WAY), and only that calls for its reindex (see `claim`).
 * The entry says so, not its chunks: `search_language` is written when an indexing ends `ready`
 * (`finishEntry`), with every chunk in that language, and set to INDEXING_UNDER_WAY by a reindex's
 * first claim — so a reindex asked for while another was cut short (a batch's full-text vectors
 * redone, then the job lost, failed, or reindexed again) resumes from the chunks too, whichever
 * language it runs under. The chunks cannot say it:
 * a tsvector does not record its configuration, and a chunk of numbers or names (a table, a CSV)
 * reads alike in every language. Null (indexed by older code, whose vectors may be a fallback
 * model's under EMBEDDING_MODEL's id) is no change: those chunks are cleared and embedded anew.
 */
function languageChanged(entry: KnowledgeEntry, settings: Settings): boolean {
  return entry.search_language !== null && entry.search_language !== settings.KB_SEARCH_LANGUAGE;
}

/** A claimed entry, and whether its job resumes from chunks stored before it (see `claim`). */
interface Claim {
  entry: KnowledgeEntry;
  resuming: boolean;
}

const held = (entry: KnowledgeEntry) => and(eq(knowledgeEntries.id, entry.id), eq(knowledgeEntries.lease_token, entry.lease_token!));

/** Extends the claim (writing `also` with it); ClaimLostError when it is no longer this job's. */
async function renew(db: Db, settings: Settings, entry: KnowledgeEntry, also: Partial<Pick<KnowledgeEntry, 'text_bytes' | 'text_bytes_stored'>> = {}): Promise<void> {
  const [row] = await db
    .update(knowledgeEntries)
    .set({ ...also, lease_expires_at: sql`now() + ${settings.KB_INGEST_LEASE_MS} * interval '1 millisecond'` })
    .where(held(entry))
    .returning({ id: knowledgeEntries.id });
  if (!row) throw new ClaimLostError();
}

/**
 * Ends the claim as `failed` with `error`. The chunks stored so far stay (`keepChunks`) — their
 * embeddings are paid for, and the entry's next indexing resumes from them (`claim`) — but search
 * shows none of them (`chunks_hidden`) until an indexing of the entry ends `ready`: not while it
 * is failed, nor while its reindex is pending or processing, when they are still unchecked. And
 * `chunk_count` is 0 (nothing is indexed); the kept chunks still count against the quota, for what
 * they hold (`text_bytes_stored`, which each batch's write records), not for the batch reserved
 * whole that the job stopped in. A document that cannot be read as it is (rejected, its file gone)
 * or whose text is over the quota keeps none: no indexing of it resumes, and it counts for its file alone.
 */
async function fail(db: Db, entry: KnowledgeEntry, error: string, keepChunks = true): Promise<void> {
  await deadlockRetried(db, async (tx) => {
    const [row] = await tx
      .update(knowledgeEntries)
      .set({
        status: 'failed',
        error,
        chunk_count: 0,
        token_count: 0,
        chunks_hidden: true,
        ...(keepChunks ? { text_bytes: sql`${knowledgeEntries.text_bytes_stored}` } : { text_bytes: 0, text_bytes_stored: 0 }),
        lease_token: null,
        lease_expires_at: null,
        processed_at: sql`now()`,
      })
      .where(held(entry))
      .returning({ id: knowledgeEntries.id });
    if (row && !keepChunks) await deleteChunks(tx, entry.id);
  });
}

/**
 * Hands the entry back (`pending`) for the queue's next try, which the job's throw schedules: with
 * the job-queued mark (`jobQueuedMark`), as its upload or a sweep leaves it, so that no sweep
 * queues a second job while the retry waits its backoff (2 s, doubling, by default: well within
 * the mark) and its turn. Should the queue have no try left, the sweep takes the entry up once the
 * mark has passed.
 */
async function release(db: Db, settings: Settings, entry: KnowledgeEntry): Promise<void> {
  await deadlockRetried(db, (tx) =>
    tx
      .update(knowledgeEntries)
      .set({
        status: 'pending',
        // What the chunks kept for the retry hold (see `fail`).
        text_bytes: sql`${knowledgeEntries.text_bytes_stored}`,
        lease_token: null,
        lease_expires_at: jobQueuedMark(settings.KB_INGEST_LEASE_MS),
      })
      .where(held(entry)),
  );
}

// ==================== Steps ====================

/**
 * Runs `work` on a local copy of the stored file (the extractors read paths): a temporary file,
 * removed afterwards, whatever the backend.
 */
async function withLocalCopy<T>(storage: StorageService, key: string, work: (path: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'keel-ingest-'));
  try {
    const path = join(dir, 'document');
    const opened = await storage.stream(key);
    await pipeline(opened.body, createWriteStream(path, { mode: 0o600 }));
    return await work(path);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * One batch's embeddings (at most KB_EMBED_BATCH chunks: one call), metered to the entry's owner
 * and to the API key that asked for this indexing (its max_budget held and charged; a 402 fails
 * the entry).
 */
async function embed(deps: IngestionDeps, entry: KnowledgeEntry, model: string, chunks: DocumentChunk[]): Promise<Float32Array[]> {
  // Not the key's rpm: the client made one request, and a large document's dozens of batches
  // counted as model calls per minute would fail it for a pace the client cannot set. The budget
  // bounds what ingestion spends; see docs/decisions.md.
  const context = { user_id: entry.owner_id, api_key_id: entry.api_key_id, project_id: entry.project_id, rpm_exempt: true };
  // The claim is renewed while the call runs: with its retries and their waits it may outlast
  // KB_INGEST_LEASE_MS (by default up to 3 x 120 s + 2 x 20 s, against a 300 s lease), and the
  // sweeper would hand the entry to another job that pays for the same batch again. A claim lost
  // meanwhile is found by the batch's write (renew in writeBatch). The call itself is bounded by
  // the model manager's timeouts, so a job cannot hold its claim for ever this way.
  const keepAlive = setInterval(() => {
    renew(deps.db, deps.settings, entry).catch(() => undefined);
  }, Math.max(250, Math.floor(deps.settings.KB_INGEST_LEASE_MS / 3)));
  keepAlive.unref();
  try {
    const result = await deps.models.embed({
      model,
      values: chunks.map((chunk) => chunk.text),
      context,
      // Stored under this model's id and searched with its queries' vectors: no fallback's.
      sameModel: true,
    });
    return result.embeddings;
  } finally {
    clearInterval(keepAlive);
  }
}

/**
 * Chunks per write (one short transaction): small enough that the embedded database, which runs
 * one statement at a time for every request, is never held for long, and that indexing follows the
 * reading closely; large enough that a transaction's fixed cost does not count (at 100 per write,
 * PGlite's share of a 20 MB Markdown file's ingestion grew by ~0.6 s in a profile).
 */
const CHUNK_ROWS_PER_WRITE = 250;

/** Cutting chunks (token counting) runs this long at most before the event loop gets a turn. */
const CUT_SLICE_MS = 20;

/**
 * Indexes a document while it is read: sections come in (in document order) as the extraction
 * hands them over, are cut into chunks here, embedded where a model is set, and stored batch by
 * batch — each batch in a short transaction that first renews the job's claim, so a job that lost
 * it (a reindex, a deletion, the sweeper after a stall) stores nothing more. With a model, each
 * embedding call's chunks are stored as soon as it answers, so what was paid for is kept even if a
 * later call fails. Search finds a batch once it is stored (a failed entry's reindex: once the entry
 * is `ready`, see `fail`). A failure stops the extraction (`signal`).
 *
 * Resuming (a retry of the same indexing, a failed entry's reindex, a ready entry's after a change
 * of language: see `claim`), a chunk already stored as this run cuts it — same place, text,
 * headings, token count and full-text vector, and an embedding by `model` where there is one — is
 * kept as it is. One that differs only by its full-text vector (made under another language) is
 * kept with its embedding, and its vector is made anew in place (`refreshFullText`): embedding it
 * again would pay for the vector it has. The others are embedded and stored (replacing what was
 * there), and chunks past the document's end go at the finish. Chunking is deterministic, so a
 * retry with the same settings embeds exactly what the failed attempt did not store. A stored
 * chunk whose text differs from this run's in its place was cut otherwise (a chunking setting
 * changed between attempts, another extraction): each chunk's bounds follow from the one before
 * it, so every stored chunk from that place on is another cutting's, overlapping what this run
 * stores. They all go in the transaction that stores the batch's first chunk (`dropFrom`), before
 * any chunk of this run is there, and the rest of the document is stored as on a first attempt:
 * search never shows old and new chunks of the same text side by side.
 *
 * The text counts against the owner's quota (`text_bytes`; crud/knowledge.ts, chargedBytes), each
 * chunk for its own text and at least MIN_CHUNK_CHARGE_BYTES (`chargedChunkBytes`: what its row
 * costs, so that a document of tiny sections cannot store a row per few bytes of quota): each
 * batch is reserved before it is embedded or stored (`reserve`), so a document that counts for
 * more than the owner has left stops there (TextOverQuotaError), its reading with it, having
 * stored and paid for no more than fits. Each batch's write records, in its transaction, what the
 * entry's chunks count for then (`text_bytes_stored`, see `keptCountedBytes`): a failure that keeps them,
 * and the next claim after a worker died, count that rather than what was reserved, as the batch
 * the job stopped in, reserved whole, may be partly stored or not at all.
 */
class ChunkWriter {
  private readonly queue: DocumentSection[] = [];
  private head = 0;
  private pending: DocumentChunk[] = [];
  private busy = false;
  private working: Promise<void> = Promise.resolve();
  private failure: { error: unknown } | null = null;
  private indexed = false;
  private readonly controller = new AbortController();
  readonly signal = this.controller.signal;
  chunkCount = 0;
  tokenCount = 0;
  /** What the chunks written so far (stored, or found stored as they are) count for against the quota (`chargedChunkBytes` each): the entry's `text_bytes` once ready. */
  countedBytes = 0;
  /** What the entry counts for against the quota as far as the database knows: more text than this is reserved first. */
  private charged: number;
  /** What the chunks stored by an earlier attempt hold, which this job resumes from (`text_bytes_stored` at the claim; see `keptCountedBytes`). */
  private readonly countedBefore: number;
  /** What this job's chunks that are in the database as it cut them (stored by it, or found stored with the same text) count for (`chargedChunkBytes`). */
  private storedCountedBytes = 0;
  /** Whether an earlier attempt's chunks past a place were deleted (`dropFrom`): from there on only this job's are kept. */
  private dropped = false;
  /** Places in the batch being written whose chunk's text is stored already (counted in `storedCountedBytes` by `compare`). */
  private readonly storedText = new Set<number>();

  constructor(
    private readonly deps: IngestionDeps,
    private readonly entry: KnowledgeEntry,
    private readonly cutter: ChunkCutter,
    private readonly model: string | null,
    private resuming: boolean,
  ) {
    this.charged = chargedBytes(entry.size_bytes, entry.text_bytes);
    this.countedBefore = resuming ? entry.text_bytes_stored : 0;
  }

  /**
   * What the entry's chunks count for (`chargedChunkBytes`) once a write has stored `added`
   * more of this job's (and, `dropping`, deleted an earlier attempt's from a place on): what each
   * batch's write records (`text_bytes_stored`). This job's stored so far, and an earlier attempt's
   * it has not reached. Those count for what that attempt recorded (`countedBefore`): chunking is
   * deterministic, so the stored chunks this job has compared hold the same text as its own (the
   * first that differ goes with all after it, `dropped`), and an earlier attempt's chunks are a
   * prefix of the document as these are.
   */
  private keptCountedBytes(added = 0, dropping = false): number {
    const stored = this.storedCountedBytes + added;
    return this.dropped || dropping ? stored : Math.max(this.countedBefore, stored);
  }

  /** The place from which stored chunks are another cutting's, to delete with the next batch stored (see the class). */
  private dropFrom: number | null = null;

  add(sections: DocumentSection[]): void {
    if (this.failure) return;
    for (const section of sections) this.queue.push(section); // (a spread overflows the stack past ~100k sections)
    if (this.busy) return;
    this.busy = true;
    this.working = this.work();
  }

  /** Stores what is left once every section has been added; throws what stopped the writing. */
  async finish(): Promise<void> {
    await this.working;
    if (!this.failure && this.pending.length > 0) await this.write().catch((error: unknown) => this.fail(error));
    if (this.failure) throw this.failure.error;
  }

  /** Stops at the next batch (the job failed elsewhere). */
  stop(reason: unknown): void {
    this.fail(reason);
  }

  private async work(): Promise<void> {
    try {
      let sliceEnd = performance.now() + CUT_SLICE_MS;
      while (this.head < this.queue.length && !this.failure) {
        const section = this.queue[this.head++]!;
        for (const chunk of this.cutter.cut([section])) {
          this.pending.push(chunk);
          if (this.pending.length >= CHUNK_ROWS_PER_WRITE) {
            await this.write();
            sliceEnd = performance.now() + CUT_SLICE_MS;
          } else if (performance.now() >= sliceEnd) {
            await new Promise((resolve) => setImmediate(resolve));
            sliceEnd = performance.now() + CUT_SLICE_MS;
          }
          if (this.failure) return;
        }
      }
      this.queue.length = 0;
      this.head = 0;
    } catch (error) {
      this.fail(error);
    } finally {
      this.busy = false;
    }
  }

  private fail(error: unknown): void {
    if (this.failure) return;
    this.failure = { error };
    this.controller.abort(error);
  }

  private async write(): Promise<void> {
    const { deps, entry, model } = this;
    const batch = this.pending;
    this.pending = [];
    let countedBytes = this.countedBytes;
    for (const chunk of batch) countedBytes += chargedChunkBytes(chunk);
    // Before anything of the batch is embedded (paid for) or stored.
    if (countedBytes > this.charged) await this.reserve(countedBytes);
    const { missing, otherLanguage } = this.resuming ? await this.compare(batch) : { missing: batch, otherLanguage: [] };
    // Past another cutting's chunks (all dropped with this batch), nothing stored is left to compare with.
    const lastCompared = this.dropFrom !== null;
    if (otherLanguage.length) await this.refreshFullText(otherLanguage);
    if (!missing.length) {
      // The chunks found stored may tell more than the earlier attempt recorded (one indexed before text was counted).
      if (!otherLanguage.length) await renew(deps.db, deps.settings, entry, { text_bytes_stored: this.keptCountedBytes() });
    } else if (!model) {
      await this.store(missing, null);
    } else {
      const size = deps.settings.KB_EMBED_BATCH;
      for (let start = 0; start < missing.length; start += size) {
        const part = missing.slice(start, start + size);
        await this.store(part, await embed(deps, entry, model, part));
      }
    }
    if (lastCompared) this.resuming = false;
    this.chunkCount += batch.length;
    this.tokenCount += batch.reduce((sum, chunk) => sum + chunk.tokenCount, 0);
    this.countedBytes = countedBytes;
  }

  /**
   * Records that the entry's text counts for `countedBytes` (more than it counted for), where the owner's
   * quota allows it: under the owner's lock, which an upload's check takes too, so that neither two
   * indexings nor an indexing and an upload of one user pass the quota together, each reading the
   * other's count from before. Taken before the entry's row (which the claim's renewal writes), in
   * the order an upload and a user's deletion take them. TextOverQuotaError, recording nothing,
   * when the owner's entries would then count for more than KB_MAX_BYTES_PER_USER.
   */
  private async reserve(countedBytes: number): Promise<void> {
    const { deps, entry } = this;
    const quota = deps.settings.KB_MAX_BYTES_PER_USER;
    // Run again whole after a deadlock: it writes the total (`countedBytes`), not an increment, so a
    // second run counts nothing twice; `charged` moves only once it has committed.
    await deadlockRetried(deps.db, async (tx) => {
      await lockUser(tx, entry.owner_id);
      await renew(tx, deps.settings, entry, { text_bytes: countedBytes });
      const used = await usedBytes(tx, entry.owner_id);
      if (used > quota) {
        const usedByOthers = used - chargedBytes(entry.size_bytes, countedBytes);
        throw new TextOverQuotaError({ countedBytes, fileBytes: entry.size_bytes, quota, usedByOthers });
      }
    });
    this.charged = chargedBytes(entry.size_bytes, countedBytes);
  }

  /**
   * Of `batch`, the chunks an earlier attempt did not store as they are now (`missing`), and those it
   * stored as they are now but for the full-text vector's language (`otherLanguage`; see the class).
   */
  private async compare(batch: DocumentChunk[]): Promise<{ missing: DocumentChunk[]; otherLanguage: DocumentChunk[] }> {
    const { deps, entry, model } = this;
    const stored = await storedChunks(deps.db, entry.id, batch[0]!.index, batch.at(-1)!.index, deps.settings.KB_SEARCH_LANGUAGE, model);
    const byIndex = new Map(stored.map((row) => [row.chunk_index, row]));
    const otherCut = batch.find((chunk) => {
      const row = byIndex.get(chunk.index);
      return row !== undefined && row.text !== chunk.text;
    });
    // From there on nothing stored is kept (see the class).
    if (otherCut) this.dropFrom = otherCut.index;
    const missing: DocumentChunk[] = [];
    const otherLanguage: DocumentChunk[] = [];
    this.storedText.clear();
    for (const chunk of batch) {
      const row = otherCut && chunk.index >= otherCut.index ? undefined : byIndex.get(chunk.index);
      // Its text is kept whatever is redone of the row (headings, embedding, full-text vector).
      if (row !== undefined && row.text === chunk.text) {
        this.storedText.add(chunk.index);
        this.storedCountedBytes += chargedChunkBytes(chunk);
      }
      const sameApartFromFullText =
        row !== undefined &&
        row.text === chunk.text &&
        row.token_count === chunk.tokenCount &&
        row.heading_path.length === chunk.headingPath.length &&
        row.heading_path.every((heading, i) => heading === chunk.headingPath[i]) &&
        (model === null || row.embedded);
      if (!sameApartFromFullText) missing.push(chunk);
      else if (!row.tsv_current) otherLanguage.push(chunk);
    }
    return { missing, otherLanguage };
  }

  /**
   * Writes the full-text vector KB_SEARCH_LANGUAGE makes of these stored chunks' text (the same as
   * this run's: `compare`), in their rows: their embeddings stay, and nothing is embedded.
   */
  private async refreshFullText(chunks: DocumentChunk[]): Promise<void> {
    const { deps, entry } = this;
    await this.writeBatch(this.keptCountedBytes(), async (tx) => {
      await tx
        .update(knowledgeChunks)
        .set({ tsv: fullTextOf(deps.settings.KB_SEARCH_LANGUAGE, knowledgeChunks.text) })
        .where(and(eq(knowledgeChunks.entry_id, entry.id), inArray(knowledgeChunks.chunk_index, chunks.map((chunk) => chunk.index))));
    });
  }

  /**
   * Runs one batch's write in a short transaction that first renews the claim, recording what the
   * entry's chunks hold once it commits (`storedCountedBytes`: see `keptCountedBytes`). The owner's row
   * first (KEY SHARE, which the chunks' inserts take anyway for their foreign key, at their end):
   * a deletion of the owner locks that row, then the entry's through its cascade; taken after the
   * entry's (renew), the two waited for each other on PostgreSQL until one was aborted (40P01),
   * the batch's ending the entry failed with an internal error. In the deletion's order, the batch
   * waits for it to commit, and then finds its claim gone (ClaimLostError).
   */
  private async writeBatch(storedCountedBytes: number, work: (tx: Db) => Promise<void>): Promise<void> {
    const { deps, entry } = this;
    // Run again whole after a deadlock (see claim): `work` changes nothing of the writer, whose counts
    // (chunkCount, countedBytes, storedCountedBytes) move once the write has committed.
    await deadlockRetried(deps.db, async (tx) => {
      // Committed without waiting for the WAL flush (this transaction only): a batch lost in a
      // crash is missing when the job runs again, which stores it then (commits are lost only
      // from the last one backwards, each whole); the end (`ready`) is durable. (A 20 MB Markdown
      // file on PGlite: 20.7 s with a flush per batch, 19.4 s without.)
      await tx.execute(sql`select set_config('synchronous_commit', 'off', true)`);
      await lockUserKeyShare(tx, entry.owner_id);
      await renew(tx, deps.settings, entry, { text_bytes_stored: storedCountedBytes });
      await work(tx);
    });
  }

  /** Stores `chunks` (with their `vectors`, in the same order), replacing what an earlier attempt stored in their places. */
  private async store(chunks: DocumentChunk[], vectors: Float32Array[] | null): Promise<void> {
    const { deps, entry, model } = this;
    if (vectors?.[0] && !this.indexed) {
      await ensureVectorIndex(deps.db, vectors[0].length);
      this.indexed = true;
    }
    const language = deps.settings.KB_SEARCH_LANGUAGE;
    // Read once, cleared once committed: a write run again after a deadlock deletes them again.
    const dropFrom = this.dropFrom;
    // Chunks whose text was stored already (compare) are counted; a place whose text differs is past dropFrom.
    const added = chunks.reduce((sum, chunk) => (this.storedText.has(chunk.index) ? sum : sum + chargedChunkBytes(chunk)), 0);
    await this.writeBatch(this.keptCountedBytes(added, dropFrom !== null), async (tx) => {
      // An earlier attempt's chunks from a place on where they were cut otherwise go, with their embeddings (see the class).
      if (dropFrom !== null) await tx.delete(knowledgeChunks).where(and(eq(knowledgeChunks.entry_id, entry.id), gte(knowledgeChunks.chunk_index, dropFrom)));
      // An earlier attempt's chunk in the same place (other headings or token count, or no embedding by the model) goes, with its embedding.
      if (this.resuming) {
        await tx.delete(knowledgeChunks).where(and(eq(knowledgeChunks.entry_id, entry.id), inArray(knowledgeChunks.chunk_index, chunks.map((chunk) => chunk.index))));
      }
      const inserted = await tx
        .insert(knowledgeChunks)
        .values(
          chunks.map((chunk) => ({
            entry_id: entry.id,
            owner_id: entry.owner_id,
            chunk_index: chunk.index,
            text: chunk.text,
            heading_path: chunk.headingPath,
            token_count: chunk.tokenCount,
            tsv: fullTextOf(language, chunk.text) as unknown as string,
          })),
        )
        .returning({ id: knowledgeChunks.id });
      if (vectors) await writeEmbeddings(tx, model!, inserted.map((row) => row.id), vectors);
    });
    // Committed: what the kept chunks hold (see keptCountedBytes).
    if (dropFrom !== null) {
      this.dropFrom = null;
      this.dropped = true;
    }
    this.storedCountedBytes += added;
  }
}

/**
 * The entry's stored chunks from `first` to `last` (places), whether each one's full-text vector is
 * what `language` makes of its text, and (with `model`, which implies the embeddings table)
 * whether it has an embedding by `model`: one statement.
 */
async function storedChunks(db: Db, entryId: string, first: number, last: number, language: string, model: string | null) {
  const embedded = model
    ? // Named in full: a one-table select writes its columns bare, and a bare "id" here is the embedding's.
      sql<boolean>`exists (select 1 from knowledge_chunk_embeddings where knowledge_chunk_embeddings.chunk_id = knowledge_chunks.id and knowledge_chunk_embeddings.model = ${model})`
    : sql<boolean>`false`;
  return db
    .select({
      id: knowledgeChunks.id,
      chunk_index: knowledgeChunks.chunk_index,
      text: knowledgeChunks.text,
      heading_path: knowledgeChunks.heading_path,
      token_count: knowledgeChunks.token_count,
      tsv_current: fullTextIn(language),
      embedded,
    })
    .from(knowledgeChunks)
    .where(and(eq(knowledgeChunks.entry_id, entryId), sql`${knowledgeChunks.chunk_index} between ${first} and ${last}`));
}

/**
 * Marks the entry `ready` with what this job stored, in one transaction that first locks the entry
 * under the job's claim: an entry deleted or reindexed meanwhile gets nothing (ClaimLostError).
 * A resumed job's earlier attempt may have cut the document into more chunks (other settings
 * then): those past its end go. Every chunk left is this job's or checked by it, so search shows
 * them from here on, a failed indexing's kept chunks included (`chunks_hidden`, see `fail`), and
 * each one's full-text vector is KB_SEARCH_LANGUAGE's, which the entry records (`search_language`).
 */
async function finishEntry(db: Db, settings: Settings, entry: KnowledgeEntry, document: ExtractedDocument, written: ChunkWriter, resuming: boolean): Promise<void> {
  await deadlockRetried(db, async (tx) => {
    const [row] = await tx.select({ id: knowledgeEntries.id }).from(knowledgeEntries).where(held(entry)).for('update');
    if (!row) throw new ClaimLostError();
    if (resuming) await tx.delete(knowledgeChunks).where(and(eq(knowledgeChunks.entry_id, entry.id), gte(knowledgeChunks.chunk_index, written.chunkCount)));
    await tx
      .update(knowledgeEntries)
      .set({
        status: 'ready',
        format: document.format,
        error: null,
        chunks_hidden: false,
        // Every chunk left is in this language now (stored by this job, or compared by it and kept or its vector redone): see `languageChanged`.
        search_language: settings.KB_SEARCH_LANGUAGE,
        chunk_count: written.chunkCount,
        token_count: written.tokenCount,
        // Exact now (every chunk left is one written): no more than was reserved, so no check.
        text_bytes: written.countedBytes,
        text_bytes_stored: written.countedBytes,
        lease_token: null,
        lease_expires_at: null,
        processed_at: sql`now()`,
      })
      .where(eq(knowledgeEntries.id, entry.id));
  });
}

/** Characters of text per piece written to storage: the text is never whole a second time as UTF-8. */
const TEXT_PIECE_CHARS = 1 << 20;

/** `text` as UTF-8 in pieces, never cut inside a surrogate pair. */
async function* utf8Pieces(text: string): AsyncGenerator<Uint8Array> {
  for (let start = 0; start < text.length; ) {
    const end = pairSafeEnd(text, Math.min(text.length, start + TEXT_PIECE_CHARS));
    yield Buffer.from(text.slice(start, end));
    start = end;
  }
}

// ==================== The job ====================

/** Why an entry's embedding stopped, by what went away of its credentials (`CredentialsGoneError`). */
const INGESTION_CREDENTIALS_GONE: Record<CredentialsGone, string> = {
  api_key_deleted: 'the API key that asked for this indexing was deleted',
  api_key_revoked: 'the API key that asked for this indexing was revoked',
  user_deleted: "the owner's account was deleted",
  user_deactivated: "the owner's account was deactivated",
};

/** How a failure ends: the entry `failed` with this message now, or (a passing fault) another try. */
export function outcomeOf(thrown: unknown, entry: Pick<KnowledgeEntry, 'attempts'>, maxAttempts: number): { fail: string } | { retry: string } {
  // A full disk (the text's file, the chunks' rows) passes once space is freed: tried again, as a 5xx.
  const error = isOutOfSpace(thrown) ? new InsufficientStorageError() : thrown;
  if (error instanceof DocumentRejectedError) return { fail: `The document could not be read: ${error.message}` };
  if (error instanceof TextOverQuotaError) return { fail: error.message };
  if (error instanceof StorageNotFoundError) return { fail: 'The stored file is missing (deleted from storage, or the storage settings changed); upload the document again' };
  // The meter's 402 (the key's max_budget, the account's credits) ends the entry: trying again changes nothing until the limit does.
  if (error instanceof PaymentRequiredError) return { fail: `Embedding stopped: ${error.detail}; reindex the entry once the budget or balance allows it` };
  // A deleted key's indexing goes on paid by the account (docs/decisions.md): the next try finds no key, so its limits no longer apply.
  if (error instanceof CredentialsGoneError && error.reason === 'api_key_deleted') return { retry: `Embedding paused: ${INGESTION_CREDENTIALS_GONE[error.reason]}` };
  // The key or its owner went away midway (the generic 401 is the client's, who is not waiting here): the owner reads which.
  if (error instanceof CredentialsGoneError) return { fail: `Embedding stopped: ${INGESTION_CREDENTIALS_GONE[error.reason]}; reindex the entry to index it again` };
  if (error instanceof HttpError && error.statusCode < 500) return { fail: error.detail };
  if (error instanceof HttpError) {
    const reason = error.detail;
    return entry.attempts >= maxAttempts ? { fail: `${reason} (after ${entry.attempts} attempts); reindex the entry to try again` } : { retry: reason };
  }
  // A write that lost deadlockRetried's every run (a conflict kept meeting it): the queue's next try, later, resumes from what is stored.
  // On the last one the owner reads what happened (nothing is wrong with the document), not an internal error.
  if (isTransientConflict(error)) {
    const reason = 'a database write kept conflicting with another';
    return entry.attempts < maxAttempts ? { retry: reason } : { fail: `Ingestion stopped: ${reason} (after ${entry.attempts} attempts; the database was busy with other changes to the same rows); reindex the entry to try again` };
  }
  return { fail: 'Ingestion failed because of an internal error (it is in the server log); reindex the entry to try again' };
}

/** Ingests one entry; a no-op when it is gone, done, or another job holds it. Throws only to have the queue try again. */
export async function ingestEntry(deps: IngestionDeps, entryId: string): Promise<void> {
  const { db, settings, log } = deps;
  const claimed = await claim(db, settings, entryId);
  if (!claimed) return;
  const { entry, resuming } = claimed;
  const maxAttempts = settings.KB_INGEST_MAX_ATTEMPTS;
  if (entry.attempts > maxAttempts) {
    await fail(db, entry, `Ingestion did not finish in ${maxAttempts} attempts (the worker stopped or ran out of time); reindex the entry to try again`);
    return;
  }
  const storage = knowledgeStorage(settings);
  const started = performance.now();
  let writer: ChunkWriter | null = null;
  let textSaved: Promise<unknown> | undefined;
  try {
    // The chunker is loaded with the first document, not with the process: its tokenizer's tables
    // are large, and a worker that runs only agent runs or email never needs them.
    const { ChunkCutter, chunkOptionsFrom } = await import('../../modules/knowledge/chunk.js');
    const model = settings.EMBEDDING_MODEL && (await hasVectorTable(db)) ? settings.EMBEDDING_MODEL : null;
    const chunks = new ChunkWriter(deps, entry, new ChunkCutter(chunkOptionsFrom(settings)), model, resuming);
    writer = chunks;
    // A long PDF is indexed while it is read: its sections come out of the reader's thread as
    // they are whole and are stored here meanwhile, so reading and indexing take the time of the
    // longer of the two rather than both.
    const document = await withLocalCopy(storage, entry.storage_key, (path) =>
      extractDocument({ path, filename: entry.filename, declaredMime: entry.mime_type, signal: chunks.signal }, extractLimitsFrom(settings), (sections) => chunks.add(sections)),
    );
    chunks.add(document.sections);
    textSaved = storage.saveFile(utf8Pieces(document.text), `${entry.id}.txt`, 'text/plain; charset=utf-8', textPathOf(storage, entry.storage_key));
    await Promise.all([textSaved, chunks.finish()]);
    await finishEntry(db, settings, entry, document, chunks, resuming);
    await refreshSearchStatistics(db, chunks.chunkCount);
    log.info({ entryId, format: document.format, chunks: chunks.chunkCount, ms: Math.round(performance.now() - started) }, 'knowledge entry ingested');
  } catch (thrown) {
    // The writer's own failure stopped the extraction: its cause is the one to report.
    writer?.stop(thrown);
    const error = await writer?.finish().then(() => thrown, (cause: unknown) => cause) ?? thrown;
    const overQuota = error instanceof TextOverQuotaError;
    // The text's write may still be going (any failure ended the Promise.all above without waiting
    // for it): once it has landed, it goes if the entry was deleted meanwhile — a deletion before
    // it landed purged the files without it, and it would stay, a file no deletion record names.
    // Not waited for: a storage write that never ends must not hold the job (its queue slot).
    // Text over the quota: below, once the entry is failed.
    if (textSaved && !overQuota) {
      void textSaved
        .catch(() => undefined)
        .then(() => removeTextUnlessKept(db, storage, entry, false))
        .catch((cause: unknown) => log.warn({ err: cause, entryId }, 'the text of an entry deleted during its ingestion could not be removed'));
    }
    if (error instanceof ClaimLostError) {
      log.info({ entryId }, 'ingestion dropped: the entry was deleted or reindexed meanwhile');
      return;
    }
    const outcome = outcomeOf(error, entry, maxAttempts);
    if ('retry' in outcome) {
      log.warn({ err: error, entryId, attempt: entry.attempts }, 'ingestion failed; will try again');
      await release(db, settings, entry);
      throw error;
    }
    if (overQuota) log.info({ entryId, ownerId: entry.owner_id }, "knowledge entry failed: its text is over its owner's storage quota");
    else if (!(error instanceof DocumentRejectedError || error instanceof HttpError)) log.error({ err: error, entryId }, 'ingestion failed');
    await fail(db, entry, outcome.fail, !(error instanceof DocumentRejectedError || error instanceof StorageNotFoundError || overQuota));
    if (overQuota) {
      // None of its text is kept: neither the copy this job may be writing nor an earlier indexing's.
      void Promise.resolve(textSaved)
        .catch(() => undefined)
        .then(() => removeTextUnlessKept(db, storage, entry, true))
        .catch((cause: unknown) => log.warn({ err: cause, entryId }, 'the text of an entry over its quota could not be removed'));
    }
  }
}

/** The folder parts of a stored file's key (the extracted text goes beside it). */
function textPathOf(storage: StorageService, storageKey: string): string[] {
  return storageKey.slice(storage.prefix.length + 1).split('/').slice(0, -1);
}

/**
 * Deletes the entry's extracted text when no indexing keeps it: the entry deleted while its text
 * was being written (the deletion may have missed the text), or, with `ifFailed`, failed (its text
 * over the quota). A failed entry's text is read by nothing; one indexed again meanwhile (pending,
 * processing, ready) keeps it, as its own ingestion writes it anew.
 */
async function removeTextUnlessKept(db: Db, storage: StorageService, entry: KnowledgeEntry, ifFailed: boolean): Promise<void> {
  const [row] = await db.select({ status: knowledgeEntries.status }).from(knowledgeEntries).where(eq(knowledgeEntries.id, entry.id));
  if (!row || (ifFailed && row.status === 'failed')) await storage.deleteFile(textKeyOf(entry.storage_key)).catch(() => false);
}

// ==================== Sweeper ====================

/** Entries re-queued per sweep at most; the next sweep takes the rest. */
const SWEEP_BATCH = 1_000;

/** How a sweep picks (see unfinishedWithoutJob). */
export interface SweepPick {
  /** Spares entries queued a moment ago. */
  pendingAgeMs: number;
  /** How long an entry queued (by a sweep, an upload or a reindex) is not queued again: KB_INGEST_LEASE_MS. */
  markMs: number;
  /** An in-process queue's start-up sweep: its jobs died with the process, whatever the marks say. */
  ignoreMarks: boolean;
}

/**
 * Queues ingestion for entries left `pending` (their job lost: an in-process queue does not
 * survive a restart) and `processing` ones whose lease ran out (their worker died) — an entry at
 * most once a mark, whichever worker sweeps, as its job may only be waiting its turn in a backlog.
 * A duplicate job is harmless (only one can claim the entry), but they piled up: one per sweep.
 */
export async function sweepIngestion(db: Db, queue: JobQueue, pick: SweepPick): Promise<number> {
  const stale = (await unfinishedWithoutJob(db, { ...pick, limit: SWEEP_BATCH })).map((entry) => entry.id);
  for (const [i, id] of stale.entries()) {
    try {
      await queue.add('ingest-entry', { entry_id: id });
    } catch (error) {
      // The queue is down: those not queued lose their marks, so the next sweep tries them again.
      await clearJobQueuedMarks(db, stale.slice(i)).catch(() => undefined);
      throw error;
    }
  }
  return stale.length;
}

/**
 * Sweeps at once (a restart's leftovers) and then every KB_SWEEP_INTERVAL_MS, in a process that
 * runs jobs: re-queues unfinished ingestion, deletes the files of entries deleted without them
 * (cascades, a crash between commit and file deletion) and discards the unfinished writes of a
 * killed process (abandonStaleWrites). Returns the function that stops it.
 */
export function startIngestionSweeper(deps: { db: Db; settings: Settings; log: Logger }, queue: JobQueue): () => Promise<void> {
  const { db, settings, log } = deps;
  let running: Promise<unknown> = Promise.resolve();
  let busy = false;
  let abandonFailing = false;
  const markMs = settings.KB_INGEST_LEASE_MS;
  const sweep = (pendingAgeMs: number, ignoreMarks: boolean) => {
    // One sweep at a time: a slow one (a long listing of uploads, a database that answers late) is
    // not joined by the next, which would queue the same entries and abort the same uploads again.
    if (busy) return;
    busy = true;
    const swept = Promise.all([sweepIngestion(db, queue, { pendingAgeMs, markMs, ignoreMarks }), purgeDeletedFiles(deps)]).then(
      ([requeued, purged]) => {
        if (requeued) log.info({ count: requeued }, 'knowledge entries re-queued for ingestion');
        if (purged) log.info({ count: purged }, 'files of deleted knowledge entries removed');
      },
      (error: unknown) => log.warn({ err: error }, 'knowledge sweep failed; will try again'),
    );
    // Apart: a bucket that refuses to list uploads (some S3-compatible servers cannot) stops nothing else.
    const abandoned = abandonStaleWrites(settings).then(
      (count) => {
        if (abandonFailing) log.info('unfinished knowledge file writes can be swept again');
        abandonFailing = false;
        if (count) log.info({ count }, 'unfinished knowledge file writes discarded');
      },
      (error: unknown) => {
        // Warned once until a sweep works again: a bucket that can never list uploads (a server
        // without the call, credentials without s3:ListBucketMultipartUploads) warned every
        // KB_SWEEP_INTERVAL_MS for good, burying the warnings that need someone.
        if (abandonFailing) log.debug({ err: error }, 'unfinished knowledge file writes could not be swept again');
        else log.warn({ err: error }, 'unfinished knowledge file writes could not be swept; will try again (not warned again until a sweep works)');
        abandonFailing = true;
      },
    );
    running = Promise.all([swept, abandoned]).finally(() => {
      busy = false;
    });
  };
  // An in-process queue lost its jobs with the process; BullMQ's survive a restart (a rolling one would queue every entry again once per worker).
  sweep(0, queue.kind === 'in-process');
  const timer = setInterval(() => sweep(settings.KB_SWEEP_INTERVAL_MS, false), settings.KB_SWEEP_INTERVAL_MS);
  timer.unref();
  return async () => {
    clearInterval(timer);
    await running;
  };
}
