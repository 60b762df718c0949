import type { FastifyInstance, InjectOptions, LightMyRequestResponse } from 'fastify';
import { expect } from 'vitest';

import type { TestContext } from './app.js';

// ==================== Shapes ====================

export const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
export const ISO_UTC = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;

export interface ValidationBody {
  detail: { loc: (string | number)[]; msg: string; type: string }[];
}

export interface ListBody<T> {
  data: T[];
  count: number;
}

export interface KeyBody {
  id: string;
  name: string;
  prefix: string;
  project_id: string | null;
  status: 'active' | 'revoked' | 'expired';
  expires_at: string | null;
  last_used_at: string | null;
  created_at: string;
  updated_at: string;
}

export interface CreatedKey extends KeyBody {
  key: string;
}

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Resolves once `check` holds (polled every 25 ms); throws after `timeoutMs`. For what another node hears a moment later. */
export async function eventually(check: () => Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await sleep(25);
  }
}

// ==================== Requests ====================

export type Method = InjectOptions['method'];

/** One request to `/api/v1<url>`, JSON `payload` when given. */
export function call(app: FastifyInstance, method: Method, url: string, headers: Record<string, string> = {}, payload?: unknown): Promise<LightMyRequestResponse> {
  return app.inject({ method, url: `/api/v1${url}`, headers, ...(payload === undefined ? {} : { payload: payload as InjectOptions['payload'] }) });
}

/** `call` bound to the test file's app (see useTestApp). */
export function apiOf(ctx: TestContext) {
  return (method: Method, url: string, headers: Record<string, string> = {}, payload?: unknown) => call(ctx.app, method, url, headers, payload);
}

export const xApiKey = (key: string) => ({ 'x-api-key': key });

/** The value of an unlabelled series as GET /metrics shows it (the app's METRICS_TOKEN unset). */
export async function metricValue(app: FastifyInstance, name: string): Promise<number> {
  const response = await app.inject({ method: 'GET', url: '/metrics' });
  expect(response.statusCode).toBe(200);
  const line = new RegExp(`^${name} (\\S+)$`, 'm').exec(response.body);
  expect(line, `${name} in /metrics`).not.toBeNull();
  return Number(line![1]);
}

/** Creates an API key through the API for `owner` (expects 200). */
export async function createKey(app: FastifyInstance, owner: { headers: Record<string, string> }, payload: Record<string, unknown> = { name: 'key' }): Promise<CreatedKey> {
  const response = await call(app, 'POST', '/api-keys', owner.headers, payload);
  expect(response.statusCode, response.body).toBe(200);
  return response.json<CreatedKey>();
}

// ==================== Assertions ====================

/** A 422 in the FastAPI shape whose issues include one at `loc` (and, when given, of `type`). */
export function expectValidationError(response: { statusCode: number; json: <T>() => T }, loc: (string | number)[], type?: string): ValidationBody {
  expect(response.statusCode).toBe(422);
  const body = response.json<ValidationBody>();
  expect(Array.isArray(body.detail)).toBe(true);
  expect(body.detail.length).toBeGreaterThan(0);
  for (const issue of body.detail) {
    expect(Object.keys(issue).sort()).toEqual(['loc', 'msg', 'type']);
    expect(typeof issue.msg).toBe('string');
    expect(typeof issue.type).toBe('string');
  }
  expect(body.detail).toContainEqual(expect.objectContaining(type === undefined ? { loc } : { loc, type }));
  return body;
}
