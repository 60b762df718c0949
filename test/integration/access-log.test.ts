import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { buildApp } from '../../src/app.js';
import { openTestDatabase, SUPERUSER_EMAIL, testSettings } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { captureLogs } from '../helpers/logs.js';

const SECRET_PASSWORD = 'access-log-secret-password';
const FORM = { 'content-type': 'application/x-www-form-urlencoded' };

/** An app whose log lines (as pino writes them, before any pretty-printing) are kept. */
async function appWithLog(format: 'pretty' | 'json'): Promise<{ app: FastifyInstance; lines: () => Record<string, unknown>[]; close: () => Promise<void> }> {
  const opened = await openTestDatabase();
  const settings = testSettings({ LOG_LEVEL: 'info', LOG_FORMAT: format, RATE_LIMIT_LOGIN_PER_ACCOUNT: '1' });
  // The lines themselves are JSON either way; LOG_FORMAT decides what the access line holds.
  const logs = captureLogs('info');
  const app = await buildApp({ settings, database: opened.database, logger: logs.logger, vectorSearch: false, runJobs: true });
  await app.ready();
  return {
    app,
    lines: () => logs.lines(),
    close: async () => {
      await app.close();
      await opened.destroy();
    },
  };
}

/** The requests both formats are checked with: unmatched, a validation failure, a rate limit. */
async function sendRequests(app: FastifyInstance): Promise<void> {
  expect((await app.inject({ method: 'GET', url: '/no/such/path?token=query-secret' })).statusCode).toBe(404);
  const signup = await app.inject({ method: 'POST', url: '/api/v1/users/signup', payload: { email: 'not-an-email', password: SECRET_PASSWORD } });
  expect(signup.statusCode).toBe(422);
  const body = new URLSearchParams({ username: SUPERUSER_EMAIL, password: SECRET_PASSWORD }).toString();
  expect((await app.inject({ method: 'POST', url: '/api/v1/login/access-token', headers: FORM, payload: body })).statusCode).toBe(400);
  expect((await app.inject({ method: 'POST', url: '/api/v1/login/access-token', headers: FORM, payload: body })).statusCode).toBe(429);
}

describe.each(['pretty', 'json'] as const)('access log (%s)', (format) => {
  let ctx: Awaited<ReturnType<typeof appWithLog>>;
  beforeAll(async () => {
    ctx = await appWithLog(format);
    await sendRequests(ctx.app);
  });
  afterAll(() => ctx?.close());

  it('never holds the password or the query string', () => {
    const all = JSON.stringify(ctx.lines());
    expect(all).not.toContain(SECRET_PASSWORD);
    expect(all).not.toContain('query-secret');
  });

  it.runIf(format === 'pretty')('is one self-contained line per request: no fields for the pretty-printer to spread over lines', () => {
    const access = ctx.lines().filter((line) => /^(GET|POST) /.test(String(line.msg)));
    expect(access).toHaveLength(4);
    for (const line of access) expect(Object.keys(line).sort()).toEqual(['level', 'msg', 'time']);
    const [unmatched, invalid, wrong, limited] = access.map((line) => String(line.msg));
    expect(unmatched).toMatch(/^GET \/no\/such\/path 404 [\d.]+ms reqId=\S+ \(Not Found\)$/);
    expect(invalid).toMatch(/^POST \/api\/v1\/users\/signup 422 .*\(body\.email: .+\)$/);
    expect(wrong).toMatch(/^POST \/api\/v1\/login\/access-token 400 .*\(Incorrect email or password\)$/);
    expect(limited).toMatch(/^POST \/api\/v1\/login\/access-token 429 .*\(rate limit login-account-address: 1 per 60s\)$/);
  });

  it.runIf(format === 'pretty')("escapes a client's line breaks and other control characters in a reason, so no text of theirs can pass for a line of its own", async () => {
    const { headers } = await createUser(ctx.app); // (the superuser's logins are used up by the rate limit above)
    const forged = '\n[09:99:99.999] ERROR: forged\r\u0000\u2028';
    const response = await ctx.app.inject({ method: 'GET', url: `/api/v1/models/x${encodeURIComponent(forged)}`, headers });
    expect(response.statusCode).toBe(404);
    const [line] = ctx.lines().filter((l) => /^GET \/api\/v1\/models\/\S+ 404 /.test(String(l.msg)));
    expect(String(line?.msg)).toMatch(/\(Model x\\n\[09:99:99\.999\] ERROR: forged\\r\\u0000\\u2028 not found\)$/);
  });

  it.runIf(format === 'json')('keeps its fields and adds the path of unmatched requests and the reason of a 4xx', () => {
    const access = ctx.lines().filter((line) => line.msg === 'request completed');
    expect(access).toHaveLength(4);
    for (const line of access) expect(line).toMatchObject({ reqId: expect.any(String) as string, method: expect.any(String) as string, ms: expect.any(Number) as number });
    expect(access[0]).toMatchObject({ route: '<unmatched>', path: '/no/such/path', status: 404, reason: 'Not Found' });
    expect(access[1]).toMatchObject({ route: '/api/v1/users/signup', status: 422, reason: expect.stringMatching(/^body\.email: /) as string });
    expect(access[1]).not.toHaveProperty('path');
    expect(access[3]).toMatchObject({ status: 429, reason: 'rate limit login-account-address: 1 per 60s' });
  });
});
