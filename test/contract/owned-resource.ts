import { randomUUID } from 'node:crypto';

import type { FastifyInstance } from 'fastify';
import { describe, expect, it } from 'vitest';

import type { ScopedKeyAccess } from '../../src/utils/access.js';
import type { TestContext } from '../helpers/app.js';
import { bearer, createProject, createUser, type TestUser } from '../helpers/factories.js';
import { call, createKey, expectValidationError, type ListBody, type Method } from '../helpers/http.js';

/** What the contract needs to know of an owned resource. */
export interface OwnedResourceContract {
  /** The collection's path under /api/v1: `/projects`. */
  path: string;
  /** The id's path parameter: `project_id`. */
  idParam: string;
  /** The 404 message: `Project not found`. */
  notFound: string;
  /** A valid creation body and a valid change. */
  create: Record<string, unknown>;
  update: Record<string, unknown>;
  /** Bodies each answered 422, besides the unknown field the contract always tries. */
  invalidCreates?: Record<string, unknown>[];
  invalidUpdates?: Record<string, unknown>[];
  superuserSeesAll: boolean;
  scopedKey: ScopedKeyAccess;
  /** A row of `owner` inside project `projectId` (the scoped-key rules); default: create with `project_id`. */
  inProject?: (app: FastifyInstance, owner: TestUser, projectId: string) => Promise<string>;
}

interface Row {
  id: string;
}

const SCOPED = { detail: 'This API key is limited to one project' };

/**
 * The contract every owned resource keeps, as tests: authentication, 404 for another user's row
 * exactly as for a missing one, 422 for malformed ids and unknown fields, paging and order,
 * superuser visibility and the project-scoped key rules. One call per resource.
 */
export function ownedResourceContract(ctx: TestContext, contract: OwnedResourceContract): void {
  const { path, notFound } = contract;
  const api = (method: Method, url: string, headers: Record<string, string> = {}, payload?: unknown) => call(ctx.app, method, url, headers, payload);

  async function create(owner: TestUser, body: Record<string, unknown> = contract.create): Promise<Row> {
    const response = await api('POST', path, owner.headers, body);
    expect(response.statusCode, response.body).toBe(200);
    const row = response.json<Row>();
    expect(response.headers.location).toBe(`/api/v1${path}/${row.id}`);
    return row;
  }

  const inProject =
    contract.inProject ?? (async (_app: FastifyInstance, owner: TestUser, projectId: string) => (await create(owner, { ...contract.create, project_id: projectId })).id);

  /** Every route of the resource for the row `id`, with a body where it takes one. */
  const routes = (id: string) =>
    [
      ['GET', path, undefined],
      ['POST', path, contract.create],
      ['GET', `${path}/${id}`, undefined],
      ['PATCH', `${path}/${id}`, contract.update],
      ['DELETE', `${path}/${id}`, undefined],
    ] as const;

  describe(`owned resource ${path}`, () => {
    it('answers 401 on every route without credentials', async () => {
      const alice = await createUser(ctx.app);
      const row = await create(alice);
      for (const [method, url, payload] of routes(row.id)) {
        const response = await api(method, url, {}, payload);
        expect(response.statusCode, `${method} ${url}`).toBe(401);
        expect(response.json()).toEqual({ detail: 'Not authenticated' });
      }
    });

    it("answers another user's row exactly as a missing one (404), and leaves it alone", async () => {
      const alice = await createUser(ctx.app);
      const bob = await createUser(ctx.app);
      const row = await create(alice);
      const before = (await api('GET', `${path}/${row.id}`, alice.headers)).body;
      const missing = randomUUID();
      for (const [method, payload] of [['GET', undefined], ['PATCH', contract.update], ['PATCH', {}], ['DELETE', undefined]] as const) {
        const foreign = await api(method, `${path}/${row.id}`, bob.headers, payload);
        const absent = await api(method, `${path}/${missing}`, bob.headers, payload);
        expect(foreign.statusCode, method).toBe(404);
        expect(foreign.json()).toEqual({ detail: notFound });
        expect(foreign.body).toBe(absent.body);
        expect(foreign.headers['content-type']).toBe(absent.headers['content-type']);
      }
      expect((await api('GET', path, bob.headers)).json<ListBody<Row>>().data.map((r) => r.id)).not.toContain(row.id);
      expect((await api('GET', `${path}/${row.id}`, alice.headers)).body).toBe(before);
    });

    it('answers 422 for a malformed id, unknown fields and unknown query parameters', async () => {
      const alice = await createUser(ctx.app);
      for (const [method, url, payload] of routes('not-a-uuid').slice(2)) {
        expectValidationError(await api(method, url, alice.headers, payload), ['path', contract.idParam]);
      }
      expectValidationError(await api('POST', path, alice.headers, { ...contract.create, unknown_field: 1 }), ['body', 'unknown_field'], 'extra_forbidden');
      const row = await create(alice);
      const before = (await api('GET', `${path}/${row.id}`, alice.headers)).body;
      expectValidationError(await api('PATCH', `${path}/${row.id}`, alice.headers, { ...contract.update, unknown_field: 1 }), ['body', 'unknown_field'], 'extra_forbidden');
      for (const body of contract.invalidCreates ?? []) expect((await api('POST', path, alice.headers, body)).statusCode, JSON.stringify(body)).toBe(422);
      for (const body of contract.invalidUpdates ?? []) expect((await api('PATCH', `${path}/${row.id}`, alice.headers, body)).statusCode, JSON.stringify(body)).toBe(422);
      expect((await api('GET', `${path}/${row.id}`, alice.headers)).body).toBe(before);
      expectValidationError(await api('GET', `${path}?skip=1`, alice.headers), ['query', 'skip'], 'extra_forbidden');
      // Nothing was created by the refused requests.
      expect((await api('GET', path, alice.headers)).json<ListBody<Row>>().count).toBe(1);
    });

    it('lists the caller’s rows newest first, paged, with the total', async () => {
      const alice = await createUser(ctx.app);
      const bob = await createUser(ctx.app);
      const rows = [];
      for (let i = 0; i < 3; i++) rows.push(await create(alice));
      await create(bob);
      const [a, b, c] = rows.map((row) => row.id);
      const first = (await api('GET', `${path}?limit=2`, alice.headers)).json<ListBody<Row>>();
      expect(first.count).toBe(3);
      expect(first.data.map((row) => row.id)).toEqual([c, b]);
      const second = (await api('GET', `${path}?limit=2&offset=2`, alice.headers)).json<ListBody<Row>>();
      expect(second).toMatchObject({ count: 3 });
      expect(second.data.map((row) => row.id)).toEqual([a]);
      expect((await api('GET', `${path}?offset=5`, alice.headers)).json()).toEqual({ data: [], count: 3 });
    });

    it(contract.superuserSeesAll ? "lets a superuser read, change and delete any user's row" : "keeps rows personal: a superuser gets 404 for another user's", async () => {
      const admin = await createUser(ctx.app, { superuser: true });
      const alice = await createUser(ctx.app);
      const row = await create(alice);
      const expected = contract.superuserSeesAll ? 200 : 404;
      expect((await api('GET', `${path}/${row.id}`, admin.headers)).statusCode).toBe(expected);
      const listed = (await api('GET', `${path}?limit=100`, admin.headers)).json<ListBody<Row>>().data.map((r) => r.id);
      expect(listed.includes(row.id)).toBe(contract.superuserSeesAll);
      expect((await api('PATCH', `${path}/${row.id}`, admin.headers, contract.update)).statusCode).toBe(expected);
      expect((await api('DELETE', `${path}/${row.id}`, admin.headers)).statusCode).toBe(expected);
      expect((await api('GET', `${path}/${row.id}`, alice.headers)).statusCode).toBe(contract.superuserSeesAll ? 404 : 200);
    });

    describe(`a project-scoped key (${contract.scopedKey})`, () => {
      async function setup() {
        const alice = await createUser(ctx.app);
        const project = await createProject(ctx.app, alice.headers, 'Scope');
        const other = await createProject(ctx.app, alice.headers, 'Other');
        const inside = await inProject(ctx.app, alice, project.id);
        const outside = await inProject(ctx.app, alice, other.id);
        const key = await createKey(ctx.app, alice, { name: 'scoped', project_id: project.id });
        return { alice, project, other, inside, outside, headers: bearer(key.key) };
      }

      if (contract.scopedKey === 'none') {
        it('is refused (403) on every route, even for its own project’s rows', async () => {
          const { inside, headers } = await setup();
          for (const [method, url, payload] of routes(inside)) {
            const response = await api(method, url, headers, payload);
            expect(response.statusCode, `${method} ${url}`).toBe(403);
            expect(response.json()).toEqual(SCOPED);
          }
        });
        return;
      }

      it('reads and lists only its project’s rows; others answer 404', async () => {
        const { inside, outside, headers } = await setup();
        expect((await api('GET', `${path}/${inside}`, headers)).statusCode).toBe(200);
        const foreign = await api('GET', `${path}/${outside}`, headers);
        expect(foreign.statusCode).toBe(404);
        expect(foreign.json()).toEqual({ detail: notFound });
        const list = (await api('GET', `${path}?limit=100`, headers)).json<ListBody<Row>>();
        expect(list.data.map((row) => row.id)).toEqual([inside]);
        expect(list.count).toBe(1);
      });

      if (contract.scopedKey === 'read') {
        it('may not create, change or delete (403), and changes nothing', async () => {
          const { alice, inside, headers } = await setup();
          const before = (await api('GET', `${path}/${inside}`, alice.headers)).body;
          const countBefore = (await api('GET', path, alice.headers)).json<ListBody<Row>>().count;
          for (const [method, url, payload] of [...routes(inside).filter(([method]) => method !== 'GET'), ['PATCH', `${path}/${inside}`, {}]] as const) {
            const response = await api(method, url, headers, payload);
            expect(response.statusCode, `${method} ${url}`).toBe(403);
            expect(response.json()).toEqual(SCOPED);
          }
          expect((await api('GET', `${path}/${inside}`, alice.headers)).body).toBe(before);
          expect((await api('GET', path, alice.headers)).json<ListBody<Row>>().count).toBe(countBefore);
        });
      } else {
        it('changes and deletes only its project’s rows, and creates only in its project', async () => {
          const { project, other, inside, outside, headers } = await setup();
          expect((await api('PATCH', `${path}/${inside}`, headers, contract.update)).statusCode).toBe(200);
          expect((await api('PATCH', `${path}/${outside}`, headers, contract.update)).statusCode).toBe(404);
          expect((await api('DELETE', `${path}/${outside}`, headers)).statusCode).toBe(404);
          expect((await api('POST', path, headers, { ...contract.create, project_id: other.id })).statusCode).toBe(403);
          expect((await api('POST', path, headers, { ...contract.create, project_id: project.id })).statusCode).toBe(200);
          expect((await api('DELETE', `${path}/${inside}`, headers)).statusCode).toBe(200);
        });
      }
    });
  });
}
