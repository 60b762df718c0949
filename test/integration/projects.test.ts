import { randomUUID } from 'node:crypto';

import { count, eq } from 'drizzle-orm';
import type { FastifyInstance, InjectOptions } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { TokenService } from '../../src/core/security.js';

import { apiKeys, projects, runs } from '../../src/models/index.js';

import { buildTestApp, useTestApp } from '../helpers/app.js';
import { bearer, createProject, createUser, type TestUser } from '../helpers/factories.js';
import { apiOf, call, createKey, expectValidationError, ISO_UTC, type ListBody, sleep, UUID } from '../helpers/http.js';
import { createFolder, uploaded } from '../helpers/knowledge.js';

const ctx = useTestApp();

// ==================== Helpers ====================

interface ProjectBody {
  id: string;
  owner_id: string;
  name: string;
  description: string | null;
  created_at: string;
  updated_at: string;
}

type ProjectList = ListBody<ProjectBody>;

const PROJECT_FIELDS = ['created_at', 'description', 'id', 'name', 'owner_id', 'updated_at'];
const NOT_FOUND = { detail: 'Project not found' };
/** The stats of a project that holds nothing. */
const NOTHING_HELD = { threads: 0, agents: 0, runs: 0, active_runs: 0, knowledge_folders: 0, knowledge_entries: 0, api_keys: 0, active_api_keys: 0 };
const api = apiOf(ctx);

function expectProjectShape(body: ProjectBody): void {
  expect(Object.keys(body).sort()).toEqual(PROJECT_FIELDS);
  expect(body.id).toMatch(UUID);
  expect(body.owner_id).toMatch(UUID);
  expect(body.created_at).toMatch(ISO_UTC);
  expect(body.updated_at).toMatch(ISO_UTC);
}

// ==================== Create and read ====================

describe('projects', () => {
  it('creates and reads a project', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers, 'First');
    const response = await ctx.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers: alice.headers });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toMatchObject({ id: project.id, name: 'First', owner_id: alice.user.id });
  });

  it("answers 404 for another user's project", async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    const response = await ctx.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers: bob.headers });
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual({ detail: 'Project not found' });
  });
});

describe('POST /projects', () => {
  it('answers ProjectPublic with exactly the public fields, ISO 8601 UTC timestamps', async () => {
    const alice = await createUser(ctx.app);
    const before = Date.now();
    const response = await api('POST', '/projects', alice.headers, { name: 'Apollo', description: 'To the moon' });
    expect(response.statusCode).toBe(200);
    expect(response.headers['content-type']).toMatch(/^application\/json/);
    const body = response.json<ProjectBody>();
    expectProjectShape(body);
    expect(body).toMatchObject({ owner_id: alice.user.id, name: 'Apollo', description: 'To the moon' });
    expect(body.created_at).toBe(body.updated_at);
    const created = Date.parse(body.created_at);
    expect(created).toBeGreaterThanOrEqual(before - 5_000);
    expect(created).toBeLessThanOrEqual(Date.now() + 5_000);

    // The row is really stored, owned by the caller, and the answer is that row.
    const [row] = await ctx.app.db.select().from(projects).where(eq(projects.id, body.id));
    expect(row).toMatchObject({ owner_id: alice.user.id, name: 'Apollo', description: 'To the moon' });
    expect(body).toEqual({ ...row, created_at: row!.created_at.toISOString(), updated_at: row!.updated_at.toISOString() });
    expect(response.headers.location).toBe(`/api/v1/projects/${body.id}`);
  });

  it('defaults description to null and trims the name', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('POST', '/projects', alice.headers, { name: '  Padded  ' });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toMatchObject({ name: 'Padded', description: null });
  });

  it('accepts an explicit null description and the longest allowed values', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('POST', '/projects', alice.headers, { name: 'n'.repeat(255), description: null });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toMatchObject({ name: 'n'.repeat(255), description: null });
    const long = await api('POST', '/projects', alice.headers, { name: 'Long', description: 'd'.repeat(10_000) });
    expect(long.statusCode).toBe(200);
    expect(long.json<ProjectBody>().description).toHaveLength(10_000);
  });

  it.each([
    ['a missing name', {}, ['body', 'name'], 'missing'],
    ['an empty name', { name: '' }, ['body', 'name'], 'string_too_short'],
    ['a blank name', { name: '   ' }, ['body', 'name'], 'string_too_short'],
    ['a null name', { name: null }, ['body', 'name'], undefined],
    ['a numeric name', { name: 42 }, ['body', 'name'], undefined],
    ['a name over 255 characters', { name: 'n'.repeat(256) }, ['body', 'name'], 'string_too_long'],
    ['a description over 10 000 characters', { name: 'P', description: 'd'.repeat(10_001) }, ['body', 'description'], 'string_too_long'],
    ['an unknown field', { name: 'P', colour: 'red' }, ['body', 'colour'], 'extra_forbidden'],
    ['a client-set id', { name: 'P', id: randomUUID() }, ['body', 'id'], 'extra_forbidden'],
    ['a client-set owner_id', { name: 'P', owner_id: randomUUID() }, ['body', 'owner_id'], 'extra_forbidden'],
    ['a client-set created_at', { name: 'P', created_at: new Date().toISOString() }, ['body', 'created_at'], 'extra_forbidden'],
    ['a client-set updated_at', { name: 'P', updated_at: new Date().toISOString() }, ['body', 'updated_at'], 'extra_forbidden'],
  ])('rejects %s with 422 and stores nothing', async (_label, payload, loc, type) => {
    const alice = await createUser(ctx.app);
    const response = await api('POST', '/projects', alice.headers, payload);
    expectValidationError(response, loc, type);
    const [row] = await ctx.app.db.select({ value: count() }).from(projects).where(eq(projects.owner_id, alice.user.id));
    expect(row?.value).toBe(0);
  });

  it('rejects a body that is not an object, and malformed JSON, with 422', async () => {
    const alice = await createUser(ctx.app);
    const array = await api('POST', '/projects', alice.headers, [{ name: 'P' }]);
    expect(array.statusCode).toBe(422);
    const broken = await ctx.app.inject({
      method: 'POST',
      url: '/api/v1/projects',
      headers: { ...alice.headers, 'content-type': 'application/json' },
      payload: '{"name": ',
    });
    expectValidationError(broken, ['body'], 'json_invalid');
  });

  it('answers 413 {detail} for a body over BODY_LIMIT_BYTES and stores nothing', async () => {
    const alice = await createUser(ctx.app);
    const limit = ctx.app.settings.BODY_LIMIT_BYTES;
    const payload = JSON.stringify({ name: 'Huge', description: 'x'.repeat(limit) });
    expect(Buffer.byteLength(payload)).toBeGreaterThan(limit);
    const response = await ctx.app.inject({
      method: 'POST',
      url: '/api/v1/projects',
      headers: { ...alice.headers, 'content-type': 'application/json' },
      payload,
    });
    expect(response.statusCode).toBe(413);
    expect(response.json()).toEqual({ detail: 'Request body too large' });
    const list = await api('GET', '/projects', alice.headers);
    expect(list.json<ProjectList>().count).toBe(0);
  });
});

// ==================== List ====================

describe('GET /projects', () => {
  it('lists only the caller’s projects, newest first, with the total count', async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const names = ['p1', 'p2', 'p3', 'p4', 'p5'];
    for (const name of names) await createProject(ctx.app, alice.headers, name);
    await createProject(ctx.app, bob.headers, 'bob-only');

    const response = await api('GET', '/projects', alice.headers);
    expect(response.statusCode).toBe(200);
    const body = response.json<ProjectList>();
    expect(Object.keys(body).sort()).toEqual(['count', 'data']);
    expect(body.count).toBe(5);
    expect(body.data.map((p) => p.name)).toEqual([...names].reverse());
    for (const project of body.data) {
      expectProjectShape(project);
      expect(project.owner_id).toBe(alice.user.id);
    }
    const created = body.data.map((p) => Date.parse(p.created_at));
    expect(created).toEqual([...created].sort((a, b) => b - a));
  });

  it('pages with limit and offset; count stays the total', async () => {
    const alice = await createUser(ctx.app);
    for (const name of ['a', 'b', 'c', 'd', 'e']) await createProject(ctx.app, alice.headers, name);

    const first = await api('GET', '/projects?limit=2', alice.headers);
    expect(first.statusCode).toBe(200);
    expect(first.json<ProjectList>()).toMatchObject({ count: 5 });
    expect(first.json<ProjectList>().data.map((p) => p.name)).toEqual(['e', 'd']);

    const second = await api('GET', '/projects?limit=2&offset=2', alice.headers);
    expect(second.json<ProjectList>().data.map((p) => p.name)).toEqual(['c', 'b']);
    expect(second.json<ProjectList>().count).toBe(5);

    const last = await api('GET', '/projects?limit=2&offset=4', alice.headers);
    expect(last.json<ProjectList>().data.map((p) => p.name)).toEqual(['a']);

    const beyond = await api('GET', '/projects?offset=50', alice.headers);
    expect(beyond.statusCode).toBe(200);
    expect(beyond.json()).toEqual({ data: [], count: 5 });

    const edges = await api('GET', '/projects?limit=1&offset=0', alice.headers);
    expect(edges.json<ProjectList>().data.map((p) => p.name)).toEqual(['e']);
    const max = await api('GET', '/projects?limit=100', alice.headers);
    expect(max.statusCode).toBe(200);
    expect(max.json<ProjectList>().data).toHaveLength(5);
  });

  it('defaults limit to 20', async () => {
    const alice = await createUser(ctx.app);
    for (let i = 0; i < 21; i++) await createProject(ctx.app, alice.headers, `p${i}`);
    const response = await api('GET', '/projects', alice.headers);
    expect(response.statusCode).toBe(200);
    const body = response.json<ProjectList>();
    expect(body.count).toBe(21);
    expect(body.data).toHaveLength(20);
    expect(body.data[0]?.name).toBe('p20');
    expect(body.data[19]?.name).toBe('p1');
  });

  it('answers an empty page for a user without projects', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('GET', '/projects', alice.headers);
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual({ data: [], count: 0 });
  });

  it.each(['skip=1', 'page=2', 'limit=5&sort=name'])('rejects the unknown parameter in ?%s with 422 naming the accepted ones', async (query) => {
    const alice = await createUser(ctx.app);
    const response = await api('GET', `/projects?${query}`, alice.headers);
    const unknown = query.split('&').map((pair) => pair.split('=')[0]!).find((name) => name !== 'limit')!;
    const body = expectValidationError(response, ['query', unknown], 'extra_forbidden');
    expect(body.detail).toEqual([{ loc: ['query', unknown], msg: 'Unknown query parameter; accepted: limit, offset', type: 'extra_forbidden' }]);
  });

  it('rejects a repeated parameter (?limit=1&limit=2) with a clear 422, not "received NaN"', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('GET', '/projects?limit=1&limit=2', alice.headers);
    const body = expectValidationError(response, ['query', 'limit']);
    expect(body.detail[0]?.type).toBe('float_parsing');
    expect(response.body).not.toContain('NaN');
  });

  it.each([
    ['limit=0', 'limit'],
    ['limit=101', 'limit'],
    ['limit=-1', 'limit'],
    ['limit=abc', 'limit'],
    ['limit=1.5', 'limit'],
    ['offset=-1', 'offset'],
    ['offset=abc', 'offset'],
  ])('rejects ?%s with 422', async (query, field) => {
    const alice = await createUser(ctx.app);
    const response = await api('GET', `/projects?${query}`, alice.headers);
    expectValidationError(response, ['query', field]);
  });
});

// ==================== Get, update, delete ====================

describe('GET /projects/{id}', () => {
  it('answers the project with exactly the public fields', async () => {
    const alice = await createUser(ctx.app);
    const created = (await api('POST', '/projects', alice.headers, { name: 'Read me', description: 'desc' })).json<ProjectBody>();
    const response = await api('GET', `/projects/${created.id}`, alice.headers);
    expect(response.statusCode).toBe(200);
    const body = response.json<ProjectBody>();
    expectProjectShape(body);
    expect(body).toEqual(created);
  });

  it('answers 404 for a missing project', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('GET', `/projects/${randomUUID()}`, alice.headers);
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual(NOT_FOUND);
  });
});

describe('PATCH /projects/{id}', () => {
  it('changes the given fields; updated_at moves on, created_at does not', async () => {
    const alice = await createUser(ctx.app);
    const created = (await api('POST', '/projects', alice.headers, { name: 'Old', description: 'old desc' })).json<ProjectBody>();
    await sleep(20);

    const response = await api('PATCH', `/projects/${created.id}`, alice.headers, { name: 'New' });
    expect(response.statusCode).toBe(200);
    const updated = response.json<ProjectBody>();
    expectProjectShape(updated);
    expect(updated).toMatchObject({ id: created.id, owner_id: alice.user.id, name: 'New', description: 'old desc' });
    expect(updated.created_at).toBe(created.created_at);
    expect(Date.parse(updated.updated_at)).toBeGreaterThan(Date.parse(created.updated_at));

    // Persisted.
    const read = await api('GET', `/projects/${created.id}`, alice.headers);
    expect(read.json()).toEqual(updated);

    await sleep(20);
    const cleared = await api('PATCH', `/projects/${created.id}`, alice.headers, { description: null });
    expect(cleared.statusCode).toBe(200);
    expect(cleared.json()).toMatchObject({ name: 'New', description: null, created_at: created.created_at });
    expect(Date.parse(cleared.json<ProjectBody>().updated_at)).toBeGreaterThan(Date.parse(updated.updated_at));
  });

  it('cannot hand the project to another user', async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    const response = await api('PATCH', `/projects/${project.id}`, alice.headers, { owner_id: bob.user.id });
    expectValidationError(response, ['body', 'owner_id'], 'extra_forbidden');
    expect((await api('GET', `/projects/${project.id}`, alice.headers)).json()).toMatchObject({ owner_id: alice.user.id });
    expect((await api('GET', `/projects/${project.id}`, bob.headers)).statusCode).toBe(404);
  });

  it('accepts an empty body and keeps every field', async () => {
    const alice = await createUser(ctx.app);
    const created = (await api('POST', '/projects', alice.headers, { name: 'Same', description: 'same' })).json<ProjectBody>();
    const response = await api('PATCH', `/projects/${created.id}`, alice.headers, {});
    expect(response.statusCode).toBe(200);
    expect(response.json()).toMatchObject({ id: created.id, name: 'Same', description: 'same', created_at: created.created_at });
  });

  it('trims the new name', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers, 'Before');
    const response = await api('PATCH', `/projects/${project.id}`, alice.headers, { name: '  After ' });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toMatchObject({ name: 'After' });
  });

  it.each([
    ['an unknown field', { colour: 'red' }, ['body', 'colour'], 'extra_forbidden'],
    ['an empty name', { name: '' }, ['body', 'name'], 'string_too_short'],
    ['a blank name', { name: '  ' }, ['body', 'name'], 'string_too_short'],
    ['a null name', { name: null }, ['body', 'name'], undefined],
    ['a name over 255 characters', { name: 'n'.repeat(256) }, ['body', 'name'], 'string_too_long'],
    ['a client-set owner_id', { owner_id: randomUUID() }, ['body', 'owner_id'], 'extra_forbidden'],
    ['a client-set id', { id: randomUUID() }, ['body', 'id'], 'extra_forbidden'],
    ['a client-set created_at', { created_at: '2000-01-01T00:00:00.000Z' }, ['body', 'created_at'], 'extra_forbidden'],
  ])('rejects %s with 422 and changes nothing', async (_label, payload, loc, type) => {
    const alice = await createUser(ctx.app);
    const created = (await api('POST', '/projects', alice.headers, { name: 'Stable', description: 'same' })).json<ProjectBody>();
    // A valid field next to the invalid one must not be applied either.
    const response = await api('PATCH', `/projects/${created.id}`, alice.headers, { name: 'Changed?', ...payload });
    expectValidationError(response, loc, type);
    const read = await api('GET', `/projects/${created.id}`, alice.headers);
    expect(read.json()).toEqual(created);
  });

  it('answers 404 for a missing project', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('PATCH', `/projects/${randomUUID()}`, alice.headers, { name: 'x' });
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual(NOT_FOUND);
  });
});

describe('DELETE /projects/{id}', () => {
  it('deletes the project; it answers 404 afterwards on every route', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers, 'Doomed');
    const response = await api('DELETE', `/projects/${project.id}`, alice.headers);
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual({ message: 'Project deleted successfully' });

    for (const [method, url, payload] of [
      ['GET', `/projects/${project.id}`, undefined],
      ['PATCH', `/projects/${project.id}`, { name: 'x' }],
      ['DELETE', `/projects/${project.id}`, undefined],
      ['GET', `/projects/${project.id}/stats`, undefined],
    ] as const) {
      const after = await api(method, url, alice.headers, payload);
      expect(after.statusCode, `${method} ${url}`).toBe(404);
      expect(after.json()).toEqual(NOT_FOUND);
    }
    expect((await api('GET', '/projects', alice.headers)).json()).toEqual({ data: [], count: 0 });
    expect(await ctx.app.db.select().from(projects).where(eq(projects.id, project.id))).toEqual([]);
  });

  it('deletes only the named project', async () => {
    const alice = await createUser(ctx.app);
    const keep = await createProject(ctx.app, alice.headers, 'Keep');
    const drop = await createProject(ctx.app, alice.headers, 'Drop');
    expect((await api('DELETE', `/projects/${drop.id}`, alice.headers)).statusCode).toBe(200);
    const list = (await api('GET', '/projects', alice.headers)).json<ProjectList>();
    expect(list.count).toBe(1);
    expect(list.data.map((p) => p.id)).toEqual([keep.id]);
  });
});

// ==================== Stats ====================

describe('GET /projects/{id}/stats', () => {

  it('answers zero counts for a new project', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    const response = await api('GET', `/projects/${project.id}/stats`, alice.headers);
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual({ project_id: project.id, ...NOTHING_HELD });
  });

  it('counts every kind of row the project groups: threads, agents, runs, knowledge folders and entries, keys', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers, 'Busy');
    const other = await createProject(ctx.app, alice.headers, 'Elsewhere');
    const inProject = { project_id: project.id };

    const agent = (await api('POST', '/agents', alice.headers, { name: 'Helper', model: 'gpt-4.1', ...inProject })).json<{ id: string; version: number }>();
    await api('POST', '/agents', alice.headers, { name: 'Unassigned', model: 'gpt-4.1' });
    const thread = (await api('POST', '/threads', alice.headers, { title: 'counted', ...inProject })).json<{ id: string }>();
    await api('POST', '/threads', alice.headers, { title: 'counted too', ...inProject });
    await api('POST', '/threads', alice.headers, { title: 'other project', project_id: other.id });
    await api('POST', '/threads', alice.headers, { title: 'no project' });
    const folder = await createFolder(ctx.app, alice.headers, { name: 'Docs', ...inProject });
    await createFolder(ctx.app, alice.headers, { name: 'Unassigned docs' });
    await uploaded(ctx.app, alice.headers, folder.id, { filename: 'a.txt', content: 'alpha' });
    await uploaded(ctx.app, alice.headers, folder.id, { filename: 'b.txt', content: 'beta' });
    await createKey(ctx.app, alice, { name: 'scoped', ...inProject });
    // Runs straight into the table: what they count is independent of a model answering them.
    const run = { owner_id: alice.user.id, thread_id: thread.id, agent_id: agent.id, agent_version: agent.version, model: 'gpt-4.1', ...inProject };
    await ctx.app.db.insert(runs).values([{ ...run, status: 'completed' }, { ...run, status: 'queued' }]);

    const response = await api('GET', `/projects/${project.id}/stats`, alice.headers);
    expect(response.statusCode, response.body).toBe(200);
    expect(response.json()).toEqual({
      project_id: project.id,
      threads: 2,
      agents: 1,
      runs: 2,
      active_runs: 1,
      knowledge_folders: 1,
      knowledge_entries: 2,
      api_keys: 1,
      active_api_keys: 1,
    });
    expect((await api('GET', `/projects/${other.id}/stats`, alice.headers)).json()).toEqual({ project_id: other.id, ...NOTHING_HELD, threads: 1 });
  });

  it("counts the project's keys and its active keys, not other projects' or unscoped ones", async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers, 'Counted');
    const other = await createProject(ctx.app, alice.headers, 'Other');
    const k1 = await createKey(ctx.app, alice, { name: 'k1', project_id: project.id });
    const k2 = await createKey(ctx.app, alice, { name: 'k2', project_id: project.id });
    await createKey(ctx.app, alice, { name: 'k3', project_id: project.id });
    await createKey(ctx.app, alice, { name: 'elsewhere', project_id: other.id });
    await createKey(ctx.app, alice, { name: 'unscoped' });

    const stats = async () => (await api('GET', `/projects/${project.id}/stats`, alice.headers)).json<unknown>();
    expect(await stats()).toEqual({ project_id: project.id, ...NOTHING_HELD, api_keys: 3, active_api_keys: 3 });

    expect((await api('PATCH', `/api-keys/${k1.id}`, alice.headers, { status: 'revoked' })).statusCode).toBe(200);
    expect(await stats()).toEqual({ project_id: project.id, ...NOTHING_HELD, api_keys: 3, active_api_keys: 2 });

    // An expired key is not active either.
    await ctx.app.db.update(apiKeys).set({ expires_at: new Date(Date.now() - 1_000) }).where(eq(apiKeys.id, k2.id));
    expect(await stats()).toEqual({ project_id: project.id, ...NOTHING_HELD, api_keys: 3, active_api_keys: 1 });

    expect((await api('DELETE', `/api-keys/${k1.id}`, alice.headers)).statusCode).toBe(200);
    expect(await stats()).toEqual({ project_id: project.id, ...NOTHING_HELD, api_keys: 2, active_api_keys: 1 });

    expect((await api('GET', `/projects/${other.id}/stats`, alice.headers)).json()).toEqual({
      project_id: other.id,
      ...NOTHING_HELD,
      api_keys: 1,
      active_api_keys: 1,
    });
  });

  it('answers 404 for a missing project', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('GET', `/projects/${randomUUID()}/stats`, alice.headers);
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual(NOT_FOUND);
  });
});

// ==================== Ownership, credentials, ids ====================

describe('ownership', () => {
  it("answers another user's project with 404, exactly like a missing one, on every route, and changes nothing", async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const created = (await api('POST', '/projects', alice.headers, { name: 'Private', description: 'secret' })).json<ProjectBody>();
    const missing = randomUUID();

    for (const [method, suffix, payload] of [
      ['GET', '', undefined],
      ['PATCH', '', { name: 'Hijacked' }],
      ['DELETE', '', undefined],
      ['GET', '/stats', undefined],
    ] as const) {
      const foreign = await api(method, `/projects/${created.id}${suffix}`, bob.headers, payload);
      const absent = await api(method, `/projects/${missing}${suffix}`, bob.headers, payload);
      expect(foreign.statusCode, `${method} ${suffix}`).toBe(404);
      expect(foreign.json()).toEqual(NOT_FOUND);
      expect(absent.statusCode).toBe(404);
      expect(foreign.body).toBe(absent.body);
      expect(foreign.headers['content-type']).toBe(absent.headers['content-type']);
    }

    // Bob's list does not show it, and Alice's project is untouched.
    expect((await api('GET', '/projects', bob.headers)).json()).toEqual({ data: [], count: 0 });
    expect((await api('GET', `/projects/${created.id}`, alice.headers)).json()).toEqual(created);
  });

  it("an API key cannot reach another user's project either", async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    const { key } = await createKey(ctx.app, bob, { name: 'bob key' });
    const response = await api('GET', `/projects/${project.id}`, bearer(key));
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual(NOT_FOUND);
  });
});

describe('superuser', () => {
  it("sees, lists, changes, counts and deletes everyone's projects", async () => {
    const admin = await createUser(ctx.app, { superuser: true });
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const a = await createProject(ctx.app, alice.headers, 'alice-project');
    const b = await createProject(ctx.app, bob.headers, 'bob-project');

    const read = await api('GET', `/projects/${a.id}`, admin.headers);
    expect(read.statusCode).toBe(200);
    expect(read.json()).toMatchObject({ id: a.id, owner_id: alice.user.id });

    const list = await api('GET', '/projects?limit=100', admin.headers);
    expect(list.statusCode).toBe(200);
    const body = list.json<ProjectList>();
    const [total] = await ctx.app.db.select({ value: count() }).from(projects);
    expect(body.count).toBe(total?.value);
    expect(body.count).toBeGreaterThanOrEqual(2);
    // Newest first: Bob's project was created last.
    expect(body.data[0]?.id).toBe(b.id);
    expect(body.data[1]?.id).toBe(a.id);

    const patched = await api('PATCH', `/projects/${b.id}`, admin.headers, { name: 'renamed by admin' });
    expect(patched.statusCode).toBe(200);
    // Ownership stays with the owner.
    expect(patched.json()).toMatchObject({ id: b.id, owner_id: bob.user.id, name: 'renamed by admin' });
    expect((await api('GET', `/projects/${b.id}`, bob.headers)).json()).toMatchObject({ name: 'renamed by admin' });

    const stats = await api('GET', `/projects/${b.id}/stats`, admin.headers);
    expect(stats.statusCode).toBe(200);
    expect(stats.json()).toEqual({ project_id: b.id, ...NOTHING_HELD });

    const deleted = await api('DELETE', `/projects/${a.id}`, admin.headers);
    expect(deleted.statusCode).toBe(200);
    expect((await api('GET', `/projects/${a.id}`, alice.headers)).statusCode).toBe(404);
  });

  it('owns the projects it creates itself', async () => {
    const admin = await createUser(ctx.app, { superuser: true });
    const project = await createProject(ctx.app, admin.headers);
    expect(project.owner_id).toBe(admin.user.id);
  });

  it("a regular user's list never includes the superuser's projects", async () => {
    const admin = await createUser(ctx.app, { superuser: true });
    const alice = await createUser(ctx.app);
    const adminProject = await createProject(ctx.app, admin.headers);
    expect((await api('GET', `/projects/${adminProject.id}`, alice.headers)).statusCode).toBe(404);
    expect((await api('GET', '/projects', alice.headers)).json()).toEqual({ data: [], count: 0 });
  });
});

describe('credentials', () => {
  const routes = (id: string) =>
    [
      ['GET', '/projects', undefined],
      ['POST', '/projects', { name: 'x' }],
      ['GET', `/projects/${id}`, undefined],
      ['PATCH', `/projects/${id}`, { name: 'x' }],
      ['DELETE', `/projects/${id}`, undefined],
      ['GET', `/projects/${id}/stats`, undefined],
    ] as const;

  it('answers 401 with WWW-Authenticate on every route without credentials', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    for (const [method, url, payload] of routes(project.id)) {
      const response = await api(method, url, {}, payload);
      expect(response.statusCode, `${method} ${url}`).toBe(401);
      expect(response.json()).toEqual({ detail: 'Not authenticated' });
      expect(response.headers['www-authenticate']).toBe('Bearer');
    }
    expect((await api('GET', `/projects/${project.id}`, alice.headers)).json()).toMatchObject({ name: 'Project' });
  });

  const otherSecret = new TokenService({ SECRET_KEY: 'another-secret-'.repeat(4), ACCESS_TOKEN_EXPIRE_MINUTES: 60, EMAIL_RESET_TOKEN_EXPIRE_HOURS: 1 });

  it.each([
    ['a garbage token', async () => ({ authorization: 'Bearer not-a-token' })],
    ['a forged API key', async () => ({ authorization: 'Bearer keel_forged' })],
    ['a forged X-API-Key', async () => ({ 'x-api-key': 'keel_forged' })],
    ['an access token signed with another secret', async (user: TestUser) => bearer(await otherSecret.create(user.user.id, user.user.token_version, 'access'))],
    ['a password-reset token', async (user: TestUser) => bearer(await ctx.app.tokens.create(user.user.id, user.user.token_version, 'reset'))],
  ])('answers 401 with WWW-Authenticate for %s', async (_label, makeHeaders) => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    const headers: Record<string, string> = await makeHeaders(alice);
    for (const [method, url, payload] of routes(project.id)) {
      const response = await api(method, url, headers, payload);
      expect(response.statusCode, `${method} ${url}`).toBe(401);
      expect(response.json()).toEqual({ detail: 'Could not validate credentials' });
      expect(response.headers['www-authenticate']).toBe('Bearer');
    }
  });

  it('answers 401 to a non-Bearer authorization scheme', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('GET', '/projects', { authorization: `Basic ${alice.token}` });
    expect(response.statusCode).toBe(401);
    expect(response.json()).toHaveProperty('detail');
  });

  it('answers 401 to the token of a deactivated user', async () => {
    const admin = await createUser(ctx.app, { superuser: true });
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    expect((await api('PATCH', `/users/${alice.user.id}`, admin.headers, { is_active: false })).statusCode).toBe(200);
    const response = await api('GET', `/projects/${project.id}`, alice.headers);
    expect(response.statusCode).toBe(401);
    expect(response.json()).toEqual({ detail: 'Could not validate credentials' });
  });

  it('answers 401 before validating the path or the body', async () => {
    const response = await api('PATCH', '/projects/not-a-uuid', {}, { bogus: true });
    expect(response.statusCode).toBe(401);
  });

  it.each(['not-a-uuid', '123', `${randomUUID()}x`, randomUUID().replace(/-/g, '')])('answers 422 for the malformed id %s on every route', async (bad) => {
    const alice = await createUser(ctx.app);
    for (const [method, url, payload] of routes(bad).filter(([, url]) => url !== '/projects')) {
      const response = await api(method, url, alice.headers, payload);
      expect(response.statusCode, `${method} ${url}`).toBe(422);
      expectValidationError(response, ['path', 'project_id']);
    }
  });
});

// ==================== Limits (an app of their own) ====================

describe('MAX_PROJECTS_PER_USER', () => {
  let limited: FastifyInstance;
  const LIMIT = 2;
  const send = (method: InjectOptions['method'], url: string, headers: Record<string, string>, payload?: unknown) =>
    call(limited, method, url, headers, payload);
  const newUser = (): Promise<TestUser> => createUser(limited);

  beforeAll(async () => {
    limited = await buildTestApp(ctx.database, { MAX_PROJECTS_PER_USER: String(LIMIT), BODY_LIMIT_BYTES: '2048' });
  });
  afterAll(async () => {
    await limited?.close();
  });

  it('answers 409 beyond the limit; deleting one frees a place; the limit is per user', async () => {
    const alice = await newUser();
    const bob = await newUser();
    for (let i = 0; i < LIMIT; i++) expect((await send('POST', '/projects', alice.headers, { name: `p${i}` })).statusCode).toBe(200);

    const over = await send('POST', '/projects', alice.headers, { name: 'one too many' });
    expect(over.statusCode).toBe(409);
    expect(over.json()).toEqual({ detail: `Project limit reached (${LIMIT} per user)` });
    expect((await send('GET', '/projects', alice.headers)).json<ProjectList>().count).toBe(LIMIT);

    // Another user is not affected.
    expect((await send('POST', '/projects', bob.headers, { name: 'bob' })).statusCode).toBe(200);

    const first = (await send('GET', '/projects', alice.headers)).json<ProjectList>().data[0]!;
    expect((await send('DELETE', `/projects/${first.id}`, alice.headers)).statusCode).toBe(200);
    expect((await send('POST', '/projects', alice.headers, { name: 'again' })).statusCode).toBe(200);
    expect((await send('POST', '/projects', alice.headers, { name: 'and over again' })).statusCode).toBe(409);
  });

  it('holds under concurrent creation', async () => {
    const alice = await newUser();
    // Warm the connection pool, so that the creations really run side by side (server mode).
    await Promise.all(Array.from({ length: 10 }, () => send('GET', '/projects', alice.headers)));
    const attempts = 8;
    const responses = await Promise.all(
      Array.from({ length: attempts }, (_, i) => send('POST', '/projects', alice.headers, { name: `race-${i}` })),
    );
    const statuses = responses.map((r) => r.statusCode).sort();
    expect(statuses.filter((s) => s === 200)).toHaveLength(LIMIT);
    expect(statuses.filter((s) => s === 409)).toHaveLength(attempts - LIMIT);
    for (const response of responses.filter((r) => r.statusCode === 409)) {
      expect(response.json()).toEqual({ detail: `Project limit reached (${LIMIT} per user)` });
    }
    const [row] = await limited.db.select({ value: count() }).from(projects).where(eq(projects.owner_id, alice.user.id));
    expect(row?.value).toBe(LIMIT);
  });

  it('holds under concurrent creation by several users at once, each to their own limit', async () => {
    const users = await Promise.all([newUser(), newUser(), newUser()]);
    const responses = await Promise.all(
      users.flatMap((user) => Array.from({ length: 4 }, (_, i) => send('POST', '/projects', user.headers, { name: `r${i}` }))),
    );
    expect(responses.filter((r) => r.statusCode === 200)).toHaveLength(users.length * LIMIT);
    expect(responses.every((r) => r.statusCode === 200 || r.statusCode === 409)).toBe(true);
    for (const user of users) {
      const [row] = await limited.db.select({ value: count() }).from(projects).where(eq(projects.owner_id, user.user.id));
      expect(row?.value).toBe(LIMIT);
    }
  });

  it('accepts a body just under BODY_LIMIT_BYTES and answers 413 {detail} just over it', async () => {
    const alice = await newUser();
    const limit = limited.settings.BODY_LIMIT_BYTES;
    expect(limit).toBe(2048);
    const body = (size: number) => {
      const skeleton = JSON.stringify({ name: 'Edge', description: '' });
      return JSON.stringify({ name: 'Edge', description: 'x'.repeat(size - skeleton.length) });
    };
    const headers = { ...alice.headers, 'content-type': 'application/json' };

    const fits = await limited.inject({ method: 'POST', url: '/api/v1/projects', headers, payload: body(limit) });
    expect(Buffer.byteLength(body(limit))).toBe(limit);
    expect(fits.statusCode).toBe(200);

    const over = await limited.inject({ method: 'POST', url: '/api/v1/projects', headers, payload: body(limit + 1) });
    expect(over.statusCode).toBe(413);
    expect(over.json()).toEqual({ detail: 'Request body too large' });

    const patch = await limited.inject({
      method: 'PATCH',
      url: `/api/v1/projects/${fits.json<ProjectBody>().id}`,
      headers,
      payload: JSON.stringify({ description: 'y'.repeat(limit) }),
    });
    expect(patch.statusCode).toBe(413);
    expect(patch.json()).toEqual({ detail: 'Request body too large' });
    expect((await send('GET', '/projects', alice.headers)).json<ProjectList>().count).toBe(1);
  });
});

describe('concurrent project reads (batched into shared queries)', () => {
  it('gives each request its own answer, ownership included, when many arrive at once', async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const mine = await Promise.all([1, 2, 3].map((i) => createProject(ctx.app, alice.headers, `A${i}`)));
    const theirs = await createProject(ctx.app, bob.headers, 'B');
    const missing = '00000000-0000-4000-8000-000000000000';
    const ids = [...mine.map((p) => p.id), theirs.id, missing, mine[0]!.id];
    const responses = await Promise.all(
      ids.map((id) => ctx.app.inject({ method: 'GET', url: `/api/v1/projects/${id}`, headers: alice.headers })),
    );
    expect(responses.map((r) => r.statusCode)).toEqual([200, 200, 200, 404, 404, 200]);
    expect(responses.slice(0, 3).map((r) => r.json<{ name: string }>().name)).toEqual(['A1', 'A2', 'A3']);
  });
});
