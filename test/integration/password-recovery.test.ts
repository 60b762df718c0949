import { createHash, createHmac } from 'node:crypto';
import type { AddressInfo } from 'node:net';

import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import type { Redis } from 'ioredis';
import { SMTPServer } from 'smtp-server';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { Database } from '../../src/core/db.js';
import { emailBinding } from '../../src/core/security.js';

import { buildTestApp, type MailingApp, openMailingApp, openTestDatabase } from '../helpers/app.js';
import { bearer, createUser, login, loginStatus, randomEmail, superuserHeaders } from '../helpers/factories.js';
import type { CapturedEmail, SmtpCapture } from '../helpers/smtp.js';

const RECOVERY_BODY = { message: 'If that account exists, a password recovery email has been sent' };
const RESET_BODY = { message: 'Password updated successfully' };
const INVALID_TOKEN = { detail: 'Invalid token' };
const TOO_MANY = { detail: 'Too many requests, try again later' };

// One app for the file, mailing through a fake SMTP server.
let mailing: MailingApp;
let capture: SmtpCapture;
let app: FastifyInstance;

beforeAll(async () => {
  mailing = await openMailingApp();
  ({ app, capture } = mailing);
});

afterAll(async () => {
  await mailing?.close();
});

// ==================== Helpers ====================

function recover(target: FastifyInstance, email: string, remoteAddress?: string): Promise<LightMyRequestResponse> {
  return target.inject({
    method: 'POST',
    url: `/api/v1/password-recovery/${encodeURIComponent(email)}`,
    ...(remoteAddress ? { remoteAddress } : {}),
  });
}

function reset(target: FastifyInstance, payload: Record<string, unknown>, remoteAddress?: string): Promise<LightMyRequestResponse> {
  return target.inject({ method: 'POST', url: '/api/v1/reset-password/', payload, ...(remoteAddress ? { remoteAddress } : {}) });
}

const mailsTo = (address: string) => capture.messages.filter((m) => m.to.includes(address));

/** Waits for the `count`-th message to `address`. */
async function waitForMails(address: string, count: number, timeoutMs = 5_000): Promise<CapturedEmail[]> {
  const deadline = Date.now() + timeoutMs;
  while (mailsTo(address).length < count) {
    if (Date.now() > deadline) throw new Error(`expected ${count} emails to ${address}, got ${mailsTo(address).length}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return mailsTo(address);
}

function tokenIn(mail: CapturedEmail): string {
  const match = /reset-password\?token=([\w.%-]+)/.exec(mail.text);
  if (!match) throw new Error(`no reset link in: ${mail.text}`);
  return decodeURIComponent(match[1]!);
}

/** Asks for a recovery email and returns the token of its link. */
async function requestResetToken(email: string): Promise<string> {
  const before = mailsTo(email).length;
  const response = await recover(app, email);
  expect(response.statusCode).toBe(200);
  const mails = await waitForMails(email, before + 1);
  return tokenIn(mails[before]!);
}

function expectTooMany(response: LightMyRequestResponse): void {
  expect(response.statusCode).toBe(429);
  expect(response.json()).toEqual(TOO_MANY);
  const retryAfter = Number(response.headers['retry-after']);
  expect(retryAfter).toBeGreaterThanOrEqual(1);
  expect(retryAfter).toBeLessThanOrEqual(60);
}

const b64json = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url');

/** An HS256 token signed with the key src/core/security.ts derives from SECRET_KEY. */
function handSigned(payload: Record<string, unknown>): string {
  const key = createHash('sha256').update(`keel:jwt:${app.settings.SECRET_KEY}`).digest();
  const input = `${b64json({ alg: 'HS256', typ: 'JWT' })}.${b64json(payload)}`;
  return `${input}.${createHmac('sha256', key).update(input).digest('base64url')}`;
}

// ==================== POST /password-recovery/{email} ====================

describe('POST /password-recovery/{email}', () => {
  it('answers the same whether or not the account exists, and mails only the real one', async () => {
    const alice = await createUser(app);
    const unknown = randomEmail('nobody');

    const forUnknown = await recover(app, unknown);
    const forAlice = await recover(app, alice.email);
    expect(forUnknown.statusCode).toBe(200);
    expect(forAlice.statusCode).toBe(200);
    expect(forAlice.json()).toEqual(RECOVERY_BODY);
    expect(forUnknown.body).toBe(forAlice.body);

    const [mail] = await waitForMails(alice.email, 1);
    expect(mail!.to).toEqual([alice.email]);
    expect(mail!.from).toBe('keel@keel.test');
    expect(mail!.text).toContain(`${app.settings.FRONTEND_HOST}/reset-password?token=`);
    expect(mail!.text).toContain('Password recovery');
    // The unknown address was asked for first; no email ever went to it.
    expect(mailsTo(unknown)).toEqual([]);
  });

  it('finds the account whatever the case of the email, and mails its stored address', async () => {
    const email = randomEmail('recover');
    await createUser(app, { email });
    const response = await recover(app, email.toUpperCase());
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual(RECOVERY_BODY);
    const [mail] = await waitForMails(email, 1);
    expect(tokenIn(mail!)).toMatch(/^[\w-]+\.[\w-]+\.[\w-]+$/);
  });

  it('sends nothing to a deactivated account, with the same answer', async () => {
    const alice = await createUser(app);
    const admin = await superuserHeaders(app);
    const off = await app.inject({ method: 'PATCH', url: `/api/v1/users/${alice.user.id}`, headers: admin, payload: { is_active: false } });
    expect(off.statusCode).toBe(200);

    const response = await recover(app, alice.email);
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual(RECOVERY_BODY);

    // A control mail sent afterwards arrives; the deactivated account still has none.
    const control = await createUser(app);
    await requestResetToken(control.email);
    expect(mailsTo(alice.email)).toEqual([]);
  });

  it('answers 200 and mails the account whose address is as long as an address may be', async () => {
    const local = randomEmail().replace(/@.*/, '').padEnd(64, 'a');
    const long = `${local}@${'b'.repeat(60)}.${'c'.repeat(60)}.${'d'.repeat(60)}.test`;
    expect(long.length).toBeGreaterThan(250);
    const owner = await createUser(app, { email: long });
    const response = await recover(app, owner.email);
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual(RECOVERY_BODY);
    await waitForMails(owner.email, 1);
  });

  // SPEC §3: always 200 with the same message; a malformed address is nobody's account, so it gets
  // the unknown address's answer and no mail (an existing user's address with a NUL in it included,
  // which must not reach the database as text).
  it.each([
    ['not an email', 'not-an-email'],
    ['an address with a NUL', `${'\u0000'}{alice}`],
  ])('answers 200 with the same message for %s, and mails nothing', async (_label, shape) => {
    const alice = await createUser(app);
    const asked = shape.replace('{alice}', alice.email);
    const response = await recover(app, asked);
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual(RECOVERY_BODY);

    const control = await createUser(app);
    await requestResetToken(control.email);
    expect(mailsTo(alice.email)).toEqual([]);
  });
});

// ==================== POST /reset-password/ ====================

describe('POST /reset-password/', () => {
  it('sets the new password from the emailed token; the token then dies', async () => {
    const alice = await createUser(app);
    const token = await requestResetToken(alice.email);

    const response = await reset(app, { token, new_password: 'the-new-password' });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual(RESET_BODY);

    expect(await loginStatus(app, alice.email, 'the-new-password')).toBe(200);
    expect(await loginStatus(app, alice.email, alice.password)).toBe(400);

    const again = await reset(app, { token, new_password: 'yet-another-password' });
    expect(again.statusCode).toBe(400);
    expect(again.json()).toEqual(INVALID_TOKEN);
    expect(await loginStatus(app, alice.email, 'the-new-password')).toBe(200);
  });

  it('works once even when the same token is sent twice at the same time', async () => {
    const alice = await createUser(app);
    const token = await requestResetToken(alice.email);
    const results = await Promise.all([
      reset(app, { token, new_password: 'concurrent-one' }),
      reset(app, { token, new_password: 'concurrent-two' }),
    ]);
    expect(results.map((r) => r.statusCode).sort()).toEqual([200, 400]);
    const winner = results.findIndex((r) => r.statusCode === 200) === 0 ? 'concurrent-one' : 'concurrent-two';
    const loser = winner === 'concurrent-one' ? 'concurrent-two' : 'concurrent-one';
    expect(await loginStatus(app, alice.email, winner)).toBe(200);
    expect(await loginStatus(app, alice.email, loser)).toBe(400);
  });

  it('kills access tokens issued before the reset', async () => {
    const alice = await createUser(app);
    const loggedIn = await login(app, alice.email, alice.password);
    const token = await requestResetToken(alice.email);
    expect((await reset(app, { token, new_password: 'the-new-password' })).statusCode).toBe(200);

    for (const old of [alice.token, loggedIn]) {
      const me = await app.inject({ method: 'GET', url: '/api/v1/users/me', headers: bearer(old) });
      expect(me.statusCode).toBe(401);
      expect(me.headers['www-authenticate']).toBe('Bearer');
      expect(me.json()).toEqual({ detail: 'Could not validate credentials' });
    }
  });

  it('kills every other outstanding reset token once one is used', async () => {
    const alice = await createUser(app);
    const first = await requestResetToken(alice.email);
    const second = await requestResetToken(alice.email);
    expect(first).not.toBe(second);

    expect((await reset(app, { token: second, new_password: 'from-the-second' })).statusCode).toBe(200);
    const stale = await reset(app, { token: first, new_password: 'from-the-first!' });
    expect(stale.statusCode).toBe(400);
    expect(stale.json()).toEqual(INVALID_TOKEN);
    expect(await loginStatus(app, alice.email, 'from-the-second')).toBe(200);
  });

  it('refuses a reset token issued before the password was changed', async () => {
    const alice = await createUser(app);
    const token = await requestResetToken(alice.email);
    const changed = await app.inject({
      method: 'PATCH',
      url: '/api/v1/users/me/password',
      headers: alice.headers,
      payload: { current_password: alice.password, new_password: 'changed-meanwhile' },
    });
    expect(changed.statusCode).toBe(200);

    const response = await reset(app, { token, new_password: 'attacker-password' });
    expect(response.statusCode).toBe(400);
    expect(response.json()).toEqual(INVALID_TOKEN);
    expect(await loginStatus(app, alice.email, 'changed-meanwhile')).toBe(200);
    expect(await loginStatus(app, alice.email, 'attacker-password')).toBe(400);
  });

  it('refuses a reset token of a user an admin deactivated (or whose password an admin set)', async () => {
    const alice = await createUser(app);
    const bob = await createUser(app);
    const aliceToken = await requestResetToken(alice.email);
    const bobToken = await requestResetToken(bob.email);
    const admin = await superuserHeaders(app);
    const deactivated = await app.inject({ method: 'PATCH', url: `/api/v1/users/${alice.user.id}`, headers: admin, payload: { is_active: false } });
    expect(deactivated.statusCode).toBe(200);
    const passwordSet = await app.inject({
      method: 'PATCH',
      url: `/api/v1/users/${bob.user.id}`,
      headers: admin,
      payload: { password: 'set-by-the-admin' },
    });
    expect(passwordSet.statusCode).toBe(200);

    for (const token of [aliceToken, bobToken]) {
      const response = await reset(app, { token, new_password: 'attacker-password' });
      expect(response.statusCode).toBe(400);
      expect(response.json()).toEqual(INVALID_TOKEN);
    }
    expect(await loginStatus(app, bob.email, 'set-by-the-admin')).toBe(200);
  });

  it('refuses the reset token of a deleted user', async () => {
    const alice = await createUser(app);
    const token = await requestResetToken(alice.email);
    expect((await app.inject({ method: 'DELETE', url: '/api/v1/users/me', headers: alice.headers })).statusCode).toBe(200);
    const response = await reset(app, { token, new_password: 'the-new-password' });
    expect(response.statusCode).toBe(400);
    expect(response.json()).toEqual(INVALID_TOKEN);
  });

  it('refuses an access token used as a reset token, and leaves the password alone', async () => {
    const alice = await createUser(app);
    // Use the token first, so that it sits in the verified-token cache.
    expect((await app.inject({ method: 'GET', url: '/api/v1/users/me', headers: alice.headers })).statusCode).toBe(200);
    const fromLogin = await login(app, alice.email, alice.password);

    for (const token of [alice.token, fromLogin]) {
      const response = await reset(app, { token, new_password: 'attacker-password' });
      expect(response.statusCode).toBe(400);
      expect(response.json()).toEqual(INVALID_TOKEN);
    }
    expect(await loginStatus(app, alice.email, alice.password)).toBe(200);
    expect(await loginStatus(app, alice.email, 'attacker-password')).toBe(400);
  });

  it('refuses the emailed reset token as an access token, and it still works for its purpose afterwards', async () => {
    const alice = await createUser(app);
    const token = await requestResetToken(alice.email);
    const me = await app.inject({ method: 'GET', url: '/api/v1/users/me', headers: bearer(token) });
    expect(me.statusCode).toBe(401);
    expect(me.headers['www-authenticate']).toBe('Bearer');
    expect((await reset(app, { token, new_password: 'the-new-password' })).statusCode).toBe(200);
  });

  it('refuses a reset link once the email it was mailed to has changed', async () => {
    const alice = await createUser(app);
    expect((await recover(app, alice.email)).statusCode).toBe(200);
    const token = tokenIn(await capture.waitFor(alice.email));
    // Moved by an administrator, which leaves the token version alone (the user's own change ends
    // every token anyway): the binding to the address is what kills the link.
    const headers = await superuserHeaders(app);
    const change = await app.inject({ method: 'PATCH', url: `/api/v1/users/${alice.user.id}`, headers, payload: { email: randomEmail('moved') } });
    expect(change.statusCode).toBe(200);
    const response = await reset(app, { token, new_password: 'the-new-password' });
    expect(response.statusCode).toBe(400);
    expect(response.json()).toEqual(INVALID_TOKEN);
  });

  it('refuses a hand-signed reset token that names no email', async () => {
    const alice = await createUser(app);
    const now = Math.floor(Date.now() / 1000);
    const token = handSigned({ ver: alice.user.token_version, typ: 'reset', sub: alice.user.id, iss: 'keel', iat: now, exp: now + 600 });
    expect((await reset(app, { token, new_password: 'the-new-password' })).statusCode).toBe(400);
  });

  it('accepts a hand-signed reset token (control) and refuses an expired or forged one', async () => {
    const alice = await createUser(app);
    const now = Math.floor(Date.now() / 1000);
    const claims = { ver: alice.user.token_version, typ: 'reset', sub: alice.user.id, iss: 'keel', iat: now - 7200, eml: emailBinding(alice.email) };

    const expired = handSigned({ ...claims, exp: now - 10 });
    const expiredResponse = await reset(app, { token: expired, new_password: 'the-new-password' });
    expect(expiredResponse.statusCode).toBe(400);
    expect(expiredResponse.json()).toEqual(INVALID_TOKEN);

    const valid = handSigned({ ...claims, exp: now + 600 });
    const [header, , signature] = valid.split('.') as [string, string, string];
    const forged = `${header}.${b64json({ ...claims, exp: now + 600, ver: alice.user.token_version + 5 })}.${signature}`;
    const forgedResponse = await reset(app, { token: forged, new_password: 'the-new-password' });
    expect(forgedResponse.statusCode).toBe(400);
    expect(forgedResponse.json()).toEqual(INVALID_TOKEN);

    expect(await loginStatus(app, alice.email, alice.password)).toBe(200);
    const validResponse = await reset(app, { token: valid, new_password: 'the-new-password' });
    expect(validResponse.statusCode).toBe(200);
    expect(await loginStatus(app, alice.email, 'the-new-password')).toBe(200);
  });

  it('refuses garbage tokens with 400 Invalid token', async () => {
    for (const token of ['garbage', 'a.b.c', 'keel_not-a-jwt']) {
      const response = await reset(app, { token, new_password: 'the-new-password' });
      expect(response.statusCode).toBe(400);
      expect(response.json()).toEqual(INVALID_TOKEN);
    }
  });

  it.each([
    ['a new password too short', { new_password: 'x'.repeat(7) }, ['body', 'new_password'], 'string_too_short'],
    ['a new password too long', { new_password: 'x'.repeat(129) }, ['body', 'new_password'], 'string_too_long'],
    ['a new password with an unpaired surrogate', { new_password: 'pw\uD800xxxxxx' }, ['body', 'new_password'], 'value_error'],
    ['no new password', { new_password: undefined }, ['body', 'new_password'], 'missing'],
    ['no token', { token: undefined }, ['body', 'token'], 'missing'],
    ['an empty token', { token: '' }, ['body', 'token'], 'string_too_short'],
    ['an unknown field', { email: 'someone@keel.test' }, ['body', 'email'], 'extra_forbidden'],
  ])('answers 422 for %s, and the token stays usable', async (_label, change, loc, type) => {
    const alice = await createUser(app);
    const token = await requestResetToken(alice.email);
    const payload: Record<string, unknown> = { token, new_password: 'valid-password', ...change };
    for (const [key, value] of Object.entries(payload)) if (value === undefined) delete payload[key];

    const response = await reset(app, payload);
    expect(response.statusCode).toBe(422);
    expect(response.json()).toEqual({ detail: [{ loc, msg: expect.any(String) as string, type }] });

    expect((await reset(app, { token, new_password: 'valid-password' })).statusCode).toBe(200);
    expect(await loginStatus(app, alice.email, 'valid-password')).toBe(200);
  });

  it('accepts new passwords of exactly 8 and 128 characters', async () => {
    for (const password of ['p'.repeat(8), 'p'.repeat(128)]) {
      const alice = await createUser(app);
      const token = await requestResetToken(alice.email);
      expect((await reset(app, { token, new_password: password })).statusCode).toBe(200);
      expect(await loginStatus(app, alice.email, password)).toBe(200);
    }
  });
});

// ==================== Rate limits ====================

describe('recovery rate limits', () => {
  let limitedDatabase: Database;
  let destroy: () => Promise<void>;
  const apps: FastifyInstance[] = [];

  beforeAll(async () => {
    const opened = await openTestDatabase();
    limitedDatabase = opened.database;
    destroy = opened.destroy;
  });
  afterAll(async () => {
    for (const limited of apps) await limited.close();
    await destroy?.();
  });

  async function appWith(overrides: Record<string, string>): Promise<FastifyInstance> {
    const limited = await buildTestApp(limitedDatabase, overrides);
    apps.push(limited);
    return limited;
  }

  it('limits requests per account, the same for existing and unknown accounts', async () => {
    const limited = await appWith({ RATE_LIMIT_RECOVERY_PER_ACCOUNT: '2' });
    const alice = await createUser(limited);
    const unknown = randomEmail('nobody');
    for (const email of [alice.email, unknown]) {
      expect((await recover(limited, email, '10.4.0.1')).statusCode).toBe(200);
      expect((await recover(limited, email.toUpperCase(), '10.4.0.2')).statusCode).toBe(200);
      expectTooMany(await recover(limited, email, '10.4.0.3'));
    }
    // Other accounts are not affected.
    const other = await recover(limited, randomEmail('other'), '10.4.0.1');
    expect(other.statusCode).toBe(200);
    expect(other.json()).toEqual(RECOVERY_BODY);
  });

  it('limits requests per IP, counting each IP separately', async () => {
    const limited = await appWith({ RATE_LIMIT_RECOVERY_PER_IP: '2' });
    expect((await recover(limited, randomEmail('a'), '10.5.0.1')).statusCode).toBe(200);
    expect((await recover(limited, randomEmail('b'), '10.5.0.1')).statusCode).toBe(200);
    expectTooMany(await recover(limited, randomEmail('c'), '10.5.0.1'));
    expect((await recover(limited, randomEmail('d'), '10.5.0.2')).statusCode).toBe(200);
  });

  it('limits reset attempts per IP (token guessing)', async () => {
    const limited = await appWith({ RATE_LIMIT_RECOVERY_PER_IP: '2' });
    for (let i = 0; i < 2; i++) {
      const response = await reset(limited, { token: `guess-${i}`, new_password: 'the-new-password' }, '10.6.0.1');
      expect(response.statusCode).toBe(400);
    }
    expectTooMany(await reset(limited, { token: 'guess-2', new_password: 'the-new-password' }, '10.6.0.1'));
    const elsewhere = await reset(limited, { token: 'guess-3', new_password: 'the-new-password' }, '10.6.0.2');
    expect(elsewhere.statusCode).toBe(400);
    expect(elsewhere.json()).toEqual(INVALID_TOKEN);
  });

  it('answers 200 without SMTP configured', async () => {
    const limited = await appWith({});
    expect(limited.mailer.enabled).toBe(false);
    const alice = await createUser(limited);
    const response = await recover(limited, alice.email);
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual(RECOVERY_BODY);
  });
});

// ==================== At rest in Redis ====================

/** Every value under `prefix` in Redis, as text: what someone reading the Redis dump would see. */
async function redisDump(redis: Redis, prefix: string): Promise<string> {
  const parts: string[] = [];
  for (const key of await redis.keys(`${prefix}*`)) {
    const type = await redis.type(key);
    parts.push(key);
    if (type === 'string') parts.push((await redis.get(key)) ?? '');
    else if (type === 'hash') parts.push(JSON.stringify(await redis.hgetall(key)));
    else if (type === 'list') parts.push(...(await redis.lrange(key, 0, -1)));
    else if (type === 'set') parts.push(...(await redis.smembers(key)));
    else if (type === 'zset') parts.push(...(await redis.zrange(key, '0', '-1')));
    else if (type === 'stream') parts.push(JSON.stringify(await redis.xrange(key, '-', '+')));
  }
  return parts.join('\n');
}

async function until(check: () => Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

describe.skipIf(!process.env.REDIS_URL)('recovery emails at rest in Redis', () => {
  it('leaves neither the reset link nor the address in Redis once the email is sent', async () => {
    const prefix = app.settings.REDIS_KEY_PREFIX;
    const alice = await createUser(app);
    const token = await requestResetToken(alice.email);
    const redis = app.redis!;
    // The finished job is deleted (only BullMQ's bookkeeping remains).
    await until(async () => (await redis.keys(`${prefix}jobs:keel-emails:[0-9]*`)).length === 0);
    const dump = await redisDump(redis, prefix);
    expect(dump).toContain('keel-emails'); // the queue was there
    expect(dump).not.toContain(token);
    expect(dump).not.toContain(token.split('.')[2]!); // not even the signature
    expect(dump.toLowerCase()).not.toContain(alice.email.toLowerCase());
    expect(dump).not.toContain('reset-password');
  });

  it('keeps a failed email job sealed, its reason naming no recipient', async () => {
    // A mail server that refuses every recipient, quoting the address in its answer.
    const refusing = new SMTPServer({
      authOptional: true,
      disabledCommands: ['STARTTLS'],
      logger: false,
      onRcptTo: (address, _session, callback) => callback(new Error(`Mailbox ${address.address} unavailable`)),
    });
    await new Promise<void>((resolve) => refusing.listen(0, '127.0.0.1', resolve));
    const port = (refusing.server.address() as AddressInfo).port;
    const failing = await openMailingApp({ SMTP_PORT: String(port), JOB_ATTEMPTS: '1' });
    try {
      const prefix = failing.app.settings.REDIS_KEY_PREFIX;
      const alice = await createUser(failing.app);
      expect((await recover(failing.app, alice.email)).statusCode).toBe(200);
      const redis = failing.app.redis!;
      await until(async () => (await redis.zcard(`${prefix}jobs:keel-emails:failed`)) === 1);
      const [id] = await redis.zrange(`${prefix}jobs:keel-emails:failed`, '0', '-1');
      const job = await redis.hgetall(`${prefix}jobs:keel-emails:${id}`);
      expect(job.name).toBe('send-email');
      expect(job.failedReason).toMatch(/^job send-email failed/);
      expect(Object.keys(JSON.parse(job.data!) as object)).toEqual(['sealed']);
      const dump = await redisDump(redis, prefix);
      expect(dump.toLowerCase()).not.toContain(alice.email.toLowerCase());
      expect(dump).not.toContain('reset-password');
      expect(dump).not.toMatch(/eyJ[\w-]+\.eyJ/); // no JWT
    } finally {
      await failing.close();
      await new Promise<void>((resolve) => refusing.close(() => resolve()));
    }
  });
});
