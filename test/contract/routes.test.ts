import { randomUUID } from 'node:crypto';

import type { RouteOptions } from 'fastify';
import { describe, expect, it } from 'vitest';

import { apiRoutes } from '../../src/api/main.js';
import { useTestApp } from '../helpers/app.js';

const ctx = useTestApp();

/** The API routes anyone may call: they authenticate nobody, by design. */
const PUBLIC = new Set(['POST /api/v1/login/access-token', 'POST /api/v1/password-recovery/:email', 'POST /api/v1/reset-password/', 'POST /api/v1/users/signup']);

const methodsOf = (route: RouteOptions) => (Array.isArray(route.method) ? route.method : [route.method]).filter((m) => m !== 'HEAD');
const schemaOf = (route: RouteOptions) => (route.schema ?? {}) as { operationId?: string; summary?: string; tags?: string[]; hide?: boolean; response?: Record<string, unknown> };

/** Fastify's route table under /api/v1, one entry per method (HEAD twins of GET left out). */
function table(): { name: string; method: string; url: string; route: RouteOptions }[] {
  return apiRoutes(ctx.app)
    .flatMap((route) => methodsOf(route).map((method) => ({ name: `${method} ${route.url}`, method, url: route.url, route })))
    .filter(({ route }) => !schemaOf(route).hide);
}

describe('every /api/v1 route', () => {
  it('is in the table (the sweep sees the routes)', () => {
    const names = table().map((entry) => entry.name);
    expect(names).toContain('GET /api/v1/projects/:project_id');
    expect(names).toContain('DELETE /api/v1/api-keys/:api_key_id');
    expect(names).toContain('PATCH /api/v1/threads/:thread_id/messages/:message_id');
    expect(names).toContain('GET /api/v1/agents/:agent_id/versions/:version');
    expect(names.length).toBeGreaterThanOrEqual(20);
    for (const name of PUBLIC) expect(names).toContain(name);
  });

  it('declares a snake_case operationId (unique), a summary, tags and a 200/201/202 schema', () => {
    const ids = new Set<string>();
    for (const { name, route } of table()) {
      const schema = schemaOf(route);
      expect(schema.operationId, name).toMatch(/^[a-z][a-z0-9]*(_[a-z0-9]+)*$/);
      expect(ids.has(schema.operationId!), `${name}: operationId used twice`).toBe(false);
      ids.add(schema.operationId!);
      expect(schema.summary, name).toBeTruthy();
      expect(schema.tags?.length, name).toBeGreaterThan(0);
      const success = ['200', '201', '202'].filter((status) => schema.response?.[status] !== undefined);
      expect(success.length, `${name}: no success schema`).toBeGreaterThan(0);
    }
  });

  it('answers 401 without credentials unless it is public', async () => {
    for (const { name, method, url } of table()) {
      if (PUBLIC.has(name)) continue;
      const path = url.replace(/:[a-z_]+/g, randomUUID());
      const response = await ctx.app.inject({ method: method as 'GET', url: path });
      expect(response.statusCode, name).toBe(401);
      expect(response.headers['www-authenticate'], name).toBe('Bearer');
    }
  });
});
