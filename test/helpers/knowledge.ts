import { randomBytes } from 'node:crypto';

import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { expect } from 'vitest';

import { call, eventually } from './http.js';

export interface FormFile {
  field?: string;
  filename: string;
  content: Buffer | string;
  type?: string;
}

/** A multipart/form-data body: the files and plain fields given, in order. */
export function multipartBody(parts: (FormFile | { field: string; value: string })[]): { body: Buffer; contentType: string } {
  const boundary = `----keel${randomBytes(8).toString('hex')}`;
  const chunks: Buffer[] = [];
  for (const part of parts) {
    if ('value' in part) {
      chunks.push(Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="${part.field}"\r\n\r\n${part.value}\r\n`));
      continue;
    }
    // RFC 7578 lets the name go as UTF-8 in the quoted string; busboy reads it so.
    const head = `--${boundary}\r\nContent-Disposition: form-data; name="${part.field ?? 'file'}"; filename="${part.filename.replace(/"/g, '%22')}"\r\nContent-Type: ${part.type ?? 'application/octet-stream'}\r\n\r\n`;
    chunks.push(Buffer.from(head), Buffer.from(part.content), Buffer.from('\r\n'));
  }
  chunks.push(Buffer.from(`--${boundary}--\r\n`));
  return { body: Buffer.concat(chunks), contentType: `multipart/form-data; boundary=${boundary}` };
}

export interface EntryBody {
  id: string;
  owner_id: string;
  folder_id: string;
  project_id: string | null;
  filename: string;
  mime_type: string;
  format: string | null;
  size_bytes: number;
  sha256: string;
  status: 'pending' | 'processing' | 'ready' | 'failed';
  error: string | null;
  chunk_count: number;
  token_count: number;
}

export async function createFolder(app: FastifyInstance, headers: Record<string, string>, body: Record<string, unknown> = { name: 'Docs' }): Promise<{ id: string; name: string; project_id: string | null }> {
  const response = await call(app, 'POST', '/knowledge-base/folders', headers, body);
  expect(response.statusCode, response.body).toBe(200);
  return response.json();
}

/** POSTs a file to the folder's upload route (the response as it is). */
export function upload(app: FastifyInstance, headers: Record<string, string>, folderId: string, file: FormFile): Promise<LightMyRequestResponse> {
  const { body, contentType } = multipartBody([file]);
  return app.inject({ method: 'POST', url: `/api/v1/knowledge-base/folders/${folderId}/upload`, headers: { ...headers, 'content-type': contentType }, payload: body });
}

/** Uploads and expects 201; the entry. */
export async function uploaded(app: FastifyInstance, headers: Record<string, string>, folderId: string, file: FormFile): Promise<EntryBody> {
  const response = await upload(app, headers, folderId, file);
  expect(response.statusCode, response.body).toBe(201);
  return response.json<EntryBody>();
}

/** Waits until the entry's ingestion has ended (ready or failed) and returns it. */
export async function settled(app: FastifyInstance, headers: Record<string, string>, entryId: string, timeoutMs = 15_000): Promise<EntryBody> {
  let entry: EntryBody | undefined;
  await eventually(async () => {
    entry = (await call(app, 'GET', `/knowledge-base/entries/${entryId}`, headers)).json<EntryBody>();
    return entry.status === 'ready' || entry.status === 'failed';
  }, timeoutMs);
  return entry!;
}

/** Uploads and waits for ingestion to end as `ready`. */
export async function ingested(app: FastifyInstance, headers: Record<string, string>, folderId: string, file: FormFile): Promise<EntryBody> {
  const entry = await settled(app, headers, (await uploaded(app, headers, folderId, file)).id);
  expect(entry.status, entry.error ?? '').toBe('ready');
  return entry;
}

export interface SearchBody {
  data: { entry_id: string; filename: string; chunk_index: number; text: string; score: number; heading_path: string[] }[];
  mode: 'full_text' | 'hybrid';
}

export async function search(app: FastifyInstance, headers: Record<string, string>, body: Record<string, unknown>): Promise<SearchBody> {
  const response = await call(app, 'POST', '/knowledge-base/search', headers, body);
  expect(response.statusCode, response.body).toBe(200);
  return response.json<SearchBody>();
}
