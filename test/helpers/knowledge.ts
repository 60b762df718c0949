import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';

import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { expect } from 'vitest';

import type { SweepPick } from '../../src/services/knowledge/ingestion.js';
import { call, eventually } from './http.js';
import { type FormFile, multipartBody } from './multipart.js';

export { type FormFile, multipartBody } from './multipart.js';

/** A sweep as a worker's later ones pick (sweepIngestion): entries left pending a minute, entries not marked in the last five. */
export const SWEEP: SweepPick = { pendingAgeMs: 60_000, markMs: 300_000, ignoreMarks: false };

/** Files under a user's part of the knowledge-base storage (the local backend under `dataDir`). */
export function storedFiles(dataDir: string, ownerId: string): string[] {
  const dir = join(dataDir, 'storage', 'knowledge-base', ownerId);
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, encoding: 'utf8' }).filter((name) => statSync(join(dir, name)).isFile());
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
  text_bytes: number;
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
