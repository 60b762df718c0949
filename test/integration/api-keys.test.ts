import { createHash, randomUUID } from 'node:crypto';

import { count, eq } from 'drizzle-orm';
import type { FastifyInstance, InjectOptions } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { apiKeys } from '../../src/models/index.js';

import { buildTestApp, useTestApp } from '../helpers/app.js';
import { bearer, createProject, createUser } from '../helpers/factories.js';
import { apiOf, call, type CreatedKey, createKey, expectValidationError, ISO_UTC, type KeyBody, type ListBody, sleep, UUID, xApiKey } from '../helpers/http.js';

const ctx = useTestApp();

// ==================== Helpers ====================

type KeyList = ListBody<KeyBody>;

interface UserBody {
  id: string;
  email: string;
}

const PUBLIC_FIELDS = ['created_at', 'expires_at', 'id', 'last_used_at', 'max_budget', 'name', 'owner_id', 'prefix', 'project_id', 'rpm', 'spent', 'status', 'updated_at'];
const CREATED_FIELDS = [...PUBLIC_FIELDS, 'key'].sort();
const KEY_NOT_FOUND = { detail: 'API key not found' };
const PROJECT_NOT_FOUND = { detail: 'Project not found' };
const INVALID = { detail: 'Could not validate credentials' };
const SCOPED = { detail: 'This API key is limited to one project' };

const sha256 = (text: string) => createHash('sha256').update(text).digest('hex');

const api = apiOf(ctx);

/** The status a key gets on a simple authenticated route. */
async function statusWith(headers: Record<string, string>): Promise<number> {
  return (await api('GET', '/billing/balance', headers)).statusCode;
}

/** Expects the key to be refused as a credential in both headers, with a proper 401. */
async function expectKeyRefused(key: string): Promise<void> {
  for (const headers of [bearer(key), xApiKey(key)]) {
    const response = await api('GET', '/users/me', headers);
    expect(response.statusCode).toBe(401);
    expect(response.json()).toEqual(INVALID);
    expect(response.headers['www-authenticate']).toBe('Bearer');
  }
}

function expectPublicShape(body: KeyBody): void {
  expect(Object.keys(body).sort()).toEqual(PUBLIC_FIELDS);
  expect(body.id).toMatch(UUID);
  expect(body.created_at).toMatch(ISO_UTC);
  expect(body.updated_at).toMatch(ISO_UTC);
  if (body.expires_at !== null) expect(body.expires_at).toMatch(ISO_UTC);
  if (body.last_used_at !== null) expect(body.last_used_at).toMatch(ISO_UTC);
}

async function keyCount(ownerId: string): Promise<number> {
  const [row] = await ctx.app.db.select({ value: count() }).from(apiKeys).where(eq(apiKeys.owner_id, ownerId));
  return row?.value ?? 0;
}

// ==================== Create ====================

describe('POST /api-keys', () => {
  it('answers the secret key once, with the public fields; stores only its hash', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('POST', '/api-keys', alice.headers, { name: 'ci' });
    expect(response.statusCode).toBe(200);
    const created = response.json<CreatedKey>();
    expect(Object.keys(created).sort()).toEqual(CREATED_FIELDS);
    expect(created.key).toMatch(/^keel_[A-Za-z0-9_-]{40,}$/);
    expect(created).toMatchObject({ name: 'ci', project_id: null, status: 'active', expires_at: null, last_used_at: null });
    expect(created.prefix).toBe(created.key.slice(0, created.prefix.length));
    expect(created.prefix.length).toBeLessThan(created.key.length - 20);
    expect(created.created_at).toMatch(ISO_UTC);
    expect(created.updated_at).toMatch(ISO_UTC);
    expect(response.body).not.toContain('key_hash');

    const [row] = await ctx.app.db.select().from(apiKeys).where(eq(apiKeys.id, created.id));
    expect(row).toBeDefined();
    expect(row!.owner_id).toBe(alice.user.id);
    expect(row!.key_hash).toBe(sha256(created.key));
    expect(Object.values(row!).map(String)).not.toContain(created.key);
  });

  it('creates distinct secrets every time', async () => {
    const alice = await createUser(ctx.app);
    const a = await createKey(ctx.app, alice, { name: 'a' });
    const b = await createKey(ctx.app, alice, { name: 'b' });
    expect(a.key).not.toBe(b.key);
    expect(a.id).not.toBe(b.id);
  });

  it('accepts a project of the caller, an explicit null project and a future expiry', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    const expires = new Date(Date.now() + 86_400_000);
    const scoped = await createKey(ctx.app, alice, { name: 'scoped', project_id: project.id, expires_at: expires.toISOString() });
    expect(scoped.project_id).toBe(project.id);
    expect(scoped.expires_at).toBe(expires.toISOString());

    const unscoped = await createKey(ctx.app, alice, { name: 'unscoped', project_id: null, expires_at: null });
    expect(unscoped).toMatchObject({ project_id: null, expires_at: null });

    // An offset other than Z is accepted and answered in UTC.
    const withOffset = await createKey(ctx.app, alice, { name: 'offset', expires_at: '2999-01-01T02:00:00+02:00' });
    expect(withOffset.expires_at).toBe('2999-01-01T00:00:00.000Z');
  });

  it('answers 422 at expires_at for an expiry in the past (or now), as any invalid field (SPEC §2), and stores nothing', async () => {
    const alice = await createUser(ctx.app);
    for (const expires of [new Date(Date.now() - 60_000).toISOString(), '2000-01-01T00:00:00Z']) {
      const response = await api('POST', '/api-keys', alice.headers, { name: 'late', expires_at: expires });
      const { detail } = expectValidationError(response, ['body', 'expires_at'], 'value_error');
      expect(detail).toEqual([{ loc: ['body', 'expires_at'], msg: 'expires_at must be in the future', type: 'value_error' }]);
    }
    expect(await keyCount(alice.user.id)).toBe(0);
  });

  it('answers 422 for an expiry past the year 9999 in UTC (an offset carries 9999-12-31 over), and stores nothing', async () => {
    const alice = await createUser(ctx.app);
    expectValidationError(await api('POST', '/api-keys', alice.headers, { name: 'far', expires_at: '9999-12-31T23:59:59-23:59' }), ['body', 'expires_at']);
    expect(await keyCount(alice.user.id)).toBe(0);
    // The last instant of 9999 is still a date PostgreSQL stores.
    expect((await createKey(ctx.app, alice, { name: 'last', expires_at: '9999-12-31T23:59:59.999Z' })).expires_at).toBe('9999-12-31T23:59:59.999Z');
  });

  it("answers 404 for another user's project and for a missing one, and stores nothing", async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const bobs = await createProject(ctx.app, bob.headers);
    for (const projectId of [bobs.id, randomUUID()]) {
      const response = await api('POST', '/api-keys', alice.headers, { name: 'sneaky', project_id: projectId });
      expect(response.statusCode).toBe(404);
      expect(response.json()).toEqual(PROJECT_NOT_FOUND);
    }
    expect(await keyCount(alice.user.id)).toBe(0);
  });

  it("answers 404 to a superuser for another user's project: keys are personal", async () => {
    const admin = await createUser(ctx.app, { superuser: true });
    const bob = await createUser(ctx.app);
    const bobs = await createProject(ctx.app, bob.headers);
    const response = await api('POST', '/api-keys', admin.headers, { name: 'admin into bob', project_id: bobs.id });
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual(PROJECT_NOT_FOUND);
    expect(await keyCount(admin.user.id)).toBe(0);
  });

  it.each([
    ['a missing name', {}, ['body', 'name'], 'missing'],
    ['an empty name', { name: '' }, ['body', 'name'], 'string_too_short'],
    ['a blank name', { name: '   ' }, ['body', 'name'], 'string_too_short'],
    ['a name over 255 characters', { name: 'k'.repeat(256) }, ['body', 'name'], 'string_too_long'],
    ['an unknown field', { name: 'k', scope: 'all' }, ['body', 'scope'], 'extra_forbidden'],
    ['a client-set key', { name: 'k', key: 'keel_mine' }, ['body', 'key'], 'extra_forbidden'],
    ['a client-set key_hash', { name: 'k', key_hash: 'a'.repeat(64) }, ['body', 'key_hash'], 'extra_forbidden'],
    ['a client-set status', { name: 'k', status: 'active' }, ['body', 'status'], 'extra_forbidden'],
    ['a client-set owner_id', { name: 'k', owner_id: randomUUID() }, ['body', 'owner_id'], 'extra_forbidden'],
    ['a client-set id', { name: 'k', id: randomUUID() }, ['body', 'id'], 'extra_forbidden'],
    ['a client-set last_used_at', { name: 'k', last_used_at: new Date().toISOString() }, ['body', 'last_used_at'], 'extra_forbidden'],
    ['a malformed project_id', { name: 'k', project_id: 'nope' }, ['body', 'project_id'], undefined],
    ['a malformed expires_at', { name: 'k', expires_at: 'tomorrow' }, ['body', 'expires_at'], undefined],
    ['an expires_at without a time zone', { name: 'k', expires_at: '2999-01-01T00:00:00' }, ['body', 'expires_at'], undefined],
    ['a numeric expires_at', { name: 'k', expires_at: 4_102_444_800 }, ['body', 'expires_at'], undefined],
  ])('rejects %s with 422 and stores nothing', async (_label, payload, loc, type) => {
    const alice = await createUser(ctx.app);
    const response = await api('POST', '/api-keys', alice.headers, payload);
    expectValidationError(response, loc, type);
    expect(await keyCount(alice.user.id)).toBe(0);
  });
});

// ==================== Read ====================

describe('GET /api-keys and /api-keys/{id}', () => {
  it('never include the secret or its hash', async () => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice, { name: 'secretive' });

    const read = await api('GET', `/api-keys/${created.id}`, alice.headers);
    expect(read.statusCode).toBe(200);
    const body = read.json<KeyBody>();
    expectPublicShape(body);
    const { key: _key, ...publicPart } = created;
    expect(body).toEqual(publicPart);
    expect(read.body).not.toContain(created.key);
    expect(read.body).not.toContain(sha256(created.key));

    const list = await api('GET', '/api-keys', alice.headers);
    expect(list.statusCode).toBe(200);
    expect(list.json<KeyList>()).toEqual({ data: [publicPart], count: 1 });
    expect(list.body).not.toContain(created.key);
    expect(list.body).not.toContain(sha256(created.key));
    expect(list.body).not.toContain('key_hash');
  });

  it("lists only the caller's keys, newest first, paged, with the total count", async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    for (const name of ['k1', 'k2', 'k3', 'k4']) await createKey(ctx.app, alice, { name });
    await createKey(ctx.app, bob, { name: 'bob' });

    const all = (await api('GET', '/api-keys', alice.headers)).json<KeyList>();
    expect(all.count).toBe(4);
    expect(all.data.map((k) => k.name)).toEqual(['k4', 'k3', 'k2', 'k1']);
    all.data.forEach(expectPublicShape);

    const page = (await api('GET', '/api-keys?limit=2&offset=1', alice.headers)).json<KeyList>();
    expect(page.count).toBe(4);
    expect(page.data.map((k) => k.name)).toEqual(['k3', 'k2']);
    expect((await api('GET', '/api-keys?offset=10', alice.headers)).json()).toEqual({ data: [], count: 4 });
  });

  it.each(['limit=0', 'limit=101', 'limit=-1', 'limit=abc', 'offset=-1'])('rejects ?%s with 422', async (query) => {
    const alice = await createUser(ctx.app);
    const response = await api('GET', `/api-keys?${query}`, alice.headers);
    expectValidationError(response, ['query', query.split('=')[0]!]);
  });

  it('answers 404 for a missing key', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('GET', `/api-keys/${randomUUID()}`, alice.headers);
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual(KEY_NOT_FOUND);
  });
});

// ==================== Authentication with a key ====================

describe('an unscoped key and the account itself', () => {
  it('cannot change the email or password, or delete the account (403), and changes nothing', async () => {
    const alice = await createUser(ctx.app);
    const { key } = await createKey(ctx.app, alice, { name: 'program' });
    const headers = bearer(key);
    const expected = { detail: 'API keys cannot change the account; sign in instead' };
    for (const [method, url, payload] of [
      ['PATCH', '/users/me', { email: 'taken-over@keel.test' }],
      ['PATCH', '/users/me/password', { current_password: alice.password, new_password: 'taken-over-password' }],
      ['DELETE', '/users/me', undefined],
    ] as const) {
      const response = await api(method, url, headers, payload);
      expect(response.statusCode, `${method} ${url}`).toBe(403);
      expect(response.json()).toEqual(expected);
    }
    expect((await api('GET', '/users/me', headers)).json()).toMatchObject({ email: alice.email });
    // Naming the email at all, or the password that a change of it needs, is refused the same way.
    for (const payload of [{ email: alice.email, full_name: 'Eve' }, { full_name: 'Eve', current_password: alice.password }]) {
      const response = await api('PATCH', '/users/me', headers, payload);
      expect(response.statusCode, JSON.stringify(payload)).toBe(403);
      expect(response.json()).toEqual(expected);
    }
    expect((await api('GET', '/users/me', headers)).json()).toMatchObject({ email: alice.email, full_name: null });
    // The same changes work for the signed-in user.
    expect((await api('PATCH', '/users/me', alice.headers, { full_name: 'Alice' })).statusCode).toBe(200);
  });

  it('changes the profile\'s name, which is no credential (SPEC §3: every authenticated route takes a key); a project-scoped key not even that', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    const unscoped = await createKey(ctx.app, alice, { name: 'program' });
    const scoped = await createKey(ctx.app, alice, { name: 'project program', project_id: project.id });
    const renamed = await api('PATCH', '/users/me', bearer(unscoped.key), { full_name: 'Ada by program' });
    expect(renamed.statusCode, renamed.body).toBe(200);
    expect(renamed.json()).toMatchObject({ id: alice.user.id, email: alice.email, full_name: 'Ada by program' });
    const refused = await api('PATCH', '/users/me', bearer(scoped.key), { full_name: 'Ada by project' });
    expect(refused.statusCode).toBe(403);
    expect(refused.json()).toEqual({ detail: 'This API key is limited to one project' });
    expect((await api('GET', '/users/me', alice.headers)).json()).toMatchObject({ full_name: 'Ada by program' });
  });

  it('cannot create, change or delete keys (403): a capped key would lift its own limits or mint keys that outlive its revocation', async () => {
    const alice = await createUser(ctx.app);
    const capped = await createKey(ctx.app, alice, { name: 'capped', max_budget: '0.01', rpm: 1 });
    const sibling = await createKey(ctx.app, alice, { name: 'sibling' });
    const headers = bearer(capped.key);
    const expected = { detail: 'API keys cannot create, change or delete API keys; sign in instead' };
    for (const [method, url, payload] of [
      ['POST', '/api-keys', { name: 'escape' }],
      ['PATCH', `/api-keys/${capped.id}`, { max_budget: null, rpm: null }],
      ['PATCH', `/api-keys/${sibling.id}`, { status: 'revoked' }],
      ['DELETE', `/api-keys/${sibling.id}`, undefined],
      ['DELETE', `/api-keys/${capped.id}`, undefined],
    ] as const) {
      const response = await api(method, url, headers, payload);
      expect(response.statusCode, `${method} ${url}`).toBe(403);
      expect(response.json()).toEqual(expected);
    }
    const keys = (await api('GET', '/api-keys', alice.headers)).json<ListBody<{ name: string; status: string; max_budget: string | null; rpm: number | null }>>();
    expect(keys.data.map((k) => [k.name, k.status, k.max_budget, k.rpm]).sort()).toEqual([
      ['capped', 'active', '0.01', 1],
      ['sibling', 'active', null, null],
    ]);
    // It still reads them; the signed-in user still manages them.
    expect((await api('GET', `/api-keys/${sibling.id}`, headers)).statusCode).toBe(200);
    expect((await api('PATCH', `/api-keys/${capped.id}`, alice.headers, { rpm: 5 })).statusCode).toBe(200);
  });
});

describe('authenticating with a key', () => {
  it('works as Authorization: Bearer and as X-API-Key, as its owner', async () => {
    const alice = await createUser(ctx.app);
    const { key } = await createKey(ctx.app, alice);
    for (const headers of [bearer(key), xApiKey(key)]) {
      const response = await api('GET', '/users/me', headers);
      expect(response.statusCode).toBe(200);
      expect(response.json<UserBody>()).toMatchObject({ id: alice.user.id, email: alice.email });
    }
    // An unscoped key reaches the owner's projects and creates new ones.
    const project = await createProject(ctx.app, xApiKey(key), 'via key');
    expect(project.owner_id).toBe(alice.user.id);
    expect((await api('GET', `/projects/${project.id}`, bearer(key))).statusCode).toBe(200);
  });

  it('sets last_used_at on use, without moving updated_at', async () => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice);
    expect(created.last_used_at).toBeNull();
    const before = Date.now();

    expect(await statusWith(bearer(created.key))).toBe(200);
    const read = (await api('GET', `/api-keys/${created.id}`, alice.headers)).json<KeyBody>();
    expect(read.last_used_at).not.toBeNull();
    expect(read.last_used_at).toMatch(ISO_UTC);
    expect(Date.parse(read.last_used_at!)).toBeGreaterThanOrEqual(before - 5_000);
    expect(Date.parse(read.last_used_at!)).toBeLessThanOrEqual(Date.now() + 5_000);
    expect(read.updated_at).toBe(created.updated_at);

    // Another key of the same user stays unused.
    const other = await createKey(ctx.app, alice, { name: 'unused' });
    expect((await api('GET', `/api-keys/${other.id}`, alice.headers)).json<KeyBody>().last_used_at).toBeNull();
  });

  it('sets last_used_at through X-API-Key too', async () => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice);
    expect(await statusWith(xApiKey(created.key))).toBe(200);
    expect((await api('GET', `/api-keys/${created.id}`, alice.headers)).json<KeyBody>().last_used_at).not.toBeNull();
  });

  it('refuses forged keys, a tampered key and a non-Bearer scheme with 401', async () => {
    const alice = await createUser(ctx.app);
    const { key } = await createKey(ctx.app, alice);
    await expectKeyRefused('keel_forged');
    await expectKeyRefused(`${key.slice(0, -1)}${key.endsWith('A') ? 'B' : 'A'}`);
    await expectKeyRefused(`${key}x`);
    const basic = await api('GET', '/users/me', { authorization: `Basic ${key}` });
    expect(basic.statusCode).toBe(401);
    expect(basic.headers['www-authenticate']).toBe('Bearer');
    // The real key still works.
    expect(await statusWith(bearer(key))).toBe(200);
  });

  it('reads X-API-Key beside an Authorization header that holds no bearer credential, and never in place of a bad one', async () => {
    const alice = await createUser(ctx.app);
    const { key } = await createKey(ctx.app, alice);
    // Empty (clients that always set the header), a bare scheme, or a proxy's own Basic credential: the key is the credential.
    for (const authorization of ['', ' ', 'Bearer', 'Bearer ', 'Basic dXNlcjpwYXNz']) {
      const response = await api('GET', '/users/me', { authorization, ...xApiKey(key) });
      expect(response.statusCode, JSON.stringify(authorization)).toBe(200);
      expect(response.json<UserBody>().id).toBe(alice.user.id);
    }
    // A bearer credential is the one checked: a bad one is refused, not passed over for the key.
    const bad = await api('GET', '/users/me', { ...bearer('keel_forged'), ...xApiKey(key) });
    expect(bad.statusCode).toBe(401);
    expect(bad.json()).toEqual(INVALID);
    // Neither header with a credential: 401, as without any.
    expect((await api('GET', '/users/me', { authorization: '', 'x-api-key': '' })).statusCode).toBe(401);
  });

  it('takes API keys only in X-API-Key: an access token there answers 401 exactly as a wrong key does (SPEC §3: tokens go in Authorization)', async () => {
    const alice = await createUser(ctx.app);
    const wrongKey = await api('GET', '/users/me', xApiKey('keel_forged'));
    for (const headers of [xApiKey(alice.token), { authorization: '', ...xApiKey(alice.token) }]) {
      const response = await api('GET', '/users/me', headers);
      expect(response.statusCode).toBe(401);
      expect(response.json()).toEqual(INVALID);
      expect(response.json()).toEqual(wrongKey.json());
      expect(response.headers['www-authenticate']).toBe('Bearer');
    }
    // The same token as a bearer credential is the caller's.
    expect((await api('GET', '/users/me', alice.headers)).json<UserBody>().id).toBe(alice.user.id);
  });

  it('refuses the key of a deactivated user with 401', async () => {
    const admin = await createUser(ctx.app, { superuser: true });
    const alice = await createUser(ctx.app);
    const { key } = await createKey(ctx.app, alice);
    expect(await statusWith(bearer(key))).toBe(200);
    const deactivated = await api('PATCH', `/users/${alice.user.id}`, admin.headers, { is_active: false });
    expect(deactivated.statusCode).toBe(200);
    await expectKeyRefused(key);
  });

  it('refuses the key of a deleted user with 401', async () => {
    const admin = await createUser(ctx.app, { superuser: true });
    const alice = await createUser(ctx.app);
    const { key } = await createKey(ctx.app, alice);
    expect((await api('DELETE', `/users/${alice.user.id}`, admin.headers)).statusCode).toBe(200);
    await expectKeyRefused(key);
  });

  it('refuses an expired key with 401', async () => {
    const alice = await createUser(ctx.app);
    const expiresAt = Date.now() + 1_500;
    const created = await createKey(ctx.app, alice, { name: 'short-lived', expires_at: new Date(expiresAt).toISOString() });
    if (Date.now() < expiresAt - 300) expect(await statusWith(bearer(created.key))).toBe(200);
    await sleep(Math.max(0, expiresAt - Date.now()) + 100);
    await expectKeyRefused(created.key);
    // Still listed, with its expiry, shown as expired (in the list too); the stored status is unchanged.
    const read = (await api('GET', `/api-keys/${created.id}`, alice.headers)).json<KeyBody>();
    expect(read).toMatchObject({ status: 'expired', expires_at: new Date(expiresAt).toISOString() });
    const listed = (await api('GET', '/api-keys', alice.headers)).json<KeyList>();
    expect(listed.data.find((k) => k.id === created.id)?.status).toBe('expired');
    const [row] = await ctx.app.db.select().from(apiKeys).where(eq(apiKeys.id, created.id));
    expect(row?.status).toBe('active');
  });

  it('refuses a key whose expiry passed (set in the database) with 401', async () => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice, { name: 'aged', expires_at: new Date(Date.now() + 3_600_000).toISOString() });
    expect(await statusWith(xApiKey(created.key))).toBe(200);
    await ctx.app.db.update(apiKeys).set({ expires_at: new Date(Date.now() - 1_000) }).where(eq(apiKeys.id, created.id));
    await expectKeyRefused(created.key);
  });
});

// ==================== Update ====================

describe('PATCH /api-keys/{id}', () => {
  it('renames a key; the key keeps working', async () => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice, { name: 'old' });
    await sleep(20);
    const response = await api('PATCH', `/api-keys/${created.id}`, alice.headers, { name: '  new  ' });
    expect(response.statusCode).toBe(200);
    const body = response.json<KeyBody>();
    expectPublicShape(body);
    expect(body).toMatchObject({ id: created.id, name: 'new', status: 'active', created_at: created.created_at });
    expect(Date.parse(body.updated_at)).toBeGreaterThan(Date.parse(created.updated_at));
    expect(response.body).not.toContain(created.key);
    expect(await statusWith(bearer(created.key))).toBe(200);
  });

  it('accepts an empty body and keeps the key as it is', async () => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice, { name: 'same' });
    const response = await api('PATCH', `/api-keys/${created.id}`, alice.headers, {});
    expect(response.statusCode).toBe(200);
    expect(response.json()).toMatchObject({ id: created.id, name: 'same', status: 'active' });
    expect(await statusWith(bearer(created.key))).toBe(200);
  });

  it('revokes with {status: "revoked"}: the key answers 401 afterwards, in both headers', async () => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice);
    expect(await statusWith(bearer(created.key))).toBe(200);

    const response = await api('PATCH', `/api-keys/${created.id}`, alice.headers, { status: 'revoked' });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toMatchObject({ id: created.id, status: 'revoked' });
    await expectKeyRefused(created.key);

    // Still visible to its owner, as revoked; renaming keeps it revoked.
    expect((await api('GET', `/api-keys/${created.id}`, alice.headers)).json()).toMatchObject({ status: 'revoked' });
    const renamed = await api('PATCH', `/api-keys/${created.id}`, alice.headers, { name: 'dead key' });
    expect(renamed.statusCode).toBe(200);
    expect(renamed.json()).toMatchObject({ name: 'dead key', status: 'revoked' });
    await expectKeyRefused(created.key);
  });

  it('refuses {status: "active"} with 422: revocation is final', async () => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice);
    expect((await api('PATCH', `/api-keys/${created.id}`, alice.headers, { status: 'revoked' })).statusCode).toBe(200);

    const response = await api('PATCH', `/api-keys/${created.id}`, alice.headers, { status: 'active' });
    expectValidationError(response, ['body', 'status']);
    expect((await api('GET', `/api-keys/${created.id}`, alice.headers)).json()).toMatchObject({ status: 'revoked' });
    await expectKeyRefused(created.key);

    // Also on a key that is still active.
    const live = await createKey(ctx.app, alice, { name: 'live' });
    expectValidationError(await api('PATCH', `/api-keys/${live.id}`, alice.headers, { status: 'active' }), ['body', 'status']);
  });

  it.each([
    ['an unknown status', { status: 'paused' }, ['body', 'status'], undefined],
    ['an empty name', { name: '' }, ['body', 'name'], 'string_too_short'],
    ['a name over 255 characters', { name: 'k'.repeat(256) }, ['body', 'name'], 'string_too_long'],
    ['an unknown field', { colour: 'red' }, ['body', 'colour'], 'extra_forbidden'],
    ['a client-set project_id', { project_id: randomUUID() }, ['body', 'project_id'], 'extra_forbidden'],
    ['a client-set expires_at', { expires_at: '2999-01-01T00:00:00Z' }, ['body', 'expires_at'], 'extra_forbidden'],
    ['a client-set key_hash', { key_hash: 'a'.repeat(64) }, ['body', 'key_hash'], 'extra_forbidden'],
    ['a client-set owner_id', { owner_id: randomUUID() }, ['body', 'owner_id'], 'extra_forbidden'],
    ['a client-set last_used_at', { last_used_at: null }, ['body', 'last_used_at'], 'extra_forbidden'],
  ])('rejects %s with 422 and changes nothing', async (_label, payload, loc, type) => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice, { name: 'stable' });
    const { key: _key, ...publicPart } = created;
    const response = await api('PATCH', `/api-keys/${created.id}`, alice.headers, payload);
    expectValidationError(response, loc, type);
    expect((await api('GET', `/api-keys/${created.id}`, alice.headers)).json()).toEqual(publicPart);
  });

  it('answers 404 for a missing key', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('PATCH', `/api-keys/${randomUUID()}`, alice.headers, { status: 'revoked' });
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual(KEY_NOT_FOUND);
  });
});

// ==================== Delete ====================

describe('DELETE /api-keys/{id}', () => {
  it('deletes the key: it answers 401 as a credential, and 404 on every route', async () => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice);
    const kept = await createKey(ctx.app, alice, { name: 'kept' });
    expect(await statusWith(bearer(created.key))).toBe(200);

    const response = await api('DELETE', `/api-keys/${created.id}`, alice.headers);
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual({ message: 'API key deleted successfully' });
    await expectKeyRefused(created.key);

    for (const [method, payload] of [['GET', undefined], ['PATCH', { name: 'x' }], ['DELETE', undefined]] as const) {
      const after = await api(method, `/api-keys/${created.id}`, alice.headers, payload);
      expect(after.statusCode, method).toBe(404);
      expect(after.json()).toEqual(KEY_NOT_FOUND);
    }
    const list = (await api('GET', '/api-keys', alice.headers)).json<KeyList>();
    expect(list.count).toBe(1);
    expect(list.data.map((k) => k.id)).toEqual([kept.id]);
    expect(await statusWith(bearer(kept.key))).toBe(200);
  });

  it('answers 404 for a missing key', async () => {
    const alice = await createUser(ctx.app);
    const response = await api('DELETE', `/api-keys/${randomUUID()}`, alice.headers);
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual(KEY_NOT_FOUND);
  });

  it("deleting a project deletes its scoped keys (they answer 401), not the owner's others", async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers, 'Temporary');
    const scoped = await createKey(ctx.app, alice, { name: 'scoped', project_id: project.id });
    const scoped2 = await createKey(ctx.app, alice, { name: 'scoped 2', project_id: project.id });
    const unscoped = await createKey(ctx.app, alice, { name: 'unscoped' });
    expect(await statusWith(bearer(scoped.key))).toBe(200);

    expect((await api('DELETE', `/projects/${project.id}`, alice.headers)).statusCode).toBe(200);
    await expectKeyRefused(scoped.key);
    await expectKeyRefused(scoped2.key);
    expect((await api('GET', `/api-keys/${scoped.id}`, alice.headers)).statusCode).toBe(404);
    const list = (await api('GET', '/api-keys', alice.headers)).json<KeyList>();
    expect(list).toMatchObject({ count: 1 });
    expect(list.data.map((k) => k.id)).toEqual([unscoped.id]);
    expect(await statusWith(bearer(unscoped.key))).toBe(200);
  });
});

// ==================== Ownership ====================

describe('ownership', () => {
  it("answers another user's key with 404, exactly like a missing one, and leaves it alone", async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice, { name: 'alice key' });
    const { key: _key, ...publicPart } = created;
    const missing = randomUUID();

    for (const [method, payload] of [['GET', undefined], ['PATCH', { status: 'revoked' }], ['PATCH', { name: 'stolen' }], ['DELETE', undefined]] as const) {
      const foreign = await api(method, `/api-keys/${created.id}`, bob.headers, payload);
      const absent = await api(method, `/api-keys/${missing}`, bob.headers, payload);
      expect(foreign.statusCode, method).toBe(404);
      expect(foreign.json()).toEqual(KEY_NOT_FOUND);
      expect(foreign.body).toBe(absent.body);
    }
    expect((await api('GET', '/api-keys', bob.headers)).json()).toEqual({ data: [], count: 0 });
    expect((await api('GET', `/api-keys/${created.id}`, alice.headers)).json()).toEqual(publicPart);
    expect(await statusWith(bearer(created.key))).toBe(200);
  });

  it("a superuser sees every user's keys (SPEC §2), and revokes and deletes another user's", async () => {
    const admin = await createUser(ctx.app, { superuser: true });
    const alice = await createUser(ctx.app);
    const alices = await createKey(ctx.app, alice, { name: 'alice key' });
    const spare = await createKey(ctx.app, alice, { name: 'alice spare' });
    const own = await createKey(ctx.app, admin, { name: 'admin key' });

    const listed = (await api('GET', '/api-keys?limit=100', admin.headers)).json<KeyList>().data.map((k) => k.id);
    expect(listed).toEqual(expect.arrayContaining([own.id, alices.id, spare.id]));
    // Never the secret again, to anyone.
    const read = await api('GET', `/api-keys/${alices.id}`, admin.headers);
    expect(read.statusCode).toBe(200);
    expect(read.json()).not.toHaveProperty('key');
    // Whose each key is, so that an operator's clean-up of "my" keys can tell them apart.
    expect(read.json()).toMatchObject({ owner_id: alice.user.id });
    const owners = new Map((await api('GET', '/api-keys?limit=100', admin.headers)).json<{ data: { id: string; owner_id: string }[] }>().data.map((k) => [k.id, k.owner_id]));
    expect([owners.get(own.id), owners.get(spare.id)]).toEqual([admin.user.id, alice.user.id]);

    const revoked = await api('PATCH', `/api-keys/${alices.id}`, admin.headers, { status: 'revoked' });
    expect(revoked.statusCode).toBe(200);
    expect(revoked.json()).toMatchObject({ status: 'revoked' });
    expect(await statusWith(bearer(alices.key))).toBe(401);
    expect((await api('DELETE', `/api-keys/${spare.id}`, admin.headers)).statusCode).toBe(200);
    expect(await statusWith(bearer(spare.key))).toBe(401);
    // The owner's own list is still theirs alone.
    expect((await api('GET', '/api-keys?limit=100', alice.headers)).json<KeyList>().data.map((k) => k.id)).toEqual([alices.id]);
  });
});

// ==================== Project-scoped keys ====================

describe('a project-scoped key', () => {
  async function setup() {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers, 'Scope');
    const other = await createProject(ctx.app, alice.headers, 'Other');
    const scoped = await createKey(ctx.app, alice, { name: 'scoped', project_id: project.id });
    return { alice, project, other, scoped, headers: bearer(scoped.key) };
  }

  it('lists and reads only its project', async () => {
    const { project, headers, scoped } = await setup();
    const list = await api('GET', '/projects', headers);
    expect(list.statusCode).toBe(200);
    const body = list.json<{ data: { id: string }[]; count: number }>();
    expect(body.count).toBe(1);
    expect(body.data.map((p) => p.id)).toEqual([project.id]);

    expect((await api('GET', `/projects/${project.id}`, headers)).json()).toMatchObject({ id: project.id, name: 'Scope' });
    expect((await api('GET', `/projects/${project.id}`, xApiKey(scoped.key))).statusCode).toBe(200);
    const stats = await api('GET', `/projects/${project.id}/stats`, headers);
    expect(stats.statusCode).toBe(200);
    expect(stats.json()).toMatchObject({ project_id: project.id, api_keys: 1, active_api_keys: 1 });
  });

  it("of a superuser reads no user through the user routes (403), not even its own", async () => {
    const admin = await createUser(ctx.app, { superuser: true });
    const someone = await createUser(ctx.app);
    const project = await createProject(ctx.app, admin.headers, 'Admin scope');
    const scoped = await createKey(ctx.app, admin, { name: 'scoped-admin', project_id: project.id });
    const other = await api('GET', `/users/${someone.user.id}`, bearer(scoped.key));
    expect(other.statusCode).toBe(403);
    expect(other.json()).toEqual(SCOPED);
    // Its own account too, by id as at /users/me: no account resource for a scoped key (SPEC §3).
    expect((await api('GET', `/users/${admin.user.id}`, bearer(scoped.key))).statusCode).toBe(403);
    expect((await api('GET', `/users/${admin.user.id}`, admin.headers)).statusCode).toBe(200);
    expect((await api('GET', '/users', bearer(scoped.key))).statusCode).toBe(403);
  });

  it("answers 404 for the owner's other projects on reads, 403 on writes, and changes nothing", async () => {
    const { alice, other, headers } = await setup();
    for (const [method, suffix, payload, status] of [
      ['GET', '', undefined, 404],
      ['PATCH', '', { name: 'escaped' }, 403],
      ['DELETE', '', undefined, 403],
      ['GET', '/stats', undefined, 404],
    ] as const) {
      const response = await api(method, `/projects/${other.id}${suffix}`, headers, payload);
      expect(response.statusCode, `${method} ${suffix}`).toBe(status);
      expect(response.json()).toEqual(status === 404 ? PROJECT_NOT_FOUND : SCOPED);
    }
    expect((await api('GET', `/projects/${other.id}`, alice.headers)).json()).toMatchObject({ name: 'Other' });
  });

  it('may not rename or delete its own project (403), and changes nothing', async () => {
    const { alice, project, headers } = await setup();
    for (const [method, payload] of [['PATCH', { name: 'renamed' }], ['PATCH', {}], ['DELETE', undefined]] as const) {
      const response = await api(method, `/projects/${project.id}`, headers, payload);
      expect(response.statusCode, method).toBe(403);
      expect(response.json()).toEqual(SCOPED);
    }
    expect((await api('GET', `/projects/${project.id}`, alice.headers)).json()).toMatchObject({ name: 'Scope' });
    expect(await statusWith(headers)).toBe(200);
  });

  it("answers 404 for another user's project", async () => {
    const { headers } = await setup();
    const bob = await createUser(ctx.app);
    const bobs = await createProject(ctx.app, bob.headers);
    expect((await api('GET', `/projects/${bobs.id}`, headers)).statusCode).toBe(404);
  });

  it('answers 403 on POST /projects and creates nothing', async () => {
    const { alice, headers } = await setup();
    const response = await api('POST', '/projects', headers, { name: 'outside' });
    expect(response.statusCode).toBe(403);
    expect(response.json()).toEqual(SCOPED);
    expect((await api('GET', '/projects', alice.headers)).json<{ count: number }>().count).toBe(2);
  });

  it('answers 403 on POST, PATCH and DELETE /api-keys, even for itself, and changes nothing', async () => {
    const { alice, project, scoped, headers } = await setup();
    const unscoped = await createKey(ctx.app, alice, { name: 'unscoped' });

    for (const payload of [{ name: 'minted' }, { name: 'minted', project_id: project.id }]) {
      const minted = await api('POST', '/api-keys', headers, payload);
      expect(minted.statusCode).toBe(403);
      expect(minted.json()).toEqual(SCOPED);
    }
    for (const id of [scoped.id, unscoped.id]) {
      const patch = await api('PATCH', `/api-keys/${id}`, headers, { status: 'revoked' });
      expect(patch.statusCode).toBe(403);
      expect(patch.json()).toEqual(SCOPED);
      const del = await api('DELETE', `/api-keys/${id}`, headers);
      expect(del.statusCode).toBe(403);
      expect(del.json()).toEqual(SCOPED);
    }
    expect(await keyCount(alice.user.id)).toBe(2);
    expect((await api('GET', `/api-keys/${unscoped.id}`, alice.headers)).json()).toMatchObject({ status: 'active', name: 'unscoped' });
    expect(await statusWith(headers)).toBe(200);
  });

  it('cannot read the account either (403 on GET /users/me and POST /login/test-token): it is no resource of the project', async () => {
    const { alice, headers } = await setup();
    for (const [method, url] of [['GET', '/users/me'], ['POST', '/login/test-token']] as const) {
      const response = await api(method, url, headers);
      expect(response.statusCode, url).toBe(403);
      expect(response.json()).toEqual(SCOPED);
      expect((await api(method, url, alice.headers)).json(), url).toMatchObject({ id: alice.user.id });
    }
  });

  it('answers 403 on PATCH /users/me and changes nothing', async () => {
    const { alice, headers } = await setup();
    const response = await api('PATCH', '/users/me', headers, { full_name: 'Changed by a program' });
    expect(response.statusCode).toBe(403);
    expect(response.json()).toEqual(SCOPED);
    expect((await api('GET', '/users/me', alice.headers)).json()).toMatchObject({ full_name: null });
  });

  it('cannot list or read keys, even its own project\'s (403): keys are an account resource', async () => {
    const { alice, project, scoped, headers } = await setup();
    const sibling = await createKey(ctx.app, alice, { name: 'sibling', project_id: project.id });
    for (const url of ['/api-keys', `/api-keys/${scoped.id}`, `/api-keys/${sibling.id}`]) {
      const response = await api('GET', url, headers);
      expect(response.statusCode, url).toBe(403);
      expect(response.json()).toEqual(SCOPED);
    }
  });
});

// ==================== Credentials and ids ====================

describe('credentials and ids', () => {
  const routes = (id: string) =>
    [
      ['GET', '/api-keys', undefined],
      ['POST', '/api-keys', { name: 'x' }],
      ['GET', `/api-keys/${id}`, undefined],
      ['PATCH', `/api-keys/${id}`, { name: 'x' }],
      ['DELETE', `/api-keys/${id}`, undefined],
    ] as const;

  it('answers 401 with WWW-Authenticate on every route without credentials', async () => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice);
    for (const [method, url, payload] of routes(created.id)) {
      const response = await api(method, url, {}, payload);
      expect(response.statusCode, `${method} ${url}`).toBe(401);
      expect(response.json()).toEqual({ detail: 'Not authenticated' });
      expect(response.headers['www-authenticate']).toBe('Bearer');
    }
    expect(await keyCount(alice.user.id)).toBe(1);
  });

  it('answers 401 on every route with a revoked key', async () => {
    const alice = await createUser(ctx.app);
    const created = await createKey(ctx.app, alice);
    await api('PATCH', `/api-keys/${created.id}`, alice.headers, { status: 'revoked' });
    for (const [method, url, payload] of routes(created.id)) {
      const response = await api(method, url, bearer(created.key), payload);
      expect(response.statusCode, `${method} ${url}`).toBe(401);
      expect(response.json()).toEqual(INVALID);
    }
  });

  it.each(['not-a-uuid', '42', `${randomUUID()}0`])('answers 422 for the malformed id %s', async (bad) => {
    const alice = await createUser(ctx.app);
    for (const [method, url, payload] of routes(bad).filter(([, url]) => url !== '/api-keys')) {
      const response = await api(method, url, alice.headers, payload);
      expect(response.statusCode, `${method} ${url}`).toBe(422);
      expectValidationError(response, ['path', 'api_key_id']);
    }
  });
});

// ==================== Limit (an app of its own) ====================

describe('MAX_API_KEYS_PER_USER', () => {
  let limited: FastifyInstance;
  const LIMIT = 3;
  const send = (method: InjectOptions['method'], url: string, headers: Record<string, string>, payload?: unknown) =>
    call(limited, method, url, headers, payload);
  const conflict = { detail: `API key limit reached (${LIMIT} per user)` };

  beforeAll(async () => {
    limited = await buildTestApp(ctx.database, { MAX_API_KEYS_PER_USER: String(LIMIT) });
  });
  afterAll(async () => {
    await limited?.close();
  });

  it('answers 409 beyond the limit; revoked, expired and deleted keys do not count; per user', async () => {
    const alice = await createUser(limited);
    const bob = await createUser(limited);
    const ids: string[] = [];
    for (let i = 0; i < LIMIT; i++) {
      const response = await send('POST', '/api-keys', alice.headers, { name: `k${i}` });
      expect(response.statusCode).toBe(200);
      ids.push(response.json<KeyBody>().id);
    }
    const over = await send('POST', '/api-keys', alice.headers, { name: 'one too many' });
    expect(over.statusCode).toBe(409);
    expect(over.json()).toEqual(conflict);
    expect(await keyCount(alice.user.id)).toBe(LIMIT);

    expect((await send('POST', '/api-keys', bob.headers, { name: 'bob' })).statusCode).toBe(200);

    expect((await send('PATCH', `/api-keys/${ids[0]}`, alice.headers, { status: 'revoked' })).statusCode).toBe(200);
    expect((await send('POST', '/api-keys', alice.headers, { name: 'after revoke' })).statusCode).toBe(200);
    expect((await send('POST', '/api-keys', alice.headers, { name: 'over again' })).statusCode).toBe(409);

    await limited.db.update(apiKeys).set({ expires_at: new Date(Date.now() - 1_000) }).where(eq(apiKeys.id, ids[1]!));
    expect((await send('POST', '/api-keys', alice.headers, { name: 'after expiry' })).statusCode).toBe(200);
    expect((await send('POST', '/api-keys', alice.headers, { name: 'over again' })).statusCode).toBe(409);

    expect((await send('DELETE', `/api-keys/${ids[2]}`, alice.headers)).statusCode).toBe(200);
    expect((await send('POST', '/api-keys', alice.headers, { name: 'after delete' })).statusCode).toBe(200);
    expect((await send('POST', '/api-keys', alice.headers, { name: 'over again' })).statusCode).toBe(409);
    expect(await keyCount(alice.user.id)).toBe(LIMIT + 2);
  });

  it('bounds the keys kept, revoked and expired ones included (MAX_API_KEYS_KEPT_PER_USER): 409 until the user deletes some', async () => {
    // Revoked keys free their place among the working ones, but their rows stay: without this bound
    // creating and revoking keys added rows without end.
    const kept = await buildTestApp(ctx.database, { MAX_API_KEYS_PER_USER: '2', MAX_API_KEYS_KEPT_PER_USER: '4' });
    try {
      const alice = await createUser(kept);
      const create = (name: string) => call(kept, 'POST', '/api-keys', alice.headers, { name });
      const revoke = (id: string) => call(kept, 'PATCH', `/api-keys/${id}`, alice.headers, { status: 'revoked' });
      const ids: string[] = [];
      // A rotation at the working limit: revoke one, create one, as long as the kept bound allows.
      for (const name of ['a', 'b']) ids.push((await create(name)).json<KeyBody>().id);
      for (const name of ['c', 'd']) {
        expect((await revoke(ids.shift()!)).statusCode).toBe(200);
        const response = await create(name);
        expect(response.statusCode).toBe(200);
        ids.push(response.json<KeyBody>().id);
      }
      expect(await keyCount(alice.user.id)).toBe(4);
      expect((await revoke(ids.shift()!)).statusCode).toBe(200);
      // One working key now, under MAX_API_KEYS_PER_USER, but four kept.
      const over = await create('e');
      expect(over.statusCode).toBe(409);
      expect(over.json()).toEqual({ detail: 'API key limit reached (4 kept per user, revoked and expired keys included): delete keys you no longer use (DELETE /api-keys/{id})' });
      expect(await keyCount(alice.user.id)).toBe(4);
      // Another user is not held by it.
      const bob = await createUser(kept);
      expect((await call(kept, 'POST', '/api-keys', bob.headers, { name: 'bob' })).statusCode).toBe(200);
      // Deleting a revoked key makes room; the working key still works.
      const revoked = (await call(kept, 'GET', '/api-keys', alice.headers)).json<{ data: KeyBody[] }>().data.find((key) => key.status === 'revoked')!;
      expect((await call(kept, 'DELETE', `/api-keys/${revoked.id}`, alice.headers)).statusCode).toBe(200);
      const made = await create('f');
      expect(made.statusCode).toBe(200);
      expect((await call(kept, 'GET', '/users/me', bearer(made.json<CreatedKey>().key))).statusCode).toBe(200);
    } finally {
      await kept.close();
    }
  });

  it('holds under concurrent creation', async () => {
    const alice = await createUser(limited);
    // Warm the connection pool, so that the creations really run side by side (server mode).
    await Promise.all(Array.from({ length: 10 }, () => send('GET', '/api-keys', alice.headers)));
    const attempts = 9;
    const responses = await Promise.all(
      Array.from({ length: attempts }, (_, i) => send('POST', '/api-keys', alice.headers, { name: `race-${i}` })),
    );
    expect(responses.filter((r) => r.statusCode === 200)).toHaveLength(LIMIT);
    const refused = responses.filter((r) => r.statusCode === 409);
    expect(refused).toHaveLength(attempts - LIMIT);
    for (const response of refused) expect(response.json()).toEqual(conflict);
    expect(await keyCount(alice.user.id)).toBe(LIMIT);
    // Every key handed out works.
    for (const response of responses.filter((r) => r.statusCode === 200)) {
      expect((await send('GET', '/users/me', bearer(response.json<CreatedKey>().key))).statusCode).toBe(200);
    }
  });
});
