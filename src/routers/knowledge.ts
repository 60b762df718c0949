import multipart, { type Multipart, type MultipartFile } from '@fastify/multipart';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';

import { BadRequestError, HttpError, oneFilePerUpload, UnprocessableError } from '../core/errors.js';
import { lingerOnUnreadBody } from '../core/http-server.js';

import { authErrors, ErrorBody } from '../schemas/common.js';
import {
  KnowledgeEntryIdParams,
  KnowledgeEntryListQuery,
  KnowledgeEntryMove,
  KnowledgeEntryPublic,
  KnowledgeEntryUpdate,
  KnowledgeFolderCreate,
  KnowledgeFolderIdParams,
  KnowledgeFolderListQuery,
  KnowledgeFolderPublic,
  KnowledgeFolderUpdate,
  KnowledgeSearchRequest,
  KnowledgeSearchResponse,
  KnowledgeStats,
} from '../schemas/knowledge.js';

import { folderCrud } from '../crud/knowledge.js';
import { contextOf } from '../services/context.js';
import * as entryService from '../services/knowledge/entry-service.js';
import * as folderService from '../services/knowledge/folder-service.js';
import { searchKnowledge } from '../services/knowledge/search.js';
import type { OpenedFile } from '../services/storage-service.js';
import { requireUser } from '../utils/authentication.js';
import { findInCauses } from '../utils/error-chain.js';
import { abortingWith, untilAborted } from '../utils/time-limit.js';
import { registerOwnedRoutes } from './owned-routes.js';

const tags = ['knowledge-base'];

/**
 * The most a form around one file adds to it (boundaries, part headers, a few small fields): a
 * Content-Length beyond the allowance by more than this is refused before a byte is read.
 */
const FORM_OVERHEAD_BYTES = 64 * 1024;

function contentLengthOf(request: FastifyRequest): number | undefined {
  const header = request.headers['content-length'];
  const length = header === undefined ? NaN : Number(header);
  return Number.isSafeInteger(length) && length >= 0 ? length : undefined;
}

/**
 * Streamed answers (never serialized: Fastify pipes a stream as it is), described for the OpenAPI
 * document with the media types they go out with, so a generated client reads a file as bytes and
 * the text as text (documented as JSON, clients parsed both as JSON and threw).
 */
const FileBody = {
  description: 'The file as uploaded (its `Content-Type` the one sniffed from it)',
  content: { 'application/octet-stream': { schema: z.unknown().meta({ type: 'string', format: 'binary' }) } },
};
const TextBody = { description: 'The extracted text', content: { 'text/plain': { schema: z.string() } } };

const missingFile = () =>
  new UnprocessableError({ loc: ['body', 'file'], msg: 'Field required: send the document as multipart/form-data in a field named "file"', type: 'missing' });

type FormParts = AsyncIterableIterator<Multipart>;

/** The form's first file, past the fields before it (none: undefined). */
async function firstFile(parts: FormParts): Promise<MultipartFile | undefined> {
  for (let next = await parts.next(); !next.done; next = await parts.next()) {
    if (next.value.type === 'file') return next.value;
  }
  return undefined;
}

/**
 * Reads the form past its file to its end: fields are ignored, and a second file ends it with the
 * plugin's FST_FILES_LIMIT (`files: 1`), which the error handler answers with 422. Awaited before
 * the entry is written, so a refused form leaves nothing behind.
 */
async function restOfForm(parts: FormParts): Promise<void> {
  for await (const part of parts) {
    // Unreachable with `files: 1` (busboy skips the part and raises the limit), kept should the limit change.
    if (part.type === 'file') throw oneFilePerUpload();
  }
}

/**
 * What busboy says of a form it cannot read (no boundary, an empty one, a body that ends inside a
 * part): plain errors with no status, which went out as 500s and error-level log lines any client
 * could set off. Matched by their words, busboy's only mark of them (@fastify/busboy 3).
 */
const MALFORMED_FORM = /^(?:Multipart: Boundary not found|Boundary required|The needle cannot .*|.*unexpected end of multipart data)$/i;

/** A 400 naming what was wrong with the form, when `error` (or what caused it) is busboy's complaint about it. */
function malformedForm(error: unknown): BadRequestError | undefined {
  const complaint = findInCauses(error, (e): e is Error => e instanceof Error && !(e instanceof HttpError) && MALFORMED_FORM.test(e.message));
  return complaint && new BadRequestError(`Malformed multipart/form-data body: ${complaint.message}`);
}

/** The shutdown's 503 for an upload it ended (the file stream's AbortError carries it as its cause). */
function shutDown(error: unknown, closing: AbortSignal): unknown {
  return closing.aborted ? findInCauses(error, (e) => e === closing.reason) : undefined;
}

/** RFC 6266 / 5987: an ASCII fallback name, and the exact one percent-encoded in UTF-8. */
export function contentDisposition(filename: string): string {
  const fallback = filename.replace(/[^\x20-\x7e]|["\\%]/g, '_');
  const encoded = encodeURIComponent(filename).replace(/['()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
  return `attachment; filename="${fallback}"; filename*=UTF-8''${encoded}`;
}

/** A stored file as the answer, streamed (never held whole). */
function sendFile(reply: FastifyReply, contentType: string, file: OpenedFile): FastifyReply {
  return reply.header('content-type', contentType).header('content-length', String(file.size)).send(file.body);
}

/** Knowledge base (SPEC §7): folders, uploaded entries, their text, and search. */
export const knowledgeRouter: FastifyPluginAsyncZod = async (app) => {
  app.addHook('onRequest', requireUser);
  await app.register(multipart, {
    // One file and a few small fields: the form cannot carry more than FORM_OVERHEAD_BYTES besides the file.
    limits: { files: 1, fields: 10, fieldSize: 1024, parts: 12, headerPairs: 20 },
  });

  registerOwnedRoutes(app, {
    noun: 'Folder',
    path: '/knowledge-base/folders',
    idParam: 'folder_id',
    tags,
    schemas: { create: KnowledgeFolderCreate, update: KnowledgeFolderUpdate, public: KnowledgeFolderPublic },
    service: folderService,
    listQuery: KnowledgeFolderListQuery,
    createErrors: [404],
    descriptions: {
      list: 'Newest first; `?project_id=` narrows the list.',
      create: 'A name another of your folders has gets a number: `Docs (1)`.',
      update: 'A name another of your folders has gets a number. Moving the folder to a project moves its entries with it.',
      delete: 'Deletes the folder, its entries, their stored files and their index.',
    },
  });

  registerOwnedRoutes(app, {
    noun: 'Entry',
    plural: 'Entries',
    path: '/knowledge-base/entries',
    idParam: 'entry_id',
    tags,
    schemas: { update: KnowledgeEntryUpdate, public: KnowledgeEntryPublic },
    service: entryService,
    listQuery: KnowledgeEntryListQuery,
    descriptions: {
      list: 'Newest first; `?folder_id=`, `?project_id=` and `?status=` narrow the list. Entries are created by uploading to a folder.',
      update: 'Renames the entry; a name taken in its folder gets a number: `report (1).pdf`.',
      delete: 'Deletes the entry, its stored file, extracted text and index.',
    },
  });

  // ==================== Upload ====================

  app.post(
    '/knowledge-base/folders/:folder_id/upload',
    {
      schema: {
        operationId: 'upload_knowledge_entry',
        summary: 'Upload Knowledge Entry',
        description:
          'A `multipart/form-data` body with the document in a field named `file` (txt, md, html, pdf, docx, csv, json). Answers **201** with the entry, `status: pending`; ingestion runs in the background. One file per upload: a form with a second file is refused with 422 and none of it is kept (other fields are ignored); a form busboy cannot read (no boundary, a body ending inside a part) with 400. ' +
          'A name taken in the folder gets a number (`report (1).pdf`). Over KB_MAX_FILE_BYTES, or over what is left of KB_MAX_BYTES_PER_USER: 413 with the figures, answered as soon as the size is known (from Content-Length, or while the file arrives). Once indexed, an entry counts for its extracted text when that is larger than the file (a compressed PDF or DOCX, or a document of many short sections: each passage counts for at least 512 bytes): ingestion fails the entry, keeping none of its text, when the text would pass what is left. 429 beyond KB_MAX_UPLOADS_IN_FLIGHT_PER_USER uploads in progress at once. ' +
          'When EMBEDDING_MODEL is set and priced: 402 before the file is read if billing is on and the account has no credits available, or the API key\'s `max_budget` is used up (only that something is left is checked: a document\'s cost is known once it is chunked; a limit reached while it is embedded fails the entry). ' +
          '503 when the upload took so long (past HTTP_REQUEST_TIMEOUT_MS + 15 minutes) that its stored file was already swept, or when the server shut down while it arrived: nothing is kept; upload it again. 404 for a project-scoped key whose folder moved to another project while the file arrived: nothing is kept.',
        tags,
        consumes: ['multipart/form-data'],
        form: { file: 'The document: plain text, Markdown, HTML, PDF, DOCX, CSV or JSON.' },
        params: KnowledgeFolderIdParams,
        response: { 201: KnowledgeEntryPublic, 400: ErrorBody, 402: ErrorBody, 404: ErrorBody, 413: ErrorBody, 429: ErrorBody, 503: ErrorBody, ...authErrors },
      },
    },
    async (request, reply) => {
      const ctx = contextOf(request);
      try {
        const folder = await folderCrud.getVisible(ctx.db, ctx.principal, request.params.folder_id, 'write');
        // Both before a byte of the file is read: a file that cannot be stored, or never embedded.
        const [allowance] = await Promise.all([entryService.uploadAllowance(ctx, folder.owner_id), entryService.checkEmbeddingPayable(ctx, () => folder.owner_id)]);
        entryService.checkDeclaredSize(allowance, contentLengthOf(request), FORM_OVERHEAD_BYTES);
        if (!request.isMultipart()) throw missingFile();
        // busboy's own cap one byte past the allowance: the storage stream (maxBytes) refuses first, with the figures.
        const parts = request.parts({ limits: { fileSize: allowance.max + 1 } });
        // A shutdown ends an upload still arriving (a slow client's may take HTTP_REQUEST_TIMEOUT_MS):
        // the file read so far is removed, and the client answered 503, at once.
        const closing = app.closingSignal;
        const part = await untilAborted(firstFile(parts), closing);
        if (!part || part.fieldname !== 'file') throw missingFile();
        // The listener goes with the upload, whether or not its file was read (a refusal before it is leaves the stream unread).
        const endFile = () => part.file.destroy(closing.reason instanceof Error ? closing.reason : new Error('closing'));
        const entry = await abortingWith(closing, endFile, () =>
          entryService.upload(ctx, folder, { stream: part.file, filename: part.filename, declaredMime: part.mimetype, restOfForm: () => untilAborted(restOfForm(parts), closing) }, allowance),
        );
        void reply.code(201).header('location', `${app.prefix}/knowledge-base/entries/${entry.id}`);
        return entry;
      } catch (error) {
        lingerOnUnreadBody(request, reply);
        throw shutDown(error, app.closingSignal) ?? malformedForm(error) ?? error;
      }
    },
  );

  // ==================== Entry files ====================

  app.get(
    '/knowledge-base/entries/:entry_id/download',
    {
      schema: {
        operationId: 'download_knowledge_entry',
        summary: 'Download Knowledge Entry',
        description: 'The stored file as uploaded, streamed, with its sniffed type and `Content-Disposition: attachment` (the name RFC 5987-encoded).',
        tags,
        params: KnowledgeEntryIdParams,
        response: { 200: FileBody, 404: ErrorBody, ...authErrors },
      },
    },
    async (request, reply) => {
      const { entry, file } = await entryService.download(contextOf(request), request.params.entry_id);
      return sendFile(reply.header('content-disposition', contentDisposition(entry.filename)), entry.mime_type, file);
    },
  );

  app.get(
    '/knowledge-base/entries/:entry_id/content',
    {
      schema: {
        operationId: 'get_knowledge_entry_content',
        summary: 'Get Knowledge Entry Content',
        description: 'The text extracted from the document (`text/plain`, streamed); 409 until the entry is `ready`.',
        tags,
        params: KnowledgeEntryIdParams,
        response: { 200: TextBody, 404: ErrorBody, 409: ErrorBody, ...authErrors },
      },
    },
    async (request, reply) => {
      const { file } = await entryService.content(contextOf(request), request.params.entry_id);
      return sendFile(reply, 'text/plain; charset=utf-8', file);
    },
  );

  app.put(
    '/knowledge-base/entries/:entry_id/move',
    {
      schema: {
        operationId: 'move_knowledge_entry',
        summary: 'Move Knowledge Entry',
        description: 'Into another of your folders (its project with it); a name taken there gets a number. A project-scoped key gets 404 for a folder outside its project, one moved out of it meanwhile too.',
        tags,
        params: KnowledgeEntryIdParams,
        body: KnowledgeEntryMove,
        response: { 200: KnowledgeEntryPublic, 404: ErrorBody, ...authErrors },
      },
    },
    async (request) => entryService.move(contextOf(request), request.params.entry_id, request.body.folder_id),
  );

  app.post(
    '/knowledge-base/entries/:entry_id/reindex',
    {
      schema: {
        operationId: 'reindex_knowledge_entry',
        summary: 'Reindex Knowledge Entry',
        description:
          'Ingests the stored file again (after a failure, or a change of EMBEDDING_MODEL or KB_SEARCH_LANGUAGE): **202**, `status: pending`. ' +
          'A ready entry\'s chunks are cleared when the job starts and stored again as the file is read, so until it is `ready` search finds only the part indexed so far. ' +
          'Except when KB_SEARCH_LANGUAGE is not the one the entry was last indexed under (`ready`), or a reindex of it was cut short (reindexed again before it ended): its chunks and their embeddings stay, and only their full-text index is redone, with nothing embedded or charged again ' +
          'but the chunks that a change of EMBEDDING_MODEL (all of them) or of a chunking setting (from the first chunk cut otherwise on) made with it leaves different, which are embedded and replaced as the file is read. ' +
          'An entry last indexed before Keel recorded its language (migration 0020) is cleared and embedded anew. ' +
          'A failed entry\'s chunks (kept: what was embedded before it failed is reused, not paid for again) are not searched until it is `ready`. ' +
          'The entry\'s text is counted against the quota anew (`text_bytes`): one whose text no longer fits fails, keeping none of it. ' +
          'Its embeddings count against the calling API key\'s `max_budget` and the owner\'s credits: 402 when EMBEDDING_MODEL is priced and nothing is left of either, as for an upload.',
        tags,
        params: KnowledgeEntryIdParams,
        response: { 202: KnowledgeEntryPublic, 402: ErrorBody, 404: ErrorBody, ...authErrors },
      },
    },
    async (request, reply) => {
      const entry = await entryService.reindex(contextOf(request), request.params.entry_id);
      void reply.code(202);
      return entry;
    },
  );

  // ==================== Stats and search ====================

  app.get(
    '/knowledge-base/stats',
    {
      schema: {
        operationId: 'get_knowledge_base_stats',
        summary: 'Get Knowledge Base Stats',
        description:
          "Your folders, entries by status, bytes and the index (a project-scoped key: its project's), and the limits. `size_bytes` sums the files' own sizes; `quota_bytes_used` is what counts against `max_bytes_per_user` (the account's): each entry the larger of its file and its extracted text (`text_bytes`, counted once: the chunks' overlap is not; each chunk at least 512 bytes), at least 4 KiB.",
        tags,
        response: { 200: KnowledgeStats, ...authErrors },
      },
    },
    async (request) => entryService.stats(contextOf(request)),
  );

  app.post(
    '/knowledge-base/search',
    {
      schema: {
        operationId: 'search_knowledge_base',
        summary: 'Search Knowledge Base',
        description:
          'Passages of your documents (a project-scoped key: its project\'s) best matching `query`: full text (web-search syntax: quotes, `or`, `-word`), fused by reciprocal rank with vector similarity when EMBEDDING_MODEL is set and the documents have embeddings (`mode: hybrid`). ' +
          '`folder_ids` and `entry_ids` narrow the search to those folders\' entries plus those entries.',
        tags,
        body: KnowledgeSearchRequest,
        response: { 200: KnowledgeSearchResponse, ...authErrors },
      },
    },
    async (request) => {
      const { query, folder_ids, entry_ids, top_k } = request.body;
      const ctx = contextOf(request);
      return searchKnowledge(ctx, ctx.principal, { query, folderIds: folder_ids, entryIds: entry_ids, topK: top_k });
    },
  );

};
