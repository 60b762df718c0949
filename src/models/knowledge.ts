import { sql } from 'drizzle-orm';
import { bigint, boolean, customType, index, integer, pgEnum, pgTable, text, timestamp, uniqueIndex, uuid, varchar } from 'drizzle-orm/pg-core';

import type { DocumentFormat } from '../modules/knowledge/types.js';
import { baseColumns } from './columns.js';
import { projects } from './project.js';
import { users } from './user.js';

/**
 * PostgreSQL's full-text document. Written by ingestion as `to_tsvector(<KB_SEARCH_LANGUAGE>, text)`
 * (a setting, so not a generated column: those need the language as a constant in the schema).
 */
const tsvector = customType<{ data: string }>({ dataType: () => 'tsvector' });

/** Folders hold entries; names are unique per owner (a clash gets ` (1)`, as file names do). */
export const knowledgeFolders = pgTable(
  'knowledge_folders',
  {
    ...baseColumns,
    owner_id: uuid('owner_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    project_id: uuid('project_id').references(() => projects.id, { onDelete: 'cascade' }),
    name: varchar('name', { length: 255 }).notNull(),
    description: text('description').notNull().default(''),
  },
  (t) => [
    uniqueIndex('ux_knowledge_folders_owner_id_name').on(t.owner_id, t.name),
    index('ix_knowledge_folders_owner_id_created_at').on(t.owner_id, t.created_at),
    index('ix_knowledge_folders_project_id_created_at').on(t.project_id, t.created_at),
  ],
);

export const knowledgeEntryStatus = pgEnum('knowledge_entry_status', ['pending', 'processing', 'ready', 'failed']);

/**
 * One uploaded document. `project_id` is its folder's (kept equal by the service) so that the
 * project-scoped key rule reads it without a join. The stored file's key is fixed at upload and
 * does not name the folder the entry is in now (a move changes no object: see docs/decisions.md).
 */
export const knowledgeEntries = pgTable(
  'knowledge_entries',
  {
    ...baseColumns,
    owner_id: uuid('owner_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    folder_id: uuid('folder_id')
      .notNull()
      .references(() => knowledgeFolders.id, { onDelete: 'cascade' }),
    project_id: uuid('project_id').references(() => projects.id, { onDelete: 'cascade' }),
    filename: varchar('filename', { length: 255 }).notNull(),
    /** The type sniffed from the bytes (the client's word only where the bytes say nothing). */
    mime_type: varchar('mime_type', { length: 255 }).notNull(),
    /** The format text is extracted as; known once sniffed (at upload or by ingestion). */
    format: varchar('format', { length: 32 }).$type<DocumentFormat>(),
    size_bytes: bigint('size_bytes', { mode: 'number' }).notNull(),
    sha256: varchar('sha256', { length: 64 }).notNull(),
    storage_key: text('storage_key').notNull(),
    status: knowledgeEntryStatus('status').notNull().default('pending'),
    /** Why ingestion failed, in words the user can act on. */
    error: text('error'),
    chunk_count: integer('chunk_count').notNull().default(0),
    token_count: integer('token_count').notNull().default(0),
    /**
     * What the text the entry holds in its chunks counts for, in bytes: each chunk's own text in
     * UTF-8, the overlap it repeats from the one before left out, and at least
     * MIN_CHUNK_CHARGE_BYTES (512) a chunk (modules/knowledge/chunk.ts, chargedChunkBytes). Without
     * the overlap, so that a plain-text file counts for its size and not ~15 % more (the overlap is
     * at most half a chunk, so what the rows store stays within twice the count); at least the
     * minimum, as a chunk costs a row, its index entries and an embedding whatever its text, and a
     * document of one-character sections made a row per 6 bytes of file. So the text's own bytes for ordinary documents, more
     * for one of many tiny sections. What KB_MAX_BYTES_PER_USER counts for the entry when more than its file
     * (crud/knowledge.ts, usedBytes): a compressed PDF or DOCX extracts to ~100× its size. Grown
     * batch by batch under the owner's lock while an indexing stores its chunks, before it stores
     * them (services/knowledge/ingestion.ts, ChunkWriter.reserve), so it is never less than what the
     * chunks stored count for; exact (`text_bytes_stored`) once the indexing ends (ready, failed, handed
     * back for a retry) or the entry is claimed again; 0 once an indexing drops them. 0 for
     * entries indexed before the column (migration 0023): they count for their file until reindexed;
     * entries indexed before the minimum (Dec 2026) keep their count without it until reindexed.
     */
    text_bytes: bigint('text_bytes', { mode: 'number' }).notNull().default(0),
    /**
     * What `text_bytes` counts of the chunks actually stored (the same measure, `chargedChunkBytes`),
     * without the reservation of a batch not stored yet: written in the transaction of each batch
     * an indexing stores. A worker killed between its reservation and its write leaves `text_bytes`
     * a batch over the chunks there; the next claim of the entry, and the sweep that hands it on,
     * set `text_bytes` back to this (services/knowledge/ingestion.ts, `claim`). Not recomputable
     * from the rows: they do not record how much of each chunk is the overlap left out of the count.
     */
    text_bytes_stored: bigint('text_bytes_stored', { mode: 'number' }).notNull().default(0),
    /**
     * The API key whose request asked for the current indexing (the upload, or the last reindex):
     * its embedding calls are charged to that key's max_budget. Null for a signed-in user. No
     * foreign key, as in usage_records: a deleted key's id stays and limits nothing.
     */
    api_key_id: uuid('api_key_id'),
    /**
     * Whether search leaves the entry's chunks out: set when an indexing fails (its chunks stay,
     * embedded and paid for, for the next indexing to resume from) and kept through the reindex,
     * cleared only when an indexing ends `ready`. A failed entry's kept chunks are unchecked until
     * then — another cutting's, or a document's that fails again — so they are not shown while the
     * reindex is pending or processing either (services/knowledge/search.ts, hiddenChunks).
     */
    chunks_hidden: boolean('chunks_hidden').notNull().default(false),
    /**
     * The KB_SEARCH_LANGUAGE every chunk's full-text vector was made under, written when an
     * indexing ends `ready`; '' from a reindex's first claim until then (the chunks this code's, in
     * either language). A reindex under another language, or while '', keeps the chunks and their
     * embeddings (services/knowledge/ingestion.ts, `claim`). Null: indexed by code older than the
     * column (its embeddings may be a fallback model's), or never indexed.
     */
    search_language: text('search_language'),
    /** Ingestion attempts since the last upload or reindex: one that keeps dying is failed, not retried forever. */
    attempts: integer('attempts').notNull().default(0),
    /** The claim of the ingestion working on the entry: only its holder may write the result. */
    lease_token: uuid('lease_token'),
    /** Processing: when the claim runs out. Pending: until when no sweep queues the entry again (its job was queued; crud/knowledge.ts jobQueuedMark). */
    lease_expires_at: timestamp('lease_expires_at', { withTimezone: true }),
    processing_started_at: timestamp('processing_started_at', { withTimezone: true }),
    processed_at: timestamp('processed_at', { withTimezone: true }),
  },
  (t) => [
    uniqueIndex('ux_knowledge_entries_folder_id_filename').on(t.folder_id, t.filename),
    index('ix_knowledge_entries_owner_id_created_at').on(t.owner_id, t.created_at),
    index('ix_knowledge_entries_folder_id_created_at').on(t.folder_id, t.created_at),
    index('ix_knowledge_entries_project_id_created_at').on(t.project_id, t.created_at),
    // What the sweeper looks for: entries not finished.
    index('ix_knowledge_entries_unfinished').on(t.status, t.lease_expires_at).where(sql`${t.status} in ('pending', 'processing')`),
    // The owner's entries whose chunks every search statement leaves out (services/knowledge/search.ts, hiddenChunks):
    // a few rows read, not every entry the owner has.
    index('ix_knowledge_entries_owner_id_chunks_hidden').on(t.owner_id).where(sql`${t.chunks_hidden}`),
  ],
);

/**
 * The indexed passages of an entry. `owner_id` is the entry's, so that search narrows to the
 * caller's chunks first. Embeddings live beside them in `knowledge_chunk_embeddings`, a table that
 * exists only where pgvector does (created by the migration's own SQL, not by these models).
 */
export const knowledgeChunks = pgTable(
  'knowledge_chunks',
  {
    ...baseColumns,
    entry_id: uuid('entry_id')
      .notNull()
      .references(() => knowledgeEntries.id, { onDelete: 'cascade' }),
    owner_id: uuid('owner_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    chunk_index: integer('chunk_index').notNull(),
    text: text('text').notNull(),
    heading_path: text('heading_path').array().notNull().default(sql`'{}'::text[]`),
    token_count: integer('token_count').notNull(),
    tsv: tsvector('tsv').notNull(),
  },
  (t) => [
    uniqueIndex('ux_knowledge_chunks_entry_id_chunk_index').on(t.entry_id, t.chunk_index),
    index('ix_knowledge_chunks_owner_id').on(t.owner_id),
    index('ix_knowledge_chunks_tsv').using('gin', t.tsv),
  ],
);

/**
 * Stored files whose entry is gone and that are still to be deleted. A trigger writes one row per
 * deleted entry, whatever deleted it (the entry's route, its folder's, a project or user deleted
 * with everything in it), in the deleting transaction; the files go afterwards (a deletion through
 * the API deletes its own at once, up to a bound; the sweeper the rest), so a crash in between
 * leaves nothing for good.
 *
 * An upload records its file's key here too, before a byte is stored, with `not_before` set past
 * the longest the upload can take; the transaction that writes the entry deletes that row. A
 * process killed between storing the file and that commit leaves the row, and the sweeper deletes
 * the file once `not_before` has passed (services/knowledge/entry-service.ts, upload), having first
 * taken the row from the upload (`not_before` set to null: crud/knowledge.ts takeUploadedFiles).
 */
export const knowledgeFileDeletions = pgTable(
  'knowledge_file_deletions',
  {
    ...baseColumns,
    storage_key: text('storage_key').notNull(),
    /** An upload's file, still being stored and recorded: not to be deleted before this (null: at once, a deleted entry's or a taken upload's). */
    not_before: timestamp('not_before', { withTimezone: true }),
  },
  (t) => [
    // A deleting request finds the rows its own deletion wrote by their keys, however many other
    // deletions wait for the sweeper (services/knowledge/files.ts, purgeFilesOf).
    index('ix_knowledge_file_deletions_storage_key').on(t.storage_key),
    // Every upload counts its owner's uploads in flight (rows whose not_before is to come): only
    // uploads' rows are in it, not the deletion backlog's (crud/knowledge.ts, uploadsInFlight).
    index('ix_knowledge_file_deletions_not_before').on(t.not_before).where(sql`${t.not_before} is not null`),
  ],
);

export type KnowledgeFolder = typeof knowledgeFolders.$inferSelect;
export type NewKnowledgeFolder = typeof knowledgeFolders.$inferInsert;
export type KnowledgeEntry = typeof knowledgeEntries.$inferSelect;
export type NewKnowledgeEntry = typeof knowledgeEntries.$inferInsert;
export type KnowledgeEntryStatus = (typeof knowledgeEntryStatus.enumValues)[number];
export type KnowledgeChunk = typeof knowledgeChunks.$inferSelect;
