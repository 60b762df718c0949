import { createHash, createHmac, randomBytes, randomUUID } from 'node:crypto';

import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { decodeJwt, decodeProtectedHeader, SignJWT, UnsecuredJWT } from 'jose';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { Database } from '../../src/core/db.js';

import { buildTestApp, openTestDatabase, SUPERUSER_EMAIL, useTestApp } from '../helpers/app.js';
import { bearer, createUser, login, randomEmail, superuserHeaders, USER_PUBLIC_KEYS, type UserBody } from '../helpers/factories.js';

const ctx = useTestApp();

const TOO_MANY = { detail: 'Too many requests, try again later' };

// ==================== Helpers ====================

function loginForm(app: FastifyInstance, fields: Record<string, string>, remoteAddress?: string): Promise<LightMyRequestResponse> {
  return app.inject({
    method: 'POST',
    url: '/api/v1/login/access-token',
    payload: new URLSearchParams(fields).toString(),
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    ...(remoteAddress ? { remoteAddress } : {}),
  });
}

function testToken(app: FastifyInstance, headers: Record<string, string> = {}): Promise<LightMyRequestResponse> {
  return app.inject({ method: 'POST', url: '/api/v1/login/test-token', headers });
}

function expectUnauthorized(response: LightMyRequestResponse, detail = 'Could not validate credentials'): void {
  expect(response.statusCode).toBe(401);
  expect(response.headers['www-authenticate']).toBe('Bearer');
  expect(response.json()).toEqual({ detail });
}

function expectTooMany(response: LightMyRequestResponse, windowSeconds = 60): void {
  expect(response.statusCode).toBe(429);
  expect(response.json()).toEqual(TOO_MANY);
  const retryAfter = Number(response.headers['retry-after']);
  expect(Number.isInteger(retryAfter)).toBe(true);
  expect(retryAfter).toBeGreaterThanOrEqual(1);
  expect(retryAfter).toBeLessThanOrEqual(windowSeconds);
}

/** The HS256 key src/core/security.ts derives from SECRET_KEY. */
function jwtKey(app: FastifyInstance): Buffer {
  return createHash('sha256').update(`keel:jwt:${app.settings.SECRET_KEY}`).digest();
}

const nowSeconds = () => Math.floor(Date.now() / 1000);

/** A well-formed token, signed with jose like the app's own, with claims the test chooses. */
function signToken(
  key: Uint8Array,
  claims: { sub: string; ver: number; typ: string; iss?: string; iat?: number; exp: number },
): Promise<string> {
  const { sub, iss = 'keel', iat = nowSeconds(), exp, ...rest } = claims;
  return new SignJWT(rest).setProtectedHeader({ alg: 'HS256', typ: 'JWT' }).setSubject(sub).setIssuer(iss).setIssuedAt(iat).setExpirationTime(exp).sign(key);
}

const b64json = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url');

/** A token assembled by hand: any header, any payload, HMAC over them with `hash` (or no signature). */
function rawToken(header: Record<string, unknown>, payload: Record<string, unknown>, key: Buffer | null, hash = 'sha256'): string {
  const input = `${b64json(header)}.${b64json(payload)}`;
  const signature = key ? createHmac(hash, key).update(input).digest('base64url') : '';
  return `${input}.${signature}`;
}

function accessClaims(userId: string, overrides: Record<string, unknown> = {}): Record<string, unknown> {
  const now = nowSeconds();
  return { ver: 0, typ: 'access', sub: userId, iss: 'keel', iat: now, exp: now + 600, ...overrides };
}

// ==================== POST /login/access-token ====================

describe('POST /login/access-token', () => {
  it('returns a bearer access token that authenticates the user', async () => {
    const alice = await createUser(ctx.app);
    const response = await loginForm(ctx.app, { username: alice.email, password: alice.password });
    expect(response.statusCode).toBe(200);
    const body = response.json<{ access_token: string; token_type: string }>();
    expect(Object.keys(body).sort()).toEqual(['access_token', 'token_type']);
    expect(body.token_type).toBe('bearer');

    // A pinned algorithm, an access type claim, the user as subject, expiry from settings.
    expect(decodeProtectedHeader(body.access_token).alg).toBe('HS256');
    const claims = decodeJwt(body.access_token);
    expect(claims).toMatchObject({ sub: alice.user.id, typ: 'access', iss: 'keel' });
    const lifetime = ctx.app.settings.ACCESS_TOKEN_EXPIRE_MINUTES * 60;
    expect(claims.exp).toBeGreaterThanOrEqual(nowSeconds() + lifetime - 30);
    expect(claims.exp).toBeLessThanOrEqual(nowSeconds() + lifetime + 30);

    const me = await testToken(ctx.app, bearer(body.access_token));
    expect(me.statusCode).toBe(200);
    expect(me.json<UserBody>().id).toBe(alice.user.id);
  });

  it('tells caches not to keep the answer (it holds a token)', async () => {
    const alice = await createUser(ctx.app);
    const response = await loginForm(ctx.app, { username: alice.email, password: alice.password });
    expect(response.statusCode).toBe(200);
    expect(response.headers['cache-control']).toBe('no-store');
  });

  it('accepts the optional OAuth2 fields (grant_type=password, scope, client_id)', async () => {
    const alice = await createUser(ctx.app);
    const response = await loginForm(ctx.app, {
      grant_type: 'password',
      username: alice.email,
      password: alice.password,
      scope: '',
      client_id: 'cli',
    });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toMatchObject({ token_type: 'bearer' });
  });

  it('answers a wrong password and an unknown email identically', async () => {
    const alice = await createUser(ctx.app);
    const wrongPassword = await loginForm(ctx.app, { username: alice.email, password: 'not-the-password' });
    const unknownEmail = await loginForm(ctx.app, { username: randomEmail('nobody'), password: alice.password });
    expect(wrongPassword.statusCode).toBe(400);
    expect(wrongPassword.json()).toEqual({ detail: 'Incorrect email or password' });
    expect(unknownEmail.statusCode).toBe(wrongPassword.statusCode);
    expect(unknownEmail.body).toBe(wrongPassword.body);
    expect(unknownEmail.headers['www-authenticate']).toBe(wrongPassword.headers['www-authenticate']);
  });

  it('compares passwords exactly (case-sensitive)', async () => {
    const alice = await createUser(ctx.app, { password: 'Case-Sensitive-Password' });
    const response = await loginForm(ctx.app, { username: alice.email, password: 'case-sensitive-password' });
    expect(response.statusCode).toBe(400);
    expect(response.json()).toEqual({ detail: 'Incorrect email or password' });
  });

  it('matches the email case-insensitively', async () => {
    const email = randomEmail('MixedCase');
    const alice = await createUser(ctx.app, { email });
    for (const username of [email.toUpperCase(), email.toLowerCase()]) {
      const response = await loginForm(ctx.app, { username, password: alice.password });
      expect(response.statusCode).toBe(200);
      const me = await testToken(ctx.app, bearer(response.json<{ access_token: string }>().access_token));
      expect(me.json<UserBody>()).toMatchObject({ id: alice.user.id, email });
    }
  });

  it('refuses a deactivated account with 400 Inactive user, but only with the right password', async () => {
    const alice = await createUser(ctx.app);
    const admin = await superuserHeaders(ctx.app);
    const deactivate = await ctx.app.inject({ method: 'PATCH', url: `/api/v1/users/${alice.user.id}`, headers: admin, payload: { is_active: false } });
    expect(deactivate.statusCode).toBe(200);

    const right = await loginForm(ctx.app, { username: alice.email, password: alice.password });
    expect(right.statusCode).toBe(400);
    expect(right.json()).toEqual({ detail: 'Inactive user' });

    // A wrong password must not reveal that the account exists and is inactive.
    const wrong = await loginForm(ctx.app, { username: alice.email, password: 'not-the-password' });
    expect(wrong.statusCode).toBe(400);
    expect(wrong.json()).toEqual({ detail: 'Incorrect email or password' });
  });

  it.each([
    ['password', { username: 'someone@keel.test' }],
    ['username', { password: 'whatever-password' }],
  ])('answers 422 when %s is missing', async (field, fields) => {
    const response = await loginForm(ctx.app, fields);
    expect(response.statusCode).toBe(422);
    expect(response.json()).toEqual({ detail: [{ loc: ['body', field], msg: expect.any(String) as string, type: 'missing' }] });
  });

  it('answers 422 for empty username and password', async () => {
    const response = await loginForm(ctx.app, { username: '', password: '' });
    expect(response.statusCode).toBe(422);
    const detail = response.json<{ detail: { loc: string[]; type: string }[] }>().detail;
    expect(detail.map((d) => [d.loc, d.type])).toEqual([
      [['body', 'username'], 'string_too_short'],
      [['body', 'password'], 'string_too_short'],
    ]);
  });

  it('answers 422 for an unknown field, naming it', async () => {
    const alice = await createUser(ctx.app);
    const response = await loginForm(ctx.app, { username: alice.email, password: alice.password, is_superuser: 'true' });
    expect(response.statusCode).toBe(422);
    expect(response.json()).toEqual({
      detail: [{ loc: ['body', 'is_superuser'], msg: 'Extra inputs are not permitted', type: 'extra_forbidden' }],
    });
  });

  it('answers 422 for a grant_type other than password', async () => {
    const alice = await createUser(ctx.app);
    const response = await loginForm(ctx.app, { grant_type: 'client_credentials', username: alice.email, password: alice.password });
    expect(response.statusCode).toBe(422);
    const detail = response.json<{ detail: { loc: string[] }[] }>().detail;
    expect(detail.map((d) => d.loc)).toEqual([['body', 'grant_type']]);
  });

  it('answers 422 without a body', async () => {
    const response = await ctx.app.inject({ method: 'POST', url: '/api/v1/login/access-token' });
    expect(response.statusCode).toBe(422);
    const detail = response.json<{ detail: { loc: string[] }[] }>().detail;
    expect(detail[0]!.loc).toEqual(['body']);
  });
});

// ==================== POST /login/test-token ====================

describe('POST /login/test-token', () => {
  it('returns exactly the UserPublic fields of the caller', async () => {
    const alice = await createUser(ctx.app);
    const response = await testToken(ctx.app, alice.headers);
    expect(response.statusCode).toBe(200);
    const body = response.json<UserBody>();
    expect(Object.keys(body).sort()).toEqual(USER_PUBLIC_KEYS);
    expect(body).toEqual({
      id: alice.user.id,
      email: alice.email,
      full_name: null,
      is_active: true,
      is_superuser: false,
      created_at: alice.user.created_at.toISOString(),
      updated_at: alice.user.updated_at.toISOString(),
    });
    expect(response.body).not.toContain('hashed_password');
    expect(response.body).not.toContain('token_version');
    expect(response.body).not.toContain('argon2');
  });

  it('shows a superuser as one', async () => {
    const response = await testToken(ctx.app, await superuserHeaders(ctx.app));
    expect(response.statusCode).toBe(200);
    expect(response.json()).toMatchObject({ email: 'admin@keel.test', is_superuser: true, is_active: true });
  });

  it('accepts the scheme in any case ("bearer")', async () => {
    const alice = await createUser(ctx.app);
    const response = await testToken(ctx.app, { authorization: `bearer ${alice.token}` });
    expect(response.statusCode).toBe(200);
    expect(response.json<UserBody>().id).toBe(alice.user.id);
  });
});

// ==================== 401 on an authenticated route ====================

describe('401 on an authenticated route', () => {
  it('answers 401 Not authenticated without credentials', async () => {
    expectUnauthorized(await testToken(ctx.app), 'Not authenticated');
    expectUnauthorized(await ctx.app.inject({ method: 'GET', url: '/api/v1/users/me' }), 'Not authenticated');
  });

  it('answers 401 (not 403) on a superuser route without credentials', async () => {
    expectUnauthorized(await ctx.app.inject({ method: 'GET', url: '/api/v1/users' }), 'Not authenticated');
  });

  it.each([
    ['"Bearer" alone', 'Bearer'],
    ['"Bearer " with nothing after it', 'Bearer   '],
    ['another scheme', 'Basic dXNlcjpwYXNz'],
    ['garbage without a scheme', 'garbage'],
    ['an empty header', ''],
  ])('answers 401 Not authenticated for a malformed header: %s', async (_label, authorization) => {
    expectUnauthorized(await testToken(ctx.app, { authorization }), 'Not authenticated');
  });

  it('does not accept a valid token under another scheme', async () => {
    const alice = await createUser(ctx.app);
    expectUnauthorized(await testToken(ctx.app, { authorization: `Token ${alice.token}` }), 'Not authenticated');
    expectUnauthorized(await testToken(ctx.app, { authorization: alice.token }), 'Not authenticated');
  });

  it.each([
    ['garbage', 'garbage'],
    ['three dots', 'a.b.c'],
    ['an unknown API key', `keel_${randomBytes(32).toString('base64url')}`],
  ])('answers 401 Could not validate credentials for a bearer that is not a token: %s', async (_label, credential) => {
    expectUnauthorized(await testToken(ctx.app, bearer(credential)));
  });

  it('accepts a token signed by hand with the derived key (control for the cases below)', async () => {
    const alice = await createUser(ctx.app);
    const token = await signToken(jwtKey(ctx.app), { sub: alice.user.id, ver: 0, typ: 'access', exp: nowSeconds() + 600 });
    const response = await testToken(ctx.app, bearer(token));
    expect(response.statusCode).toBe(200);
    expect(response.json<UserBody>().id).toBe(alice.user.id);
    const raw = rawToken({ alg: 'HS256', typ: 'JWT' }, accessClaims(alice.user.id), jwtKey(ctx.app));
    expect((await testToken(ctx.app, bearer(raw))).statusCode).toBe(200);
  });

  it('answers 401 for an expired token', async () => {
    const alice = await createUser(ctx.app);
    const token = await signToken(jwtKey(ctx.app), {
      sub: alice.user.id,
      ver: 0,
      typ: 'access',
      iat: nowSeconds() - 3600,
      exp: nowSeconds() - 10,
    });
    expectUnauthorized(await testToken(ctx.app, bearer(token)));
  });

  it('answers 401 for a token signed with another key', async () => {
    const alice = await createUser(ctx.app);
    const otherKey = createHash('sha256').update(`keel:jwt:${randomBytes(32).toString('hex')}`).digest();
    const token = await signToken(otherKey, { sub: alice.user.id, ver: 0, typ: 'access', exp: nowSeconds() + 600 });
    expectUnauthorized(await testToken(ctx.app, bearer(token)));
  });

  it("answers 401 for a token whose payload was swapped (another user's id) under the original signature", async () => {
    const alice = await createUser(ctx.app);
    const admin = await testToken(ctx.app, await superuserHeaders(ctx.app));
    const adminId = admin.json<UserBody>().id;
    const [header, payload, signature] = alice.token.split('.') as [string, string, string];
    const claims = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8')) as Record<string, unknown>;
    const forged = `${header}.${b64json({ ...claims, sub: adminId })}.${signature}`;
    expectUnauthorized(await testToken(ctx.app, bearer(forged)));
    // The untouched token still works: the failure above is the forgery.
    expect((await testToken(ctx.app, alice.headers)).statusCode).toBe(200);
  });

  it('answers 401 for an unsigned token (alg: none)', async () => {
    const alice = await createUser(ctx.app);
    const unsecured = new UnsecuredJWT({ ver: 0, typ: 'access' })
      .setSubject(alice.user.id)
      .setIssuer('keel')
      .setIssuedAt()
      .setExpirationTime(nowSeconds() + 600)
      .encode();
    expectUnauthorized(await testToken(ctx.app, bearer(unsecured)));
    // The same with the header saying "none" but a valid HS256 signature attached.
    const claims = accessClaims(alice.user.id);
    const signedNone = rawToken({ alg: 'none', typ: 'JWT' }, claims, jwtKey(ctx.app));
    expectUnauthorized(await testToken(ctx.app, bearer(signedNone)));
    const noSignature = rawToken({ alg: 'none', typ: 'JWT' }, claims, null);
    expectUnauthorized(await testToken(ctx.app, bearer(noSignature)));
  });

  it('answers 401 for a token signed with the right key but another algorithm (HS512)', async () => {
    const alice = await createUser(ctx.app);
    const token = rawToken({ alg: 'HS512', typ: 'JWT' }, accessClaims(alice.user.id), jwtKey(ctx.app), 'sha512');
    expectUnauthorized(await testToken(ctx.app, bearer(token)));
  });

  it.each([
    ['typ "reset"', { typ: 'reset' }],
    ['typ "refresh"', { typ: 'refresh' }],
    ['no typ', { typ: undefined }],
    ['another issuer', { iss: 'not-keel' }],
    ['no exp', { exp: undefined }],
    ['no sub', { sub: undefined }],
    ['a sub that is not a UUID', { sub: 'not-a-uuid' }],
    ['a numeric-looking sub', { sub: '42' }],
    ['a non-numeric ver', { ver: '0' }],
    ['a stale ver', { ver: 1 }],
  ])('answers 401 for a correctly signed token with %s', async (_label, overrides) => {
    const alice = await createUser(ctx.app);
    const token = rawToken({ alg: 'HS256', typ: 'JWT' }, accessClaims(alice.user.id, overrides), jwtKey(ctx.app));
    expectUnauthorized(await testToken(ctx.app, bearer(token)));
  });

  it('answers 401 for a correctly signed token of a user who never existed', async () => {
    const token = await signToken(jwtKey(ctx.app), { sub: randomUUID(), ver: 0, typ: 'access', exp: nowSeconds() + 600 });
    expectUnauthorized(await testToken(ctx.app, bearer(token)));
  });

  it("answers 401 for a password-reset token used as an access token", async () => {
    const alice = await createUser(ctx.app);
    const resetToken = await ctx.app.tokens.create(alice.user.id, alice.user.token_version, 'reset');
    expectUnauthorized(await testToken(ctx.app, bearer(resetToken)));
    expectUnauthorized(await ctx.app.inject({ method: 'GET', url: '/api/v1/users/me', headers: bearer(resetToken) }));
  });

  it('answers 401 for the token of a user who deleted their account', async () => {
    const alice = await createUser(ctx.app);
    const deleted = await ctx.app.inject({ method: 'DELETE', url: '/api/v1/users/me', headers: alice.headers });
    expect(deleted.statusCode).toBe(200);
    expectUnauthorized(await testToken(ctx.app, alice.headers));
  });

  it('answers 401 for the token of a user an admin deleted', async () => {
    const alice = await createUser(ctx.app);
    expect((await testToken(ctx.app, alice.headers)).statusCode).toBe(200);
    const admin = await superuserHeaders(ctx.app);
    const deleted = await ctx.app.inject({ method: 'DELETE', url: `/api/v1/users/${alice.user.id}`, headers: admin });
    expect(deleted.statusCode).toBe(200);
    expectUnauthorized(await testToken(ctx.app, alice.headers));
  });

  it('answers 401 for every token issued before a password change, and accepts new ones', async () => {
    const alice = await createUser(ctx.app);
    const other = await login(ctx.app, alice.email, alice.password);
    const changed = await ctx.app.inject({
      method: 'PATCH',
      url: '/api/v1/users/me/password',
      headers: alice.headers,
      payload: { current_password: alice.password, new_password: 'a-brand-new-password' },
    });
    expect(changed.statusCode).toBe(200);
    expectUnauthorized(await testToken(ctx.app, alice.headers));
    expectUnauthorized(await testToken(ctx.app, bearer(other)));

    const fresh = await login(ctx.app, alice.email, 'a-brand-new-password');
    expect((await testToken(ctx.app, bearer(fresh))).statusCode).toBe(200);
  });

  it('answers 401 for tokens of a user an admin deactivated, even after reactivation', async () => {
    const alice = await createUser(ctx.app);
    const admin = await superuserHeaders(ctx.app);
    const url = `/api/v1/users/${alice.user.id}`;
    expect((await ctx.app.inject({ method: 'PATCH', url, headers: admin, payload: { is_active: false } })).statusCode).toBe(200);
    expectUnauthorized(await testToken(ctx.app, alice.headers));

    expect((await ctx.app.inject({ method: 'PATCH', url, headers: admin, payload: { is_active: true } })).statusCode).toBe(200);
    expectUnauthorized(await testToken(ctx.app, alice.headers));
    const fresh = await login(ctx.app, alice.email, alice.password);
    expect((await testToken(ctx.app, bearer(fresh))).statusCode).toBe(200);
  });

  it('keeps tokens valid through changes that are not about credentials', async () => {
    const alice = await createUser(ctx.app);
    const admin = await superuserHeaders(ctx.app);
    const renamed = await ctx.app.inject({ method: 'PATCH', url: `/api/v1/users/${alice.user.id}`, headers: admin, payload: { full_name: 'Alice' } });
    expect(renamed.statusCode).toBe(200);
    const me = await testToken(ctx.app, alice.headers);
    expect(me.statusCode).toBe(200);
    expect(me.json<UserBody>().full_name).toBe('Alice');
  });
});

// ==================== Rate limits ====================

describe('login rate limits', () => {
  let database: Database;
  let destroy: () => Promise<void>;
  const apps: FastifyInstance[] = [];

  beforeAll(async () => {
    const opened = await openTestDatabase();
    database = opened.database;
    destroy = opened.destroy;
  });
  afterAll(async () => {
    for (const app of apps) await app.close();
    await destroy?.();
  });

  async function appWith(overrides: Record<string, string>): Promise<FastifyInstance> {
    const app = await buildTestApp(database, overrides);
    apps.push(app);
    return app;
  }

  const wrong = (username: string) => ({ username, password: 'wrong-password' });

  it('refuses an address after RATE_LIMIT_LOGIN_PER_ACCOUNT failures on an account, whatever the case of the email', async () => {
    const app = await appWith({ RATE_LIMIT_LOGIN_PER_ACCOUNT: '3' });
    const alice = await createUser(app);
    const bob = await createUser(app);
    for (const username of [alice.email, alice.email.toUpperCase(), ` ${alice.email} `]) {
      expect((await loginForm(app, wrong(username), '10.1.0.1')).statusCode).toBe(400);
    }
    // The fourth attempt from that address is refused, even with the right password.
    expectTooMany(await loginForm(app, { username: alice.email, password: alice.password }, '10.1.0.1'));
    // That address may still sign in to another account.
    expect((await loginForm(app, { username: bob.email, password: bob.password }, '10.1.0.1')).statusCode).toBe(200);
  });

  it('does not lock the owner out: failures from one address leave the right password from another one working', async () => {
    const app = await appWith({ RATE_LIMIT_LOGIN_PER_ACCOUNT: '10' });
    const alice = await createUser(app);
    for (let i = 0; i < 12; i++) {
      const response = await loginForm(app, wrong(alice.email), '10.7.0.1');
      expect(response.statusCode).toBe(i < 10 ? 400 : 429);
    }
    const owner = await loginForm(app, { username: alice.email, password: alice.password }, '10.7.0.2');
    expect(owner.statusCode).toBe(200);
    expect(owner.json()).toMatchObject({ token_type: 'bearer' });
    // The guessing address stays refused, with the time to wait.
    expectTooMany(await loginForm(app, { username: alice.email, password: alice.password }, '10.7.0.1'));
  });

  it('does not count successful logins', async () => {
    const app = await appWith({ RATE_LIMIT_LOGIN_PER_ACCOUNT: '2', RATE_LIMIT_LOGIN_PER_IP: '2' });
    const alice = await createUser(app);
    for (let i = 0; i < 6; i++) {
      expect((await loginForm(app, { username: alice.email, password: alice.password }, '10.8.0.1')).statusCode).toBe(200);
    }
    // Failures still count after them: two allowed, the third refused.
    expect((await loginForm(app, wrong(alice.email), '10.8.0.1')).statusCode).toBe(400);
    expect((await loginForm(app, wrong(alice.email), '10.8.0.1')).statusCode).toBe(400);
    expectTooMany(await loginForm(app, { username: alice.email, password: alice.password }, '10.8.0.1'));
  });

  it('limits unknown accounts too, so the limit does not reveal which accounts exist', async () => {
    const app = await appWith({ RATE_LIMIT_LOGIN_PER_ACCOUNT: '2' });
    const unknown = randomEmail('ghost');
    for (let i = 0; i < 2; i++) {
      expect((await loginForm(app, wrong(unknown))).statusCode).toBe(400);
    }
    expectTooMany(await loginForm(app, wrong(unknown)));
  });

  it('limits failures per address across accounts (password spraying)', async () => {
    const app = await appWith({ RATE_LIMIT_LOGIN_PER_IP: '3' });
    const alice = await createUser(app);
    for (let i = 0; i < 3; i++) {
      expect((await loginForm(app, wrong(randomEmail('spray')), '10.2.0.1')).statusCode).toBe(400);
    }
    expectTooMany(await loginForm(app, { username: alice.email, password: alice.password }, '10.2.0.1'));

    const elsewhere = await loginForm(app, { username: alice.email, password: alice.password }, '10.2.0.2');
    expect(elsewhere.statusCode).toBe(200);
    expect(elsewhere.json()).toMatchObject({ token_type: 'bearer' });
  });

  it('past the account ceiling, gives addresses that failed on it no further try, but lets a fresh address in', async () => {
    const app = await appWith({ RATE_LIMIT_LOGIN_PER_ACCOUNT: '5', RATE_LIMIT_LOGIN_ACCOUNT_CEILING: '4' });
    const alice = await createUser(app);
    // Four guessing addresses, one failure each: the ceiling is reached.
    for (let i = 1; i <= 4; i++) expect((await loginForm(app, wrong(alice.email), `10.9.0.${i}`)).statusCode).toBe(400);
    // A fifth address gets its first try (it has not failed before); its second is refused.
    expect((await loginForm(app, wrong(alice.email), '10.9.0.5')).statusCode).toBe(400);
    expectTooMany(await loginForm(app, wrong(alice.email), '10.9.0.5'));
    // So is any further try from an address that failed, though under its own per-address limit.
    expectTooMany(await loginForm(app, wrong(alice.email), '10.9.0.1'));
    // The owner, from an address that has not failed, gets in.
    expect((await loginForm(app, { username: alice.email, password: alice.password }, '10.9.0.99')).statusCode).toBe(200);
  });

  it('counts requests rejected by validation toward the per-address limit', async () => {
    const app = await appWith({ RATE_LIMIT_LOGIN_PER_IP: '2' });
    const alice = await createUser(app);
    for (let i = 0; i < 2; i++) {
      expect((await loginForm(app, { username: alice.email }, '10.3.0.1')).statusCode).toBe(422);
    }
    const malformed = await app.inject({
      method: 'POST',
      url: '/api/v1/login/access-token',
      payload: '{"username":',
      headers: { 'content-type': 'application/json' },
      remoteAddress: '10.3.0.1',
    });
    expectTooMany(malformed);
    expectTooMany(await loginForm(app, { username: alice.email, password: alice.password }, '10.3.0.1'));
    expect((await loginForm(app, { username: alice.email, password: alice.password }, '10.3.0.2')).statusCode).toBe(200);
  });

  it('lets the account in again once the window has passed', async () => {
    const app = await appWith({ RATE_LIMIT_LOGIN_PER_ACCOUNT: '1', RATE_LIMIT_WINDOW_SECONDS: '1' });
    const alice = await createUser(app);
    expect((await loginForm(app, wrong(alice.email))).statusCode).toBe(400);
    const limited = await loginForm(app, { username: alice.email, password: alice.password });
    expectTooMany(limited, 1);
    await new Promise((resolve) => setTimeout(resolve, Number(limited.headers['retry-after']) * 1000 + 250));
    expect((await loginForm(app, { username: alice.email, password: alice.password })).statusCode).toBe(200);
  });

  it.skipIf(!process.env.REDIS_URL)('keeps its Redis keys named and hashed: no email, no address, no "undefined"', async () => {
    const app = await appWith({ RATE_LIMIT_LOGIN_PER_ACCOUNT: '5' });
    const alice = await createUser(app);
    expect((await loginForm(app, wrong(alice.email), '10.10.0.1')).statusCode).toBe(400);
    const keys = await app.redis!.keys(`${app.settings.REDIS_KEY_PREFIX}*`);
    const limits = keys.filter((key) => key.startsWith(`${app.settings.REDIS_KEY_PREFIX}rate-limit:`));
    expect(limits.map((key) => key.split(':').slice(-2, -1)[0]).sort()).toEqual(['login-account', 'login-account-address', 'login-ip']);
    for (const key of limits) {
      expect(key).toMatch(/^[\w.:-]+:rate-limit:[\w-]+:[\w-]{22}$/);
      expect(key).not.toContain('undefined');
      expect(key.toLowerCase()).not.toContain(alice.email.toLowerCase().split('@')[0]);
      expect(key).not.toContain('10.10.0.1');
      expect(await app.redis!.pttl(key)).toBeGreaterThan(0);
    }
  });

  it('keeps the superuser login on the same limits', async () => {
    const app = await appWith({ RATE_LIMIT_LOGIN_PER_ACCOUNT: '1' });
    expect((await loginForm(app, { username: SUPERUSER_EMAIL, password: 'wrong-password' })).statusCode).toBe(400);
    expectTooMany(await loginForm(app, { username: SUPERUSER_EMAIL, password: 'wrong-password' }));
  });
});
