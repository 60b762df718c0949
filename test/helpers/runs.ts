/** Agents, threads and runs through the API, and a real-HTTP SSE reader for run events. */
import type { AddressInfo } from 'node:net';

import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, beforeEach, expect } from 'vitest';

import type { Db } from '../../src/core/db.js';

import { type NewRun, type Run, runs, threads } from '../../src/models/index.js';

import type { TestContext } from './app.js';
import { superuserHeaders } from './factories.js';
import { FakeModelServer } from './fake-model-server.js';
import { call, eventually } from './http.js';
import { addFakeModels } from './metered-models.js';

/**
 * For a file of run tests: a fake model server with the fake models in the catalog (its scripts
 * reset before each test), and the app listening on real HTTP (`base`) for the SSE reader.
 */
export function useRunServer(ctx: TestContext): { fake: FakeModelServer; base: string } {
  const server = {} as { fake: FakeModelServer; base: string };
  beforeAll(async () => {
    server.fake = await FakeModelServer.start();
    await addFakeModels(ctx.app, await superuserHeaders(ctx.app), server.fake.url);
    await ctx.app.listen({ port: 0, host: '127.0.0.1' });
    server.base = `http://127.0.0.1:${(ctx.app.server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    await server.fake?.close();
  });
  beforeEach(() => {
    server.fake.reset();
  });
  return server;
}

export interface RunBody {
  id: string;
  thread_id: string;
  agent_id: string | null;
  agent_version: number;
  model: string;
  status: 'queued' | 'running' | 'completed' | 'failed' | 'cancelled';
  error: string | null;
  usage: { input_tokens: number; output_tokens: number; cached_input_tokens: number; reasoning_tokens: number };
  cost: string;
  steps: number;
  attempts: number;
  input: string | null;
}

export interface SseEvent {
  id: number;
  event: string;
  data: Record<string, unknown> & { run_id: string; seq: number };
}

export const FINAL_EVENTS = new Set(['run.completed', 'run.failed', 'run.cancelled']);

export async function createAgent(app: FastifyInstance, headers: Record<string, string>, body: Record<string, unknown> = {}): Promise<{ id: string; version: number }> {
  const response = await call(app, 'POST', '/agents', headers, { name: 'Runner', model: 'fake-precise', system_prompt: 'Be brief.', ...body });
  expect(response.statusCode, response.body).toBe(200);
  return response.json();
}

export async function createThread(app: FastifyInstance, headers: Record<string, string>): Promise<{ id: string }> {
  const response = await call(app, 'POST', '/threads', headers, { title: 't' });
  expect(response.statusCode, response.body).toBe(200);
  return response.json();
}

/** POST /threads/{id}/runs; expects 202. */
export async function startRun(app: FastifyInstance, headers: Record<string, string>, threadId: string, body: Record<string, unknown> = {}): Promise<RunBody> {
  const response = await call(app, 'POST', `/threads/${threadId}/runs`, headers, body);
  expect(response.statusCode, response.body).toBe(202);
  return response.json<RunBody>();
}

export async function getRun(app: FastifyInstance, headers: Record<string, string>, runId: string): Promise<RunBody> {
  const response = await call(app, 'GET', `/runs/${runId}`, headers);
  expect(response.statusCode, response.body).toBe(200);
  return response.json<RunBody>();
}

/** Waits until the run has one of `statuses` and returns it. */
export async function waitForRun(app: FastifyInstance, headers: Record<string, string>, runId: string, statuses: RunBody['status'][], timeoutMs = 10_000): Promise<RunBody> {
  let run: RunBody | undefined;
  await eventually(async () => {
    run = await getRun(app, headers, runId);
    return statuses.includes(run.status);
  }, timeoutMs);
  return run!;
}

export interface ReadOptions {
  after?: number;
  lastEventId?: number;
  /** Stop (and disconnect) after this many events. */
  limit?: number;
  /** Called for each event as it arrives. */
  onEvent?: (event: SseEvent) => void;
  timeoutMs?: number;
}

/**
 * Reads `GET /runs/{id}/events` over real HTTP until the final event, `limit` events, or the
 * server ends the stream. Returns the events and the comments (keep-alives) seen.
 */
export async function readEvents(base: string, headers: Record<string, string>, runId: string, options: ReadOptions = {}): Promise<{ events: SseEvent[]; comments: string[]; status: number; ended: boolean }> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), options.timeoutMs ?? 15_000);
  const query = options.after === undefined ? '' : `?after=${options.after}`;
  const response = await fetch(`${base}/api/v1/runs/${runId}/events${query}`, {
    headers: { ...headers, ...(options.lastEventId === undefined ? {} : { 'last-event-id': String(options.lastEventId) }) },
    signal: controller.signal,
  });
  const events: SseEvent[] = [];
  const comments: string[] = [];
  let ended = false;
  if (response.status !== 200 || !response.body) {
    clearTimeout(timer);
    return { events, comments, status: response.status, ended: true };
  }
  const decoder = new TextDecoder();
  let buffer = '';
  try {
    for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
      buffer += decoder.decode(chunk, { stream: true });
      let cut: number;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const fields: Record<string, string> = {};
        for (const line of block.split('\n')) {
          if (line.startsWith(':')) comments.push(line.slice(1).trim());
          else {
            const colon = line.indexOf(':');
            fields[line.slice(0, colon)] = line.slice(colon + 1).trimStart();
          }
        }
        if (fields.event === undefined) continue;
        const event: SseEvent = { id: Number(fields.id), event: fields.event, data: JSON.parse(fields.data ?? '{}') as SseEvent['data'] };
        events.push(event);
        options.onEvent?.(event);
        if (options.limit !== undefined && events.length >= options.limit) {
          controller.abort();
          return { events, comments, status: 200, ended: false };
        }
      }
    }
    ended = true;
  } catch (error) {
    if (!controller.signal.aborted) throw error;
  } finally {
    clearTimeout(timer);
  }
  return { events, comments, status: 200, ended };
}

/** Seqs are 1, 2, 3, … (or start after `after`) with no gap and no repeat. */
export function expectContiguous(events: SseEvent[], after = 0): void {
  expect(events.map((e) => e.id)).toEqual(events.map((_, i) => after + i + 1));
  for (const event of events) expect(event.data.seq).toBe(event.id);
}

/**
 * Seqs rise with no repeat, each event's data carrying its own: a run taken up after its worker died
 * goes on after a gap (embedded: UNSTORED_SEQS; scaled: up to its seq ceiling, RUN_EVENT_SEQ_ROOM).
 */
export function expectIncreasing(events: SseEvent[]): void {
  for (const [i, event] of events.entries()) {
    expect(event.data.seq).toBe(event.id);
    if (i > 0) expect(event.id).toBeGreaterThan(events[i - 1]!.id);
  }
}

// ==================== Over real HTTP (spawned processes) ====================

/** A JSON request to `base`/api/v1`path`; the status and the parsed body. */
export async function json<T>(base: string, method: string, path: string, headers: Record<string, string>, body?: unknown): Promise<{ status: number; body: T }> {
  const response = await fetch(`${base}/api/v1${path}`, { method, headers: { 'content-type': 'application/json', ...headers }, ...(body === undefined ? {} : { body: JSON.stringify(body) }) });
  return { status: response.status, body: (await response.json()) as T };
}

/** Signs `email` up and logs in on `base`; their bearer headers, with a default agent on `model`. */
export async function userWithAgent(base: string, email: string, password: string, model: string): Promise<Record<string, string>> {
  expect((await json(base, 'POST', '/users/signup', {}, { email, password })).status).toBe(200);
  const login = await fetch(`${base}/api/v1/login/access-token`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams({ username: email, password }) });
  const headers = { authorization: `Bearer ${((await login.json()) as { access_token: string }).access_token}` };
  expect((await json(base, 'POST', '/agents', headers, { name: 'a', model, is_default: true })).status).toBe(200);
  return headers;
}

/** POST /runs (a new thread with `input`); expects 202. */
export async function startRunWithThread(base: string, headers: Record<string, string>, input: string): Promise<RunBody> {
  const run = await json<RunBody>(base, 'POST', '/runs', headers, { input });
  expect(run.status).toBe(202);
  return run.body;
}

/** The thread's messages, oldest first. */
export async function messagesOf(base: string, headers: Record<string, string>, threadId: string) {
  return (await json<{ data: { role: string; content: string; run_id: string | null }[] }>(base, 'GET', `/threads/${threadId}/messages?limit=100`, headers)).body.data;
}

/**
 * A run some dead worker held on `thread_id` (running, its lease run out a second ago, `more` on top:
 * its attempts, steps), the thread busy with it: what a sweep or a resume finds after a crash.
 */
export async function orphanRun(db: Db, run: Pick<NewRun, 'owner_id' | 'thread_id' | 'agent_id' | 'model'> & Partial<NewRun>): Promise<Run> {
  const [orphan] = await db
    .insert(runs)
    .values({ agent_version: 1, status: 'running', lease_owner: 'dead-worker', lease_expires_at: new Date(Date.now() - 1_000), attempts: 1, started_at: new Date(), ...run })
    .returning();
  await db.update(threads).set({ status: 'busy' }).where(eq(threads.id, run.thread_id));
  return orphan!;
}
