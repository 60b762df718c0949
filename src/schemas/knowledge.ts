import { z } from 'zod';

import { DOCUMENT_FORMATS } from '../modules/knowledge/types.js';
import { Id, Pagination, Text, Timestamp } from './common.js';

// ==================== Names ====================

/** Longest folder or file name, in characters (the columns' width). */
export const MAX_NAME_CHARS = 255;

/**
 * Characters a name may not hold: path separators, controls (Cc: C0, DEL, C1), line and paragraph
 * separators, and every invisible format character (Cf), such as those that make `exe\u202Etxt.pdf`
 * show as `exetxt.pdf`. By category, not by a list: a list of bidi overrides and zero-width spaces
 * let the Arabic letter mark, the word joiner, the soft hyphen and tag characters through, each a
 * way to give two names that look the same on screen.
 */
const FORBIDDEN_IN_NAME = /[/\\\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u;

/**
 * Why `name` is refused as a folder or file name, or null when it is fine. Names are compared
 * after NFC normalization (what `normalizeName` returns), so `é` typed two ways is one name.
 */
export function nameProblem(name: string): string | null {
  if (!name.trim()) return 'Name must not be empty';
  if (name.length > MAX_NAME_CHARS) return `Name must have at most ${MAX_NAME_CHARS} characters`;
  if (name === '.' || name === '..') return 'Name must not be "." or ".."';
  if (LONE_SURROGATE.test(name)) return 'Name contains an unpaired surrogate';
  if (FORBIDDEN_IN_NAME.test(name)) return 'Name must not contain "/", "\\", control characters, line or paragraph separators or invisible formatting characters';
  return null;
}

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

export const normalizeName = (name: string) => name.normalize('NFC').trim();

/** A folder or file name: trimmed, NFC, and free of what `nameProblem` refuses. */
export const Name = z
  .string()
  .transform(normalizeName)
  .superRefine((name, ctx) => {
    const problem = nameProblem(name);
    if (problem) ctx.addIssue({ code: 'custom', message: problem });
  });

// ==================== Folders ====================

export const KnowledgeFolderCreate = z
  .strictObject({
    name: Name,
    description: Text.max(10_000).default(''),
    project_id: Id.nullable().optional(),
  })
  .meta({ id: 'KnowledgeFolderCreate', description: 'A name taken by another of your folders gets a number: `Docs (1)`.' });
export type KnowledgeFolderCreate = z.infer<typeof KnowledgeFolderCreate>;

export const KnowledgeFolderUpdate = z
  .strictObject({ name: Name, description: Text.max(10_000), project_id: Id.nullable() })
  .partial()
  .meta({ id: 'KnowledgeFolderUpdate' });
export type KnowledgeFolderUpdate = z.infer<typeof KnowledgeFolderUpdate>;

export const KnowledgeFolderPublic = z
  .object({
    id: Id,
    owner_id: Id,
    project_id: Id.nullable(),
    name: z.string(),
    description: z.string(),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'KnowledgeFolderPublic' });

export const KnowledgeFolderListQuery = Pagination.extend({ project_id: Id.optional() });
export type KnowledgeFolderListQuery = z.infer<typeof KnowledgeFolderListQuery>;

// ==================== Entries ====================

export const KnowledgeEntryStatus = z
  .enum(['pending', 'processing', 'ready', 'failed'])
  .describe('`pending` → `processing` → `ready` | `failed` (then `error` says why).');

export const KnowledgeEntryPublic = z
  .object({
    id: Id,
    owner_id: Id,
    folder_id: Id,
    project_id: Id.nullable(),
    filename: z.string(),
    mime_type: z.string().describe('The type sniffed from the bytes; what the download is served as.'),
    format: z.enum(DOCUMENT_FORMATS).nullable().describe('The format text is extracted as; null until known.'),
    size_bytes: z.number().int(),
    sha256: z.string(),
    status: KnowledgeEntryStatus,
    error: z.string().nullable(),
    chunk_count: z.number().int(),
    token_count: z.number().int(),
    text_bytes: z
      .number()
      .int()
      .describe(
        'What the entry\'s extracted text counts for, in bytes, as its chunks (passages) hold it: each chunk\'s UTF-8 bytes counted once (the overlap each chunk repeats from the one before is not counted again), and at least 512 a chunk, however short (a chunk costs a row, index entries and an embedding whatever its text). A plain-text file\'s, or a document\'s of sections of 500 bytes or more, is about its text\'s size; a document of many short sections (a chunk never spans two) counts for more. The entry counts against your quota for the larger of this and `size_bytes` (at least 4096): a compressed PDF or DOCX can extract to ~100× its file. 0 until indexed, after a failure that kept no text, and for an entry last indexed before Keel counted text (until reindexed).',
      ),
    processed_at: Timestamp.nullable(),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'KnowledgeEntryPublic' });

export const KnowledgeEntryUpdate = z
  .strictObject({ filename: Name })
  .partial()
  .meta({ id: 'KnowledgeEntryUpdate', description: 'A name taken in the folder gets a number: `report (1).pdf`.' });
export type KnowledgeEntryUpdate = z.infer<typeof KnowledgeEntryUpdate>;

export const KnowledgeEntryMove = z.strictObject({ folder_id: Id }).meta({ id: 'KnowledgeEntryMove' });

export const KnowledgeEntryListQuery = Pagination.extend({
  folder_id: Id.optional(),
  project_id: Id.optional(),
  status: KnowledgeEntryStatus.optional(),
});
export type KnowledgeEntryListQuery = z.infer<typeof KnowledgeEntryListQuery>;

export const KnowledgeEntryIdParams = z.object({ entry_id: Id });
export const KnowledgeFolderIdParams = z.object({ folder_id: Id });

// ==================== Stats ====================

export const KnowledgeStats = z
  .object({
    folder_count: z.number().int(),
    entry_count: z.number().int(),
    entries_by_status: z.object({ pending: z.number().int(), processing: z.number().int(), ready: z.number().int(), failed: z.number().int() }),
    size_bytes: z.number().int().describe("Bytes of the uploaded files counted here, each at its own size (not what the quota counts: see quota_bytes_used)."),
    quota_bytes_used: z
      .number()
      .int()
      .describe(
        "Bytes your entries count for against max_bytes_per_user: each entry the larger of its file (`size_bytes`) and the text its chunks hold, counted once without the chunks' overlap and each chunk for at least 512 bytes (`text_bytes`), at least 4096 (4 KiB). An upload is refused with 413 once this and the file's own count would pass the limit; an entry whose text would take this past it fails (its `error` says so) and keeps none of it. The account's, also for a project-scoped key.",
      ),
    max_bytes_per_user: z.number().int(),
    max_file_bytes: z.number().int(),
    chunk_count: z.number().int(),
    token_count: z.number().int(),
    vector_search: z.boolean().describe('Whether search is hybrid (embeddings and pgvector present) or full-text only.'),
  })
  .meta({ id: 'KnowledgeStats' });

// ==================== Search ====================

export const KnowledgeSearchRequest = z
  .strictObject({
    query: z.string().trim().min(1).max(2_000),
    folder_ids: z.array(Id).max(100).optional(),
    entry_ids: z.array(Id).max(1_000).optional(),
    top_k: z.number().int().min(1).max(50).default(5),
  })
  .meta({ id: 'KnowledgeSearchRequest' });
export type KnowledgeSearchRequest = z.infer<typeof KnowledgeSearchRequest>;

export const KnowledgeSearchHit = z
  .object({
    entry_id: Id,
    filename: z.string(),
    chunk_index: z.number().int(),
    text: z.string(),
    score: z.number().describe('Higher is better: ts_rank_cd for full text alone; the fused reciprocal-rank score in hybrid search.'),
    heading_path: z.array(z.string()),
  })
  .meta({ id: 'KnowledgeSearchHit' });

export const KnowledgeSearchResponse = z
  .object({ data: z.array(KnowledgeSearchHit), mode: z.enum(['full_text', 'hybrid']) })
  .meta({ id: 'KnowledgeSearchResponse' });
