import { randomUUID } from 'node:crypto';

import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { Database } from '../../src/core/db.js';

import { buildTestApp, type MailingApp, openMailingApp, openTestDatabase, SUPERUSER_EMAIL } from '../helpers/app.js';
import { bearer, createProject, createUser, login, loginStatus, randomEmail, superuserHeaders, USER_PUBLIC_KEYS, type UserBody } from '../helpers/factories.js';
import type { SmtpCapture } from '../helpers/smtp.js';

const DUPLICATE = { detail: 'The user with this email already exists in the system' };
const NOT_ENOUGH = { detail: "The user doesn't have enough privileges" };
const NOT_FOUND = { detail: 'User not found' };
const DELETED = { message: 'User deleted successfully' };

interface ValidationBody {
  detail: { loc: (string | number)[]; msg: string; type: string }[];
}

// One app for the file, mailing through a fake SMTP server (new-account emails).
let mailing: MailingApp;
let capture: SmtpCapture;
let database: Database;
let app: FastifyInstance;
let admin: Record<string, string>;

beforeAll(async () => {
  mailing = await openMailingApp();
  ({ app, database, capture } = mailing);
  admin = await superuserHeaders(app);
});

afterAll(async () => {
  await mailing?.close();
});

// ==================== Helpers ====================

function call(
  method: 'GET' | 'POST' | 'PATCH' | 'DELETE',
  url: string,
  options: { headers?: Record<string, string>; payload?: unknown; remoteAddress?: string; target?: FastifyInstance } = {},
): Promise<LightMyRequestResponse> {
  const { headers, payload, remoteAddress, target = app } = options;
  return target.inject({
    method,
    url: `/api/v1${url}`,
    ...(headers ? { headers } : {}),
    ...(payload !== undefined ? { payload: payload as Record<string, unknown> } : {}),
    ...(remoteAddress ? { remoteAddress } : {}),
  });
}

function signup(payload: Record<string, unknown>, options: { remoteAddress?: string; target?: FastifyInstance } = {}) {
  return call('POST', '/users/signup', { payload, ...options });
}

function expectUserPublic(response: LightMyRequestResponse, expected: Partial<UserBody>): UserBody {
  expect(response.statusCode).toBe(200);
  const body = response.json<UserBody>();
  expect(Object.keys(body).sort()).toEqual(USER_PUBLIC_KEYS);
  expect(body).toMatchObject(expected);
  expect(body.id).toMatch(/^[0-9a-f-]{36}$/);
  expect(new Date(body.created_at).toISOString()).toBe(body.created_at);
  expect(new Date(body.updated_at).toISOString()).toBe(body.updated_at);
  expect(response.body).not.toContain('hashed_password');
  expect(response.body).not.toContain('token_version');
  return body;
}

/** A 422 whose issues are exactly these (loc, type) pairs. */
function expect422(response: LightMyRequestResponse, issues: [(string | number)[], string][]): void {
  expect(response.statusCode).toBe(422);
  const body = response.json<ValidationBody>();
  expect(Object.keys(body)).toEqual(['detail']);
  for (const issue of body.detail) expect(typeof issue.msg).toBe('string');
  expect(body.detail.map((d) => [d.loc, d.type])).toEqual(issues);
}

function expectError(response: LightMyRequestResponse, status: number, body: { detail: string }): void {
  expect(response.statusCode).toBe(status);
  expect(response.json()).toEqual(body);
}

function expectUnauthorized(response: LightMyRequestResponse): void {
  expect(response.statusCode).toBe(401);
  expect(response.headers['www-authenticate']).toBe('Bearer');
  expect(response.json()).toEqual({ detail: 'Could not validate credentials' });
}

// ==================== POST /users/signup ====================

describe('POST /users/signup', () => {
  it('creates an ordinary, active account and returns UserPublic', async () => {
    const email = randomEmail('signup');
    const response = await signup({ email, password: 'signup-password', full_name: 'Sign Up' });
    const body = expectUserPublic(response, { email, full_name: 'Sign Up', is_active: true, is_superuser: false });
    expect(response.body).not.toContain('signup-password');
    expect(response.headers.location).toBe(`/api/v1/users/${body.id}`);

    expect(await loginStatus(app, email, 'signup-password')).toBe(200);
    const read = await call('GET', `/users/${body.id}`, { headers: admin });
    expect(read.json()).toEqual(body);
  });

  it('takes full_name as optional (null when absent)', async () => {
    const email = randomEmail('noname');
    expectUserPublic(await signup({ email, password: 'signup-password' }), { email, full_name: null });
  });

  it('answers 409 for an email already in use, whatever its case', async () => {
    const email = randomEmail('dup');
    expect((await signup({ email, password: 'signup-password' })).statusCode).toBe(200);
    expectError(await signup({ email, password: 'other-password' }), 409, DUPLICATE);
    expectError(await signup({ email: email.toUpperCase(), password: 'other-password' }), 409, DUPLICATE);
    // The first account keeps its password.
    expect(await loginStatus(app, email, 'signup-password')).toBe(200);
    expect(await loginStatus(app, email, 'other-password')).toBe(400);
  });

  it('answers 409 when two signups for the same email race', async () => {
    const email = randomEmail('race');
    const results = await Promise.all([
      signup({ email, password: 'signup-password' }),
      signup({ email: email.toUpperCase(), password: 'signup-password' }),
    ]);
    expect(results.map((r) => r.statusCode).sort()).toEqual([200, 409]);
    expect(results.find((r) => r.statusCode === 409)!.json()).toEqual(DUPLICATE);
  });

  it('accepts passwords of exactly 8 and 128 characters', async () => {
    for (const password of ['p'.repeat(8), 'p'.repeat(128)]) {
      const email = randomEmail('bounds');
      expect((await signup({ email, password })).statusCode).toBe(200);
      expect(await loginStatus(app, email, password)).toBe(200);
    }
  });

  it('accepts a password with a whole surrogate pair (an emoji), which only itself opens', async () => {
    const email = randomEmail('emoji');
    const password = 'pw\uD83D\uDE00xxxxxx';
    expect((await signup({ email, password })).statusCode).toBe(200);
    expect(await loginStatus(app, email, password)).toBe(200);
    expect(await loginStatus(app, email, 'pw\uFFFDxxxxxx')).toBe(400);
  });

  it.each([
    ['a password too short', { password: 'p'.repeat(7) }, [[['body', 'password'], 'string_too_short']]],
    ['a password too long', { password: 'p'.repeat(129) }, [[['body', 'password'], 'string_too_long']]],
    // Hashed, it was "pw\uFFFDxxxxxx": two strings, one password.
    ['a password with an unpaired surrogate', { password: 'pw\uD800xxxxxx' }, [[['body', 'password'], 'value_error']]],
    ['no password', { password: undefined }, [[['body', 'password'], 'missing']]],
    ['no email', { email: undefined }, [[['body', 'email'], 'missing']]],
    ['an invalid email', { email: 'not-an-email' }, [[['body', 'email'], 'email_parsing']]],
    ['a full_name too long', { full_name: 'n'.repeat(256) }, [[['body', 'full_name'], 'string_too_long']]],
    ['an unknown field', { nickname: 'al' }, [[['body', 'nickname'], 'extra_forbidden']]],
    ['is_superuser (a privilege)', { is_superuser: true }, [[['body', 'is_superuser'], 'extra_forbidden']]],
    ['is_active', { is_active: false }, [[['body', 'is_active'], 'extra_forbidden']]],
    ['an id', { id: randomUUID() }, [[['body', 'id'], 'extra_forbidden']]],
  ] as [string, Record<string, unknown>, [string[], string][]][])('answers 422 for %s and creates nothing', async (_label, change, issues) => {
    const email = randomEmail('invalid');
    const payload: Record<string, unknown> = { email, password: 'signup-password', ...change };
    for (const [key, value] of Object.entries(payload)) if (value === undefined) delete payload[key];

    expect422(await signup(payload), issues);
    // Nothing was created: the same email signs up fine afterwards, as an ordinary user.
    expectUserPublic(await signup({ email, password: 'signup-password' }), { email, is_superuser: false });
  });

  it('answers 422 for a body that is not JSON', async () => {
    const response = await app.inject({
      method: 'POST',
      url: '/api/v1/users/signup',
      headers: { 'content-type': 'application/json' },
      payload: '{"email": ',
    });
    expect422(response, [[['body'], 'json_invalid']]);
  });

  it('answers 403 when open registration is off, while admins can still create accounts', async () => {
    const closed = await buildTestApp(database, { USERS_OPEN_REGISTRATION: 'false' });
    try {
      const email = randomEmail('closed');
      const response = await signup({ email, password: 'signup-password' }, { target: closed });
      expectError(response, 403, { detail: 'Open user registration is forbidden on this server' });
      expect(await loginStatus(closed, email, 'signup-password')).toBe(400);

      const created = await call('POST', '/users', {
        target: closed,
        // Each test app signs with its own key: log in on this one.
        headers: await superuserHeaders(closed),
        payload: { email, password: 'signup-password' },
      });
      expectUserPublic(created, { email });
    } finally {
      await closed.close();
    }
  });

  it('is rate limited per IP, each IP counted separately', async () => {
    const limited = await buildTestApp(database, { RATE_LIMIT_SIGNUP_PER_IP: '2' });
    try {
      for (let i = 0; i < 2; i++) {
        const response = await signup({ email: randomEmail('limited'), password: 'signup-password' }, { target: limited, remoteAddress: '10.7.0.1' });
        expect(response.statusCode).toBe(200);
      }
      const email = randomEmail('limited');
      const refused = await signup({ email, password: 'signup-password' }, { target: limited, remoteAddress: '10.7.0.1' });
      expectError(refused, 429, { detail: 'Too many requests, try again later' });
      const retryAfter = Number(refused.headers['retry-after']);
      expect(retryAfter).toBeGreaterThanOrEqual(1);
      expect(retryAfter).toBeLessThanOrEqual(60);
      expect(await loginStatus(limited, email, 'signup-password')).toBe(400);

      const elsewhere = await signup({ email, password: 'signup-password' }, { target: limited, remoteAddress: '10.7.0.2' });
      expect(elsewhere.statusCode).toBe(200);
    } finally {
      await limited.close();
    }
  });

  it('is rate limited per account too, whichever IP and spelling the attempts use', async () => {
    const limited = await buildTestApp(database, { RATE_LIMIT_SIGNUP_PER_ACCOUNT: '2' });
    try {
      const email = randomEmail('target');
      const attempts = [email, email.toUpperCase()];
      for (const [i, spelling] of attempts.entries()) {
        // The first creates the account, the second is a duplicate: both count.
        const response = await signup({ email: spelling, password: 'signup-password' }, { target: limited, remoteAddress: `10.8.0.${i + 1}` });
        expect(response.statusCode).toBe(i === 0 ? 200 : 409);
      }
      const refused = await signup({ email: ` ${email}`.trim(), password: 'signup-password' }, { target: limited, remoteAddress: '10.8.0.9' });
      expectError(refused, 429, { detail: 'Too many requests, try again later' });
      // Another account is not affected.
      const other = await signup({ email: randomEmail('free'), password: 'signup-password' }, { target: limited, remoteAddress: '10.8.0.9' });
      expect(other.statusCode).toBe(200);
    } finally {
      await limited.close();
    }
  });
});

// ==================== /users/me ====================

describe('GET /users/me', () => {
  it('returns the caller as UserPublic', async () => {
    const alice = await createUser(app);
    const response = await call('GET', '/users/me', { headers: alice.headers });
    expectUserPublic(response, { id: alice.user.id, email: alice.email, is_superuser: false, is_active: true });
  });

  it('answers 401 without a valid token', async () => {
    const response = await call('GET', '/users/me');
    expectError(response, 401, { detail: 'Not authenticated' });
    expect(response.headers['www-authenticate']).toBe('Bearer');
    expectUnauthorized(await call('GET', '/users/me', { headers: bearer('not-a-token') }));
  });
});

describe('PATCH /users/me', () => {
  it('updates the full name, and moves updated_at on', async () => {
    const alice = await createUser(app);
    const response = await call('PATCH', '/users/me', { headers: alice.headers, payload: { full_name: 'Alice Liddell' } });
    const body = expectUserPublic(response, { id: alice.user.id, full_name: 'Alice Liddell', email: alice.email });
    expect(new Date(body.updated_at).getTime()).toBeGreaterThan(alice.user.updated_at.getTime());
    expect(body.created_at).toBe(alice.user.created_at.toISOString());

    const cleared = await call('PATCH', '/users/me', { headers: alice.headers, payload: { full_name: null } });
    expectUserPublic(cleared, { full_name: null });
  });

  it('changes nothing for an empty body', async () => {
    const alice = await createUser(app);
    const response = await call('PATCH', '/users/me', { headers: alice.headers, payload: {} });
    expectUserPublic(response, { id: alice.user.id, email: alice.email, full_name: null });
  });

  it('changes the email, given the current password: the new one logs in, the old one no longer does', async () => {
    const alice = await createUser(app);
    const email = randomEmail('moved');
    expectUserPublic(await call('PATCH', '/users/me', { headers: alice.headers, payload: { email, current_password: alice.password } }), { email });
    expect(await loginStatus(app, email, alice.password)).toBe(200);
    expect(await loginStatus(app, alice.email, alice.password)).toBe(400);
    const fresh = bearer(await login(app, email, alice.password));
    expect((await call('GET', '/users/me', { headers: fresh })).json<UserBody>().email).toBe(email);
  });

  it('ends every session on a change of email, as a password change does: earlier tokens (this one too) are 401, API keys work on', async () => {
    const alice = await createUser(app);
    // Another session of the same account (a second device, or whoever stole a token).
    const elsewhere = bearer(await login(app, alice.email, alice.password));
    const created = await call('POST', '/api-keys', { headers: alice.headers, payload: { name: 'ci' } });
    const apiKey = bearer(created.json<{ key: string }>().key);
    const email = randomEmail('moved');
    expectUserPublic(await call('PATCH', '/users/me', { headers: alice.headers, payload: { email, current_password: alice.password } }), { email });
    expectUnauthorized(await call('GET', '/users/me', { headers: elsewhere }));
    expectUnauthorized(await call('GET', '/users/me', { headers: alice.headers }));
    expect((await call('GET', '/api-keys', { headers: apiKey })).statusCode).toBe(200);
    expect((await call('GET', '/users/me', { headers: bearer(await login(app, email, alice.password)) })).statusCode).toBe(200);
  });

  it('ends no session for a change of the profile alone, nor a re-cased email', async () => {
    const alice = await createUser(app);
    const payload = { email: alice.email.toUpperCase(), full_name: 'Alice', current_password: alice.password };
    expectUserPublic(await call('PATCH', '/users/me', { headers: alice.headers, payload }), { email: payload.email, full_name: 'Alice' });
    expect((await call('GET', '/users/me', { headers: alice.headers })).statusCode).toBe(200);
  });

  it('answers 422 for a change of email without the current password, 400 with a wrong one, changing nothing', async () => {
    // A stolen access token alone must not move the account to the thief's mailbox (and password recovery then hand it over).
    const alice = await createUser(app);
    const email = randomEmail('thief');
    const missing = await call('PATCH', '/users/me', { headers: alice.headers, payload: { email, full_name: 'Thief' } });
    expect422(missing, [[['body', 'current_password'], 'missing']]);
    const wrong = await call('PATCH', '/users/me', { headers: alice.headers, payload: { email, current_password: 'not-the-password' } });
    expectError(wrong, 400, { detail: 'Incorrect password' });
    expect((await call('GET', '/users/me', { headers: alice.headers })).json()).toMatchObject({ email: alice.email, full_name: null });
    expect(await loginStatus(app, email, alice.password)).toBe(400);
  });

  it('answers 400 for a wrong current password given with other fields, changing nothing', async () => {
    const alice = await createUser(app);
    const wrong = await call('PATCH', '/users/me', { headers: alice.headers, payload: { full_name: 'Alice', current_password: 'not-the-password' } });
    expectError(wrong, 400, { detail: 'Incorrect password' });
    expect((await call('GET', '/users/me', { headers: alice.headers })).json()).toMatchObject({ full_name: null });
  });

  it('needs no password to send the email unchanged with the profile (a form sending every field)', async () => {
    const alice = await createUser(app);
    expectUserPublic(await call('PATCH', '/users/me', { headers: alice.headers, payload: { email: alice.email, full_name: 'Alice' } }), { email: alice.email, full_name: 'Alice' });
  });

  it('lets a user re-case their own email', async () => {
    const alice = await createUser(app);
    const upper = alice.email.toUpperCase();
    expectUserPublic(await call('PATCH', '/users/me', { headers: alice.headers, payload: { email: upper } }), { email: upper });
  });

  it("answers 409 for another account's email, whatever its case", async () => {
    const alice = await createUser(app);
    const bob = await createUser(app);
    for (const email of [bob.email, bob.email.toUpperCase()]) {
      expectError(await call('PATCH', '/users/me', { headers: alice.headers, payload: { email, current_password: alice.password } }), 409, DUPLICATE);
    }
    expect((await call('GET', '/users/me', { headers: alice.headers })).json<UserBody>().email).toBe(alice.email);
  });

  it.each([
    ['is_superuser', { is_superuser: true }],
    ['is_active', { is_active: false }],
    ['password', { password: 'sneaky-password' }],
    ['id', { id: randomUUID() }],
  ] as [string, Record<string, unknown>][])('answers 422 for %s, which a user cannot set', async (field, payload) => {
    const alice = await createUser(app);
    expect422(await call('PATCH', '/users/me', { headers: alice.headers, payload }), [[['body', field], 'extra_forbidden']]);
    const me = await call('GET', '/users/me', { headers: alice.headers });
    expect(me.json()).toMatchObject({ is_superuser: false, is_active: true });
    expect(await loginStatus(app, alice.email, alice.password)).toBe(200);
  });

  it('answers 422 for an invalid email', async () => {
    const alice = await createUser(app);
    expect422(await call('PATCH', '/users/me', { headers: alice.headers, payload: { email: 'nope', current_password: alice.password } }), [[['body', 'email'], 'email_parsing']]);
  });
});

describe('PATCH /users/me/password', () => {
  const change = (headers: Record<string, string>, payload: Record<string, unknown>) => call('PATCH', '/users/me/password', { headers, payload });

  it('changes the password', async () => {
    const alice = await createUser(app);
    const response = await change(alice.headers, { current_password: alice.password, new_password: 'brand-new-password' });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual({ message: 'Password updated successfully' });
    expect(await loginStatus(app, alice.email, 'brand-new-password')).toBe(200);
    expect(await loginStatus(app, alice.email, alice.password)).toBe(400);
    // The token used for the change died with the old password.
    expectUnauthorized(await call('GET', '/users/me', { headers: alice.headers }));
  });

  it('answers 400 for a wrong current password, changing nothing and revoking nothing', async () => {
    const alice = await createUser(app);
    const response = await change(alice.headers, { current_password: 'not-the-password', new_password: 'brand-new-password' });
    expectError(response, 400, { detail: 'Incorrect password' });
    expect(await loginStatus(app, alice.email, alice.password)).toBe(200);
    expect(await loginStatus(app, alice.email, 'brand-new-password')).toBe(400);
    expect((await call('GET', '/users/me', { headers: alice.headers })).statusCode).toBe(200);
  });

  it('answers 400 when the new password is the current one', async () => {
    const alice = await createUser(app);
    const response = await change(alice.headers, { current_password: alice.password, new_password: alice.password });
    expectError(response, 400, { detail: 'New password cannot be the same as the current one' });
    expect((await call('GET', '/users/me', { headers: alice.headers })).statusCode).toBe(200);
  });

  it.each([
    ['a new password too short', { new_password: 'p'.repeat(7) }, [[['body', 'new_password'], 'string_too_short']]],
    ['a new password too long', { new_password: 'p'.repeat(129) }, [[['body', 'new_password'], 'string_too_long']]],
    ['a new password with an unpaired surrogate', { new_password: 'pw\uD800xxxxxx' }, [[['body', 'new_password'], 'value_error']]],
    ['no current password', { current_password: undefined }, [[['body', 'current_password'], 'missing']]],
    ['no new password', { new_password: undefined }, [[['body', 'new_password'], 'missing']]],
    ['an unknown field', { token_version: 0 }, [[['body', 'token_version'], 'extra_forbidden']]],
  ] as [string, Record<string, unknown>, [string[], string][]][])('answers 422 for %s', async (_label, override, issues) => {
    const alice = await createUser(app);
    const payload: Record<string, unknown> = { current_password: alice.password, new_password: 'brand-new-password', ...override };
    for (const [key, value] of Object.entries(payload)) if (value === undefined) delete payload[key];
    expect422(await change(alice.headers, payload), issues);
    expect(await loginStatus(app, alice.email, alice.password)).toBe(200);
  });

  it('answers 401 without a token', async () => {
    const response = await call('PATCH', '/users/me/password', { payload: { current_password: 'x', new_password: 'brand-new-password' } });
    expectError(response, 401, { detail: 'Not authenticated' });
  });
});

describe('DELETE /users/me', () => {
  it('deletes the account, with what it owns', async () => {
    const alice = await createUser(app);
    const project = await createProject(app, alice.headers, 'Owned');
    const response = await call('DELETE', '/users/me', { headers: alice.headers });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual(DELETED);

    expect(await loginStatus(app, alice.email, alice.password)).toBe(400);
    expectUnauthorized(await call('GET', '/users/me', { headers: alice.headers }));
    expectError(await call('GET', `/users/${alice.user.id}`, { headers: admin }), 404, NOT_FOUND);
    expectError(await call('GET', `/projects/${project.id}`, { headers: admin }), 404, { detail: 'Project not found' });
  });

  it('lets a superuser who is not the last one delete their own account', async () => {
    const root = await createUser(app, { superuser: true });
    const response = await call('DELETE', '/users/me', { headers: root.headers });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual(DELETED);
    expect(await loginStatus(app, root.email, root.password)).toBe(400);
  });
});

// ==================== Administration ====================

describe('GET /users', () => {
  it('answers 403 for an ordinary user and 401 without a token', async () => {
    const alice = await createUser(app);
    expectError(await call('GET', '/users', { headers: alice.headers }), 403, NOT_ENOUGH);
    expectError(await call('GET', '/users'), 401, { detail: 'Not authenticated' });
  });

  it('lists users newest first as {data, count} of UserPublic, paged by limit and offset', async () => {
    const created = [];
    for (let i = 0; i < 3; i++) created.push(await createUser(app));
    const newestFirst = created.map((u) => u.user.id).reverse();

    const first = await call('GET', '/users?limit=2', { headers: admin });
    expect(first.statusCode).toBe(200);
    const page = first.json<{ data: UserBody[]; count: number }>();
    expect(Object.keys(page).sort()).toEqual(['count', 'data']);
    expect(page.data.map((u) => u.id)).toEqual(newestFirst.slice(0, 2));
    for (const user of page.data) expect(Object.keys(user).sort()).toEqual(USER_PUBLIC_KEYS);
    expect(first.body).not.toContain('hashed_password');
    expect(page.count).toBeGreaterThanOrEqual(4);

    const second = await call('GET', '/users?limit=2&offset=2', { headers: admin });
    const secondPage = second.json<{ data: UserBody[]; count: number }>();
    expect(secondPage.count).toBe(page.count);
    expect(secondPage.data[0]!.id).toBe(newestFirst[2]);

    // Walking every page visits each user once, and the total is the count.
    const seen: string[] = [];
    for (let offset = 0; offset < page.count; offset += 7) {
      const response = await call('GET', `/users?limit=7&offset=${offset}`, { headers: admin });
      seen.push(...response.json<{ data: UserBody[] }>().data.map((u) => u.id));
    }
    expect(seen).toHaveLength(page.count);
    expect(new Set(seen).size).toBe(page.count);

    const past = await call('GET', `/users?offset=${page.count}`, { headers: admin });
    expect(past.json()).toEqual({ data: [], count: page.count });
  });

  it('defaults to 20 per page and allows up to 100', async () => {
    while ((await call('GET', '/users?limit=1', { headers: admin })).json<{ count: number }>().count <= 21) await createUser(app);
    const defaults = (await call('GET', '/users', { headers: admin })).json<{ data: UserBody[]; count: number }>();
    expect(defaults.data).toHaveLength(20);
    expect(defaults.count).toBeGreaterThan(21);
    const max = await call('GET', '/users?limit=100', { headers: admin });
    expect(max.statusCode).toBe(200);
    expect(max.json<{ data: UserBody[] }>().data).toHaveLength(Math.min(100, defaults.count));
  });

  it.each([
    ['limit=0', [[['query', 'limit'], 'greater_than_equal']]],
    ['limit=101', [[['query', 'limit'], 'less_than_equal']]],
    ['limit=-1', [[['query', 'limit'], 'greater_than_equal']]],
    ['limit=abc', [[['query', 'limit'], 'float_parsing']]],
    ['limit=2.5', [[['query', 'limit'], 'int_from_float']]],
    ['offset=-1', [[['query', 'offset'], 'greater_than_equal']]],
    ['offset=abc', [[['query', 'offset'], 'float_parsing']]],
    // What Number() reads as a number, and no query parameter writes as one.
    ['limit=0x10', [[['query', 'limit'], 'float_parsing']]],
    ['limit=1e1', [[['query', 'limit'], 'float_parsing']]],
    ['limit=%205', [[['query', 'limit'], 'float_parsing']]],
    ['offset=', [[['query', 'offset'], 'float_parsing']]],
  ] as [string, [string[], string][]][])('answers 422 for %s', async (query, issues) => {
    expect422(await call('GET', `/users?${query}`, { headers: admin }), issues);
  });
});

describe('POST /users', () => {
  it('creates an account, mails the new user, and never mails the password', async () => {
    const email = randomEmail('created');
    const response = await call('POST', '/users', {
      headers: admin,
      payload: { email, password: 'initial-password', full_name: 'New Person' },
    });
    const created = expectUserPublic(response, { email, full_name: 'New Person', is_active: true, is_superuser: false });
    expect(response.headers.location).toBe(`/api/v1/users/${created.id}`);
    expect(await loginStatus(app, email, 'initial-password')).toBe(200);

    const mail = await capture.waitFor(email);
    expect(mail.to).toEqual([email]);
    expect(mail.text).toContain('New account');
    expect(mail.text).toContain(email);
    expect(mail.text).not.toContain('initial-password');
  });

  it('creates superusers and inactive accounts when asked', async () => {
    const rootEmail = randomEmail('root');
    expectUserPublic(await call('POST', '/users', { headers: admin, payload: { email: rootEmail, password: 'root-password', is_superuser: true } }), {
      is_superuser: true,
    });
    const rootToken = await login(app, rootEmail, 'root-password');
    expect((await call('GET', '/users', { headers: bearer(rootToken) })).statusCode).toBe(200);

    const sleeperEmail = randomEmail('sleeper');
    expectUserPublic(await call('POST', '/users', { headers: admin, payload: { email: sleeperEmail, password: 'sleeper-password', is_active: false } }), {
      is_active: false,
    });
    const refused = await app.inject({
      method: 'POST',
      url: '/api/v1/login/access-token',
      payload: new URLSearchParams({ username: sleeperEmail, password: 'sleeper-password' }).toString(),
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
    });
    expectError(refused, 400, { detail: 'Inactive user' });
  });

  it('answers 409 for an email in use, whatever its case', async () => {
    const alice = await createUser(app);
    for (const email of [alice.email, alice.email.toUpperCase()]) {
      expectError(await call('POST', '/users', { headers: admin, payload: { email, password: 'initial-password' } }), 409, DUPLICATE);
    }
  });

  it('answers 403 for an ordinary user, creating nothing', async () => {
    const alice = await createUser(app);
    const email = randomEmail('nope');
    const response = await call('POST', '/users', { headers: alice.headers, payload: { email, password: 'initial-password', is_superuser: true } });
    expectError(response, 403, NOT_ENOUGH);
    expect(await loginStatus(app, email, 'initial-password')).toBe(400);
  });

  it.each([
    ['an id', { id: randomUUID() }, [[['body', 'id'], 'extra_forbidden']]],
    ['created_at', { created_at: '2020-01-01T00:00:00Z' }, [[['body', 'created_at'], 'extra_forbidden']]],
    ['a short password', { password: 'short' }, [[['body', 'password'], 'string_too_short']]],
    ['a password with an unpaired surrogate', { password: 'pw\uD800xxxxxx' }, [[['body', 'password'], 'value_error']]],
    ['an invalid email', { email: 'nope' }, [[['body', 'email'], 'email_parsing']]],
  ] as [string, Record<string, unknown>, [string[], string][]][])('answers 422 for %s', async (_label, change, issues) => {
    const payload = { email: randomEmail('invalid'), password: 'initial-password', ...change };
    expect422(await call('POST', '/users', { headers: admin, payload }), issues);
  });
});

describe('GET /users/{user_id}', () => {
  it('lets a user read their own account', async () => {
    const alice = await createUser(app);
    expectUserPublic(await call('GET', `/users/${alice.user.id}`, { headers: alice.headers }), { id: alice.user.id, email: alice.email });
  });

  it("answers 403 for another user's account, and for an unknown id, to an ordinary user", async () => {
    const alice = await createUser(app);
    const bob = await createUser(app);
    expectError(await call('GET', `/users/${bob.user.id}`, { headers: alice.headers }), 403, NOT_ENOUGH);
    expectError(await call('GET', `/users/${randomUUID()}`, { headers: alice.headers }), 403, NOT_ENOUGH);
  });

  it('lets a superuser read anyone, and answers 404 for an unknown id', async () => {
    const alice = await createUser(app);
    expectUserPublic(await call('GET', `/users/${alice.user.id}`, { headers: admin }), { id: alice.user.id, email: alice.email });
    expectError(await call('GET', `/users/${randomUUID()}`, { headers: admin }), 404, NOT_FOUND);
  });

  it('answers 422 for a malformed id, and 401 without a token', async () => {
    expect422(await call('GET', '/users/not-a-uuid', { headers: admin }), [[['path', 'user_id'], 'uuid_parsing']]);
    expectError(await call('GET', `/users/${randomUUID()}`), 401, { detail: 'Not authenticated' });
  });
});

describe('PATCH /users/{user_id}', () => {
  it('updates a user as a superuser', async () => {
    const alice = await createUser(app);
    const email = randomEmail('renamed');
    const response = await call('PATCH', `/users/${alice.user.id}`, { headers: admin, payload: { full_name: 'Renamed', email } });
    expectUserPublic(response, { id: alice.user.id, full_name: 'Renamed', email, is_superuser: false });
    // The email moved: the user's sessions end, as their own change of email ends them.
    expectUnauthorized(await call('GET', '/users/me', { headers: alice.headers }));
    expect(await loginStatus(app, email, alice.password)).toBe(200);
  });

  it("keeps a user's sessions on a change of name or of the email's case alone", async () => {
    const alice = await createUser(app);
    const payload = { full_name: 'Renamed', email: alice.email.toUpperCase() };
    expectUserPublic(await call('PATCH', `/users/${alice.user.id}`, { headers: admin, payload }), { id: alice.user.id, full_name: 'Renamed' });
    expect((await call('GET', '/users/me', { headers: alice.headers })).statusCode).toBe(200);
  });

  it('changes nothing for an empty body', async () => {
    const alice = await createUser(app);
    expectUserPublic(await call('PATCH', `/users/${alice.user.id}`, { headers: admin, payload: {} }), { id: alice.user.id, email: alice.email });
  });

  it("sets a user's password, revoking their tokens", async () => {
    const alice = await createUser(app);
    const response = await call('PATCH', `/users/${alice.user.id}`, { headers: admin, payload: { password: 'admin-set-password' } });
    expectUserPublic(response, { id: alice.user.id });
    expect(response.body).not.toContain('admin-set-password');
    expectUnauthorized(await call('GET', '/users/me', { headers: alice.headers }));
    expect(await loginStatus(app, alice.email, 'admin-set-password')).toBe(200);
    expect(await loginStatus(app, alice.email, alice.password)).toBe(400);
  });

  it('promotes a user to superuser', async () => {
    const alice = await createUser(app);
    expectError(await call('GET', '/users', { headers: alice.headers }), 403, NOT_ENOUGH);
    expectUserPublic(await call('PATCH', `/users/${alice.user.id}`, { headers: admin, payload: { is_superuser: true } }), { is_superuser: true });
    expect((await call('GET', '/users', { headers: alice.headers })).statusCode).toBe(200);
  });

  it("answers 409 for another account's email, whatever its case", async () => {
    const alice = await createUser(app);
    const bob = await createUser(app);
    for (const email of [bob.email, bob.email.toUpperCase()]) {
      expectError(await call('PATCH', `/users/${alice.user.id}`, { headers: admin, payload: { email } }), 409, DUPLICATE);
    }
  });

  it('answers 403 for an ordinary user, even on their own account', async () => {
    const alice = await createUser(app);
    const bob = await createUser(app);
    for (const id of [alice.user.id, bob.user.id]) {
      expectError(await call('PATCH', `/users/${id}`, { headers: alice.headers, payload: { is_superuser: true } }), 403, NOT_ENOUGH);
    }
    expect((await call('GET', '/users/me', { headers: alice.headers })).json()).toMatchObject({ is_superuser: false });
  });

  it('answers 404 for an unknown id, 422 for a malformed one or an unknown field', async () => {
    expectError(await call('PATCH', `/users/${randomUUID()}`, { headers: admin, payload: { full_name: 'Ghost' } }), 404, NOT_FOUND);
    expect422(await call('PATCH', '/users/not-a-uuid', { headers: admin, payload: { full_name: 'Ghost' } }), [[['path', 'user_id'], 'uuid_parsing']]);
    const alice = await createUser(app);
    expect422(await call('PATCH', `/users/${alice.user.id}`, { headers: admin, payload: { token_version: 5 } }), [
      [['body', 'token_version'], 'extra_forbidden'],
    ]);
    expect422(await call('PATCH', `/users/${alice.user.id}`, { headers: admin, payload: { password: 'short' } }), [
      [['body', 'password'], 'string_too_short'],
    ]);
    expect422(await call('PATCH', `/users/${alice.user.id}`, { headers: admin, payload: { password: 'pw\uD800xxxxxx' } }), [
      [['body', 'password'], 'value_error'],
    ]);
    expect(await loginStatus(app, alice.email, alice.password)).toBe(200);
  });
});

describe('DELETE /users/{user_id}', () => {
  it('deletes a user as a superuser', async () => {
    const alice = await createUser(app);
    await createProject(app, alice.headers);
    const response = await call('DELETE', `/users/${alice.user.id}`, { headers: admin });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual(DELETED);
    expectError(await call('GET', `/users/${alice.user.id}`, { headers: admin }), 404, NOT_FOUND);
    expectError(await call('DELETE', `/users/${alice.user.id}`, { headers: admin }), 404, NOT_FOUND);
    expect(await loginStatus(app, alice.email, alice.password)).toBe(400);
  });

  it('answers 403 for an ordinary user, deleting nothing', async () => {
    const alice = await createUser(app);
    const bob = await createUser(app);
    expectError(await call('DELETE', `/users/${bob.user.id}`, { headers: alice.headers }), 403, NOT_ENOUGH);
    expectError(await call('DELETE', `/users/${alice.user.id}`, { headers: alice.headers }), 403, NOT_ENOUGH);
    expect(await loginStatus(app, bob.email, bob.password)).toBe(200);
  });

  it('answers 403 to a superuser deleting themselves this way', async () => {
    const root = await createUser(app, { superuser: true });
    expectError(await call('DELETE', `/users/${root.user.id}`, { headers: root.headers }), 403, {
      detail: 'Super users are not allowed to delete themselves',
    });
    expect((await call('GET', '/users/me', { headers: root.headers })).statusCode).toBe(200);
  });

  it('answers 404 for an unknown id and 422 for a malformed one', async () => {
    expectError(await call('DELETE', `/users/${randomUUID()}`, { headers: admin }), 404, NOT_FOUND);
    expect422(await call('DELETE', '/users/not-a-uuid', { headers: admin }), [[['path', 'user_id'], 'uuid_parsing']]);
  });
});

// ==================== Through a superuser's API key ====================

describe("user administration through a superuser's API key", () => {
  const SIGN_IN = { detail: 'API keys cannot administer superusers; sign in instead' };
  let boss: Awaited<ReturnType<typeof createUser>>;
  let key: Record<string, string>;

  beforeAll(async () => {
    boss = await createUser(app, { superuser: true });
    const created = await call('POST', '/api-keys', { headers: boss.headers, payload: { name: 'automation' } });
    expect(created.statusCode).toBe(200);
    key = bearer(created.json<{ key: string }>().key);
  });

  it("cannot change, deactivate or delete a superuser, its own account included: a leaked key must not become a superuser's sign-in", async () => {
    const other = await createUser(app, { superuser: true });
    for (const target of [boss, other]) {
      for (const payload of [{ password: 'taken-over-1234' }, { email: randomEmail('thief') }, { full_name: 'X' }, { is_active: false }]) {
        expectError(await call('PATCH', `/users/${target.user.id}`, { headers: key, payload }), 403, SIGN_IN);
      }
      expect(await loginStatus(app, target.email, target.password)).toBe(200);
    }
    expectError(await call('DELETE', `/users/${other.user.id}`, { headers: key }), 403, SIGN_IN);
    expect((await call('GET', `/users/${other.user.id}`, { headers: boss.headers })).json<UserBody>()).toMatchObject({ email: other.email, is_active: true, full_name: null });
  });

  it('cannot create a superuser or make one', async () => {
    const email = randomEmail('minted');
    expectError(await call('POST', '/users', { headers: key, payload: { email, password: 'minted-pass-1234', is_superuser: true } }), 403, SIGN_IN);
    expect(await loginStatus(app, email, 'minted-pass-1234')).toBe(400);
    const plain = await createUser(app);
    expectError(await call('PATCH', `/users/${plain.user.id}`, { headers: key, payload: { is_superuser: true, password: 'minted-pass-1234' } }), 403, SIGN_IN);
    expect((await call('GET', `/users/${plain.user.id}`, { headers: boss.headers })).json<UserBody>().is_superuser).toBe(false);
    expect(await loginStatus(app, plain.email, plain.password)).toBe(200);
  });

  it('administers regular users as a signed-in superuser does', async () => {
    const email = randomEmail('provisioned');
    const created = expectUserPublic(await call('POST', '/users', { headers: key, payload: { email, password: 'provisioned-1234' } }), { email, is_superuser: false });
    expectUserPublic(await call('PATCH', `/users/${created.id}`, { headers: key, payload: { full_name: 'P', password: 'reset-pass-1234' } }), { full_name: 'P' });
    expect(await loginStatus(app, email, 'reset-pass-1234')).toBe(200);
    expect(await call('DELETE', `/users/${created.id}`, { headers: key })).toMatchObject({ statusCode: 200 });
  });
});

// ==================== The last superuser ====================

describe('the last superuser', () => {
  // A database of its own, where the configured superuser starts as the only one.
  let lonelyDatabase: Database;
  let destroy: () => Promise<void>;
  let lonely: FastifyInstance;
  let root: Record<string, string>;
  let rootId: string;

  beforeAll(async () => {
    const opened = await openTestDatabase();
    lonelyDatabase = opened.database;
    destroy = opened.destroy;
    lonely = await buildTestApp(lonelyDatabase);
    root = await superuserHeaders(lonely);
    rootId = (await call('GET', '/users/me', { target: lonely, headers: root })).json<UserBody>().id;
  });
  afterAll(async () => {
    await lonely?.close();
    await destroy?.();
  });

  const activeSuperusers = async (headers = root) => {
    const page = await call('GET', '/users?limit=100', { target: lonely, headers });
    expect(page.statusCode).toBe(200);
    return page
      .json<{ data: UserBody[] }>()
      .data.filter((u) => u.is_superuser && u.is_active)
      .map((u) => u.email);
  };

  it('cannot delete their own account', async () => {
    expect(await activeSuperusers()).toEqual([SUPERUSER_EMAIL]);
    expectError(await call('DELETE', '/users/me', { target: lonely, headers: root }), 403, {
      detail: 'The last superuser cannot delete their account',
    });
    expect((await call('GET', '/users/me', { target: lonely, headers: root })).statusCode).toBe(200);
  });

  it('cannot be demoted or deactivated', async () => {
    for (const payload of [{ is_superuser: false }, { is_active: false }, { is_superuser: false, is_active: false }]) {
      expectError(await call('PATCH', `/users/${rootId}`, { target: lonely, headers: root, payload }), 403, {
        detail: 'The last superuser cannot be demoted or deactivated',
      });
    }
    expect(await activeSuperusers()).toEqual([SUPERUSER_EMAIL]);
    // Other changes to the last superuser are fine.
    expectUserPublic(await call('PATCH', `/users/${rootId}`, { target: lonely, headers: root, payload: { full_name: 'Root', is_superuser: true } }), {
      full_name: 'Root',
      is_superuser: true,
    });
  });

  it('can be demoted once another superuser exists, who then is the last one', async () => {
    const deputy = await createUser(lonely, { superuser: true });
    const demoted = await call('PATCH', `/users/${rootId}`, { target: lonely, headers: deputy.headers, payload: { is_superuser: false } });
    expectUserPublic(demoted, { id: rootId, is_superuser: false });
    expectError(await call('GET', '/users', { target: lonely, headers: root }), 403, NOT_ENOUGH);
    expect(await activeSuperusers(deputy.headers)).toEqual([deputy.email]);

    const deputyId = deputy.user.id;
    expectError(await call('PATCH', `/users/${deputyId}`, { target: lonely, headers: deputy.headers, payload: { is_superuser: false } }), 403, {
      detail: 'The last superuser cannot be demoted or deactivated',
    });
    expectError(await call('DELETE', '/users/me', { target: lonely, headers: deputy.headers }), 403, {
      detail: 'The last superuser cannot delete their account',
    });

    // Put things back: the deputy promotes root again, and root demotes the deputy.
    expectUserPublic(await call('PATCH', `/users/${rootId}`, { target: lonely, headers: deputy.headers, payload: { is_superuser: true } }), {
      is_superuser: true,
    });
    expectUserPublic(await call('PATCH', `/users/${deputyId}`, { target: lonely, headers: root, payload: { is_superuser: false } }), {
      is_superuser: false,
    });
    expect(await activeSuperusers()).toEqual([SUPERUSER_EMAIL]);
  });

  it('survives two superusers demoting each other at the same time', async () => {
    const a = await createUser(lonely, { superuser: true });
    const b = await createUser(lonely, { superuser: true });
    // Leave exactly a and b as the active superusers.
    expect((await call('PATCH', `/users/${rootId}`, { target: lonely, headers: a.headers, payload: { is_superuser: false } })).statusCode).toBe(200);

    const results = await Promise.all([
      call('PATCH', `/users/${b.user.id}`, { target: lonely, headers: a.headers, payload: { is_superuser: false } }),
      call('PATCH', `/users/${a.user.id}`, { target: lonely, headers: b.headers, payload: { is_superuser: false } }),
    ]);
    expect(results.map((r) => r.statusCode).sort()).toEqual([200, 403]);

    const survivor = results[0].statusCode === 200 ? a : b;
    // The loser was refused either as no longer a superuser or as the last one, depending on timing.
    expect([NOT_ENOUGH.detail, 'The last superuser cannot be demoted or deactivated']).toContain(
      results.find((r) => r.statusCode === 403)!.json<{ detail: string }>().detail,
    );
    expect(await activeSuperusers(survivor.headers)).toEqual([survivor.email]);

    // Put things back: only root is a superuser again.
    expect((await call('PATCH', `/users/${rootId}`, { target: lonely, headers: survivor.headers, payload: { is_superuser: true } })).statusCode).toBe(200);
    expect((await call('PATCH', `/users/${survivor.user.id}`, { target: lonely, headers: root, payload: { is_superuser: false } })).statusCode).toBe(200);
    expect(await activeSuperusers()).toEqual([SUPERUSER_EMAIL]);
  });

  it('survives two superusers deleting each other at the same time', async () => {
    const a = await createUser(lonely, { superuser: true });
    const b = await createUser(lonely, { superuser: true });
    expect((await call('PATCH', `/users/${rootId}`, { target: lonely, headers: a.headers, payload: { is_superuser: false } })).statusCode).toBe(200);

    const results = await Promise.all([
      call('DELETE', `/users/${b.user.id}`, { target: lonely, headers: a.headers }),
      call('DELETE', `/users/${a.user.id}`, { target: lonely, headers: b.headers }),
    ]);
    expect(results.filter((r) => r.statusCode === 200)).toHaveLength(1);
    const survivor = results[0].statusCode === 200 ? a : b;
    // The loser is refused as deleted already or, when both passed authentication, as the last superuser.
    const loser = results.find((r) => r.statusCode !== 200)!;
    expect([
      [401, 'Could not validate credentials'],
      [403, 'The last superuser cannot be deleted'],
    ]).toContainEqual([loser.statusCode, loser.json<{ detail: string }>().detail]);
    expect(await activeSuperusers(survivor.headers)).toEqual([survivor.email]);
  });
});
