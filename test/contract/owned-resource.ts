import { randomUUID } from 'node:crypto';

import type { FastifyInstance } from 'fastify';
import { describe, expect, it } from 'vitest';

import type { ScopedKeyAccess } from '../../src/utils/access.js';
import type { TestContext } from '../helpers/app.js';
import { bearer, createProject, createUser, type TestUser } from '../helpers/factories.js';
import { call, createKey, expectValidationError, type ListBody, type Method } from '../helpers/http.js';

/** What the contract needs to know of an owned resource. */
export interface OwnedResourceContract {
  /** The collection's path under /api/v1: `/projects`; nested under a parent: `/threads/:thread_id/messages`. */
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
  /**
   * A nested resource's parent: how to make one for `owner` (in `projectId` when given) and its
   * 404 message — what another user's parent, and so every row in it, answers.
   */
  parent?: { create: (app: FastifyInstance, owner: TestUser, projectId?: string) => Promise<string>; notFound: string };
  /** The list order: newest first (the default) or oldest first (creation order). */
  order?: 'newest' | 'oldest';
}

interface Row {
  id: string;
}

/** A row and the collection it lives in. */
interface Placed {
  collection: string;
  id: string;
}

const SCOPED = { detail: 'This API key is limited to one project' };

/**
 * The contract every owned resource keeps, as tests: authentication, 404 for another user's row
 * exactly as for a missing one, 422 for malformed ids and unknown fields, paging and order,
 * superuser visibility and the project-scoped key rules. One call per resource; a nested resource
 * (`parent`) keeps it in a parent of its owner, whose visibility it inherits.
 */
export function ownedResourceContract(ctx: TestContext, contract: OwnedResourceContract): void {
  const { path, notFound, parent } = contract;
  const parentParam = /:(\w+)/.exec(path)?.[1];
  /** What another user's row answers: the parent's 404 when nested (the row is never reached). */
  const foreignNotFound = parent?.notFound ?? notFound;
  const api = (method: Method, url: string, headers: Record<string, string> = {}, payload?: unknown) => call(ctx.app, method, url, headers, payload);

  /** A collection of `owner`'s: the path itself, or a new parent's (in `projectId` when given). */
  async function collection(owner: TestUser, projectId?: string): Promise<string> {
    if (!parent) return path;
    return path.replace(/:\w+/, await parent.create(ctx.app, owner, projectId));
  }

  async function create(owner: TestUser, at: string, body: Record<string, unknown> = contract.create): Promise<Row> {
    const response = await api('POST', at, owner.headers, body);
    expect(response.statusCode, response.body).toBe(200);
    const row = response.json<Row>();
    expect(response.headers.location).toBe(`/api/v1${at}/${row.id}`);
    return row;
  }

  async function inProject(owner: TestUser, projectId: string): Promise<Placed> {
    if (parent) {
      const at = await collection(owner, projectId);
      return { collection: at, id: (await create(owner, at)).id };
    }
    const id = contract.inProject ? await contract.inProject(ctx.app, owner, projectId) : (await create(owner, path, { ...contract.create, project_id: projectId })).id;
    return { collection: path, id };
  }

  /** Every route of the resource for the row `id` in `at`, with a body where it takes one. */
  const routes = (at: string, id: string) =>
    [
      ['GET', at, undefined],
      ['POST', at, contract.create],
      ['GET', `${at}/${id}`, undefined],
      ['PATCH', `${at}/${id}`, contract.update],
      ['DELETE', `${at}/${id}`, undefined],
    ] as const;

  const ids = async (at: string, headers: Record<string, string>) => (await api('GET', `${at}?limit=100`, headers)).json<ListBody<Row>>();

  describe(`owned resource ${path}`, () => {
    it('answers 401 on every route without credentials', async () => {
      const alice = await createUser(ctx.app);
      const at = await collection(alice);
      const row = await create(alice, at);
      for (const [method, url, payload] of routes(at, row.id)) {
        const response = await api(method, url, {}, payload);
        expect(response.statusCode, `${method} ${url}`).toBe(401);
        expect(response.json()).toEqual({ detail: 'Not authenticated' });
      }
    });

    it("answers another user's row exactly as a missing one (404), and leaves it alone", async () => {
      const alice = await createUser(ctx.app);
      const bob = await createUser(ctx.app);
      const at = await collection(alice);
      const row = await create(alice, at);
      const before = (await api('GET', `${at}/${row.id}`, alice.headers)).body;
      const missing = randomUUID();
      for (const [method, payload] of [['GET', undefined], ['PATCH', contract.update], ['PATCH', {}], ['DELETE', undefined]] as const) {
        const foreign = await api(method, `${at}/${row.id}`, bob.headers, payload);
        const absent = await api(method, `${at}/${missing}`, bob.headers, payload);
        expect(foreign.statusCode, method).toBe(404);
        expect(foreign.json()).toEqual({ detail: foreignNotFound });
        expect(foreign.body).toBe(absent.body);
        expect(foreign.headers['content-type']).toBe(absent.headers['content-type']);
      }
      const bobs = await collection(bob);
      expect((await ids(bobs, bob.headers)).data.map((r) => r.id)).not.toContain(row.id);
      if (parent) {
        // Alice's parent is out of Bob's reach: its list and creation answer 404 too...
        for (const [method, payload] of [['GET', undefined], ['POST', contract.create]] as const) {
          const response = await api(method, at, bob.headers, payload);
          expect(response.statusCode, `${method} ${at}`).toBe(404);
          expect(response.json()).toEqual({ detail: parent.notFound });
        }
        // ...and her row, asked for in a parent of Bob's own, is not in it.
        for (const [method, payload] of [['GET', undefined], ['PATCH', contract.update], ['DELETE', undefined]] as const) {
          const response = await api(method, `${bobs}/${row.id}`, bob.headers, payload);
          expect(response.statusCode, method).toBe(404);
          expect(response.json()).toEqual({ detail: notFound });
        }
      }
      expect((await api('GET', `${at}/${row.id}`, alice.headers)).body).toBe(before);
      expect((await ids(at, alice.headers)).count).toBe(1);
    });

    it('reads, changes and deletes a row named by its id in capitals (the same UUID)', async () => {
      const alice = await createUser(ctx.app);
      const at = await collection(alice);
      const upper = (url: string) => url.replace(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/g, (id) => id.toUpperCase());
      const row = await create(alice, at);
      const got = await api('GET', upper(`${at}/${row.id}`), alice.headers);
      expect(got.statusCode, got.body).toBe(200);
      expect(got.json<Row>().id).toBe(row.id);
      expect((await api('PATCH', upper(`${at}/${row.id}`), alice.headers, contract.update)).statusCode).toBe(200);
      expect((await api('DELETE', upper(`${at}/${row.id}`), alice.headers)).statusCode).toBe(200);
      expect((await api('GET', `${at}/${row.id}`, alice.headers)).statusCode).toBe(404);
    });

    it('answers 422 for a malformed id, unknown fields and unknown query parameters', async () => {
      const alice = await createUser(ctx.app);
      const at = await collection(alice);
      for (const [method, url, payload] of routes(at, 'not-a-uuid').slice(2)) {
        expectValidationError(await api(method, url, alice.headers, payload), ['path', contract.idParam]);
      }
      if (parentParam) {
        for (const [method, url, payload] of routes(path.replace(/:\w+/, 'not-a-uuid'), randomUUID())) {
          expectValidationError(await api(method, url, alice.headers, payload), ['path', parentParam]);
        }
      }
      expectValidationError(await api('POST', at, alice.headers, { ...contract.create, unknown_field: 1 }), ['body', 'unknown_field'], 'extra_forbidden');
      const row = await create(alice, at);
      const before = (await api('GET', `${at}/${row.id}`, alice.headers)).body;
      expectValidationError(await api('PATCH', `${at}/${row.id}`, alice.headers, { ...contract.update, unknown_field: 1 }), ['body', 'unknown_field'], 'extra_forbidden');
      for (const body of contract.invalidCreates ?? []) expect((await api('POST', at, alice.headers, body)).statusCode, JSON.stringify(body)).toBe(422);
      for (const body of contract.invalidUpdates ?? []) expect((await api('PATCH', `${at}/${row.id}`, alice.headers, body)).statusCode, JSON.stringify(body)).toBe(422);
      expect((await api('GET', `${at}/${row.id}`, alice.headers)).body).toBe(before);
      expectValidationError(await api('GET', `${at}?skip=1`, alice.headers), ['query', 'skip'], 'extra_forbidden');
      // Nothing was created by the refused requests.
      expect((await api('GET', at, alice.headers)).json<ListBody<Row>>().count).toBe(1);
    });

    const newest = (contract.order ?? 'newest') === 'newest';
    it(`lists the caller’s rows ${newest ? 'newest' : 'oldest'} first, paged, with the total`, async () => {
      const alice = await createUser(ctx.app);
      const bob = await createUser(ctx.app);
      const at = await collection(alice);
      const rows = [];
      for (let i = 0; i < 3; i++) rows.push(await create(alice, at));
      await create(bob, await collection(bob));
      const [a, b, c] = rows.map((row) => row.id);
      const first = (await api('GET', `${at}?limit=2`, alice.headers)).json<ListBody<Row>>();
      expect(first.count).toBe(3);
      expect(first.data.map((row) => row.id)).toEqual(newest ? [c, b] : [a, b]);
      const second = (await api('GET', `${at}?limit=2&offset=2`, alice.headers)).json<ListBody<Row>>();
      expect(second).toMatchObject({ count: 3 });
      expect(second.data.map((row) => row.id)).toEqual(newest ? [a] : [c]);
      expect((await api('GET', `${at}?offset=5`, alice.headers)).json()).toEqual({ data: [], count: 3 });
    });

    it(contract.superuserSeesAll ? "lets a superuser read, change and delete any user's row" : "keeps rows personal: a superuser gets 404 for another user's", async () => {
      const admin = await createUser(ctx.app, { superuser: true });
      const alice = await createUser(ctx.app);
      const at = await collection(alice);
      const row = await create(alice, at);
      const expected = contract.superuserSeesAll ? 200 : 404;
      expect((await api('GET', `${at}/${row.id}`, admin.headers)).statusCode).toBe(expected);
      // A nested list in a parent out of reach answers 404 (no data).
      const listed = (await ids(at, admin.headers)).data?.map((r) => r.id) ?? [];
      expect(listed.includes(row.id)).toBe(contract.superuserSeesAll);
      expect((await api('PATCH', `${at}/${row.id}`, admin.headers, contract.update)).statusCode).toBe(expected);
      expect((await api('DELETE', `${at}/${row.id}`, admin.headers)).statusCode).toBe(expected);
      expect((await api('GET', `${at}/${row.id}`, alice.headers)).statusCode).toBe(contract.superuserSeesAll ? 404 : 200);
    });

    describe(`a project-scoped key (${contract.scopedKey})`, () => {
      async function setup() {
        const alice = await createUser(ctx.app);
        const project = await createProject(ctx.app, alice.headers, 'Scope');
        const other = await createProject(ctx.app, alice.headers, 'Other');
        const inside = await inProject(alice, project.id);
        const outside = await inProject(alice, other.id);
        const key = await createKey(ctx.app, alice, { name: 'scoped', project_id: project.id });
        return { alice, project, other, inside, outside, headers: bearer(key.key) };
      }

      if (contract.scopedKey === 'none') {
        it('is refused (403) on every route, even for its own project’s rows', async () => {
          const { inside, headers } = await setup();
          for (const [method, url, payload] of routes(inside.collection, inside.id)) {
            const response = await api(method, url, headers, payload);
            expect(response.statusCode, `${method} ${url}`).toBe(403);
            expect(response.json()).toEqual(SCOPED);
          }
        });
        return;
      }

      it('reads and lists only its project’s rows; others answer 404', async () => {
        const { inside, outside, headers } = await setup();
        expect((await api('GET', `${inside.collection}/${inside.id}`, headers)).statusCode).toBe(200);
        const foreign = await api('GET', `${outside.collection}/${outside.id}`, headers);
        expect(foreign.statusCode).toBe(404);
        expect(foreign.json()).toEqual({ detail: foreignNotFound });
        const list = await ids(inside.collection, headers);
        expect(list.data.map((row) => row.id)).toEqual([inside.id]);
        expect(list.count).toBe(1);
        if (parent) expect((await api('GET', outside.collection, headers)).statusCode).toBe(404);
      });

      if (contract.scopedKey === 'read') {
        it('may not create, change or delete (403), and changes nothing', async () => {
          const { alice, inside, headers } = await setup();
          const item = `${inside.collection}/${inside.id}`;
          const before = (await api('GET', item, alice.headers)).body;
          const countBefore = (await api('GET', inside.collection, alice.headers)).json<ListBody<Row>>().count;
          for (const [method, url, payload] of [...routes(inside.collection, inside.id).filter(([method]) => method !== 'GET'), ['PATCH', item, {}]] as const) {
            const response = await api(method, url, headers, payload);
            expect(response.statusCode, `${method} ${url}`).toBe(403);
            expect(response.json()).toEqual(SCOPED);
          }
          expect((await api('GET', item, alice.headers)).body).toBe(before);
          expect((await api('GET', inside.collection, alice.headers)).json<ListBody<Row>>().count).toBe(countBefore);
        });
      } else {
        it('changes and deletes only its project’s rows, and creates only in its project', async () => {
          const { project, other, inside, outside, headers } = await setup();
          expect((await api('PATCH', `${inside.collection}/${inside.id}`, headers, contract.update)).statusCode).toBe(200);
          expect((await api('PATCH', `${outside.collection}/${outside.id}`, headers, contract.update)).statusCode).toBe(404);
          expect((await api('DELETE', `${outside.collection}/${outside.id}`, headers)).statusCode).toBe(404);
          if (parent) {
            // Its project's parents take new rows; another project's are out of reach.
            expect((await api('POST', outside.collection, headers, contract.create)).statusCode).toBe(404);
            expect((await api('POST', inside.collection, headers, contract.create)).statusCode).toBe(200);
          } else {
            expect((await api('POST', path, headers, { ...contract.create, project_id: other.id })).statusCode).toBe(403);
            expect((await api('POST', path, headers, { ...contract.create, project_id: project.id })).statusCode).toBe(200);
          }
          expect((await api('DELETE', `${inside.collection}/${inside.id}`, headers)).statusCode).toBe(200);
        });
      }
    });
  });
}
