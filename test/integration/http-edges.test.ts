import { connect, type Socket } from 'node:net';
import { gzipSync } from 'node:zlib';

import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { MAX_VALIDATION_ISSUES } from '../../src/core/errors.js';
import { serverOptions } from '../../src/core/http-server.js';

import { buildTestApp, openTestDatabase, testSettings, useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { call, createKey, eventually } from '../helpers/http.js';
import { addFakeModels } from '../helpers/metered-models.js';

const ctx = useTestApp({ RATE_LIMIT_SIGNUP_PER_IP: '3', HTTP_REQUEST_TIMEOUT_MS: '2000', HTTP_HEADERS_TIMEOUT_MS: '1000' });

interface Issue {
  loc: (string | number)[];
  msg: string;
  type: string;
}

const signup = (app: FastifyInstance, payload: string, remoteAddress: string) =>
  app.inject({ method: 'POST', url: '/api/v1/users/signup', payload, headers: { 'content-type': 'application/json' }, remoteAddress });

// ==================== Validation answers ====================

describe('422 answers', () => {
  it('lists at most MAX_VALIDATION_ISSUES issues for a 1 MB body of 110,000 unknown keys, and say how many were left out', async () => {
    const keys = Array.from({ length: 110_000 }, (_, i) => `"${i.toString(36)}":0`);
    const body = `{"email":"x@keel.test","password":"long-enough-password",${keys.join(',')}}`;
    expect(body.length).toBeGreaterThan(900_000);
    expect(body.length).toBeLessThan(ctx.app.settings.BODY_LIMIT_BYTES);
    const response = await signup(ctx.app, body, '10.20.0.1');
    expect(response.statusCode).toBe(422);
    expect(response.rawPayload.length).toBeLessThan(20_000);
    const { detail } = response.json<{ detail: Issue[] }>();
    expect(detail).toHaveLength(MAX_VALIDATION_ISSUES + 1);
    expect(detail[0]).toEqual({ loc: ['body', '0'], msg: 'Extra inputs are not permitted', type: 'extra_forbidden' });
    expect(detail.at(-1)).toEqual({ loc: ['body'], msg: `${110_000 - MAX_VALIDATION_ISSUES} more issues not listed`, type: 'too_many_errors' });
  });

  it('counts invalid requests toward the per-address limit (limits run before validation)', async () => {
    for (let i = 0; i < 3; i++) expect((await signup(ctx.app, '{"nope":1}', '10.21.0.1')).statusCode).toBe(422);
    const limited = await signup(ctx.app, '{"email":"fresh@keel.test","password":"long-enough-password"}', '10.21.0.1');
    expect(limited.statusCode).toBe(429);
    expect(Number(limited.headers['retry-after'])).toBeGreaterThanOrEqual(1);
    // Malformed JSON counts too.
    expect((await signup(ctx.app, '{', '10.21.0.1')).statusCode).toBe(429);
  });

  it('answers an empty JSON body and malformed JSON in one shape: 422 with a list (missing, json_invalid)', async () => {
    for (const [payload, type] of [['', 'missing'], ['{"email":', 'json_invalid']]) {
      const response = await signup(ctx.app, payload!, '10.22.0.1');
      expect(response.statusCode, JSON.stringify(payload)).toBe(422);
      const { detail } = response.json<{ detail: Issue[] }>();
      expect(detail).toHaveLength(1);
      expect(detail[0]).toMatchObject({ loc: ['body'], type });
    }
  });

  it('refuses a number past a double\'s range (1e400: Infinity to JSON.parse, null once stored) anywhere in a body with 422 naming where, under /v1 too', async () => {
    const headers = { ...(await superuserHeaders(ctx.app)), 'content-type': 'application/json' };
    for (const [url, payload, loc] of [
      ['/api/v1/threads', '{"metadata":{"a":1e400}}', ['body', 'metadata', 'a']],
      ['/api/v1/threads', `{"title":"t","metadata":{"list":[1,{"b":-${'9'.repeat(400)}}]}}`, ['body', 'metadata', 'list', 1, 'b']],
      ['/api/v1/projects', '{"name":"p","x":1E+999}', ['body', 'x']],
    ] as const) {
      const response = await ctx.app.inject({ method: 'POST', url, headers, payload });
      expect(response.statusCode, payload.slice(0, 80)).toBe(422);
      expect(response.json<{ detail: Issue[] }>().detail).toEqual([{ loc, msg: 'Number is too large to be stored (past ±1.8e308)', type: 'finite_number' }]);
    }
    const openai = await ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers, payload: '{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{},"temperature":1e400}' });
    expect(openai.statusCode).toBeGreaterThanOrEqual(400);
    expect(openai.statusCode).toBeLessThan(500);
    expect(openai.json<{ error: { message: string } }>().error.message).toContain('Number is too large');
    // Large finite numbers, and exponents, are numbers as before.
    const kept = await ctx.app.inject({ method: 'POST', url: '/api/v1/threads', headers, payload: '{"metadata":{"a":1e300,"b":2.5E-3,"c":"1e400"}}' });
    expect(kept.statusCode, kept.body).toBe(200);
    expect(kept.json<{ metadata: unknown }>().metadata).toEqual({ a: 1e300, b: 0.0025, c: '1e400' });
  });

  it('answers a compressed body with 415 that says to send it uncompressed (not as malformed JSON)', async () => {
    const payload = gzipSync(JSON.stringify({ email: 'gz@example.test', password: 'a-long-password' }));
    const response = await ctx.app.inject({ method: 'POST', url: '/api/v1/users/signup', payload, headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' }, remoteAddress: '10.22.0.2' });
    expect(response.statusCode).toBe(415);
    expect(response.json()).toEqual({ detail: 'Content-Encoding gzip is not supported: send the body uncompressed' });
  });

  it('answers 415 to a body labelled gzip (or any coding) that is plain JSON, as to a compressed one, and creates nothing; identity is no coding', async () => {
    const admin = await superuserHeaders(ctx.app);
    for (const encoding of ['gzip', 'br', 'deflate', 'GZIP ', 'gzip, identity']) {
      const response = await ctx.app.inject({ method: 'POST', url: '/api/v1/projects', headers: { ...admin, 'content-type': 'application/json', 'content-encoding': encoding }, payload: { name: 'labelled-gzip' } });
      expect(response.statusCode, encoding).toBe(415);
      expect(response.json()).toEqual({ detail: `Content-Encoding ${encoding.trim().toLowerCase()} is not supported: send the body uncompressed` });
    }
    // Plain text labelled gzip, under any content type: 415 for the coding, never a parse error.
    const text = await ctx.app.inject({ method: 'POST', url: '/api/v1/projects', headers: { ...admin, 'content-type': 'text/plain', 'content-encoding': 'gzip' }, payload: 'hello' });
    expect(text.statusCode).toBe(415);
    const listed = await ctx.app.inject({ method: 'GET', url: '/api/v1/projects?limit=100', headers: admin });
    expect(listed.json<{ data: { name: string }[] }>().data.map((p) => p.name)).not.toContain('labelled-gzip');
    const identity = await ctx.app.inject({ method: 'POST', url: '/api/v1/projects', headers: { ...admin, 'content-type': 'application/json', 'content-encoding': 'identity' }, payload: { name: 'identity-coded' } });
    expect(identity.statusCode).toBe(200);
  });

  it('answers 415 to JSON sent as text/plain (what a browser sends cross-origin without a preflight), and creates nothing; an empty text body is no body', async () => {
    const admin = await superuserHeaders(ctx.app);
    for (const type of ['text/plain', 'text/plain;charset=UTF-8']) {
      const response = await ctx.app.inject({ method: 'POST', url: '/api/v1/projects', headers: { ...admin, 'content-type': type }, payload: JSON.stringify({ name: 'from-text' }) });
      expect(response.statusCode, type).toBe(415);
      expect(response.json()).toEqual({ detail: 'Unsupported Media Type' });
    }
    const listed = await ctx.app.inject({ method: 'GET', url: '/api/v1/projects?limit=100', headers: admin });
    expect(listed.json<{ data: { name: string }[] }>().data.map((p) => p.name)).not.toContain('from-text');
    const created = await ctx.app.inject({ method: 'POST', url: '/api/v1/projects', headers: admin, payload: { name: 'empty-text' } });
    const id = created.json<{ id: string }>().id;
    expect((await ctx.app.inject({ method: 'DELETE', url: `/api/v1/projects/${id}`, headers: { ...admin, 'content-type': 'text/plain' }, payload: '' })).statusCode).toBe(200);
  });

  it('takes a form body on the login route alone: elsewhere it is 415, as any body that is not JSON (SPEC §2: JSON in)', async () => {
    const headers = { ...(await superuserHeaders(ctx.app)), 'content-type': 'application/x-www-form-urlencoded' };
    const response = await ctx.app.inject({ method: 'POST', url: '/api/v1/projects', headers, payload: 'name=from-a-form' });
    expect(response.statusCode).toBe(415);
    expect(response.json()).toEqual({ detail: 'Unsupported Media Type' });
    const listed = await ctx.app.inject({ method: 'GET', url: '/api/v1/projects?limit=100', headers: await superuserHeaders(ctx.app) });
    expect(listed.json<{ data: { name: string }[] }>().data.map((p) => p.name)).not.toContain('from-a-form');
  });

  it('takes an empty JSON body on a route without a body (a client that always sends content-type)', async () => {
    const headers = { ...(await superuserHeaders(ctx.app)), 'content-type': 'application/json' };
    const created = await ctx.app.inject({ method: 'POST', url: '/api/v1/projects', headers, payload: { name: 'empty-body' } });
    const id = created.json<{ id: string }>().id;
    const deleted = await ctx.app.inject({ method: 'DELETE', url: `/api/v1/projects/${id}`, headers, payload: '' });
    expect(deleted.statusCode).toBe(200);
  });

  it("takes an empty form body on a route without a body (curl -d '', jQuery's $.post(url)), and the login form still", async () => {
    const admin = await superuserHeaders(ctx.app);
    const created = await ctx.app.inject({ method: 'POST', url: '/api/v1/projects', headers: admin, payload: { name: 'empty-form' } });
    const id = created.json<{ id: string }>().id;
    const form = { ...admin, 'content-type': 'application/x-www-form-urlencoded' };
    expect((await ctx.app.inject({ method: 'DELETE', url: `/api/v1/projects/${id}`, headers: form, payload: '' })).statusCode).toBe(200);
    const login = await ctx.app.inject({
      method: 'POST',
      url: '/api/v1/login/access-token',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      payload: `username=${encodeURIComponent(ctx.app.settings.FIRST_SUPERUSER)}&password=${encodeURIComponent(ctx.app.settings.FIRST_SUPERUSER_PASSWORD)}`,
    });
    expect(login.statusCode, login.body).toBe(200);
  });

  it.each([
    ['limit=0', 'greater_than_equal', 'Input should be greater than or equal to 1'],
    ['limit=101', 'less_than_equal', 'Input should be less than or equal to 100'],
    ['limit=1&limit=2', 'float_parsing', 'Input should be a valid number, unable to parse string as a number'],
  ])('types numeric issues as FastAPI does: ?%s', async (query, type, msg) => {
    const response = await ctx.app.inject({ method: 'GET', url: `/api/v1/users?${query}`, headers: await superuserHeaders(ctx.app) });
    expect(response.statusCode).toBe(422);
    const [issue] = response.json<{ detail: Issue[] }>().detail;
    expect(issue).toMatchObject({ loc: ['query', 'limit'], type, msg });
    expect(issue!.msg).not.toContain('NaN');
  });
});

// ==================== Headers ====================

describe('Cache-Control', () => {
  it('is no-store on API answers, and left alone elsewhere', async () => {
    const api = await ctx.app.inject({ method: 'GET', url: '/api/v1/users/me' });
    expect(api.statusCode).toBe(401);
    expect(api.headers['cache-control']).toBe('no-store');
    const health = await ctx.app.inject({ method: 'GET', url: '/health' });
    expect(health.headers['cache-control']).toBeUndefined();
  });
});

describe('paths with a doubled slash', () => {
  it('reach their route (a base URL ending in a slash joined with a path starting with one), the OpenAI-compatible ones included', async () => {
    const user = await createUser(ctx.app);
    for (const url of ['/api/v1//users/me', '//api/v1/users/me', '/api//v1/users/me']) {
      const answer = await ctx.app.inject({ method: 'GET', url, headers: user.headers });
      expect(answer.statusCode, url).toBe(200);
      expect(answer.json<{ email: string }>().email).toBe(user.user.email);
      expect(answer.headers['cache-control'], url).toBe('no-store');
    }
    const models = await ctx.app.inject({ method: 'GET', url: '/v1//models', headers: user.headers });
    expect(models.statusCode).toBe(200);
    expect(models.json<{ object: string }>().object).toBe('list');
    // Still refused without credentials, and unknown paths stay unknown.
    expect((await ctx.app.inject({ method: 'GET', url: '/api/v1//users/me' })).statusCode).toBe(401);
    expect((await ctx.app.inject({ method: 'GET', url: '/api/v1//no-such-thing', headers: user.headers })).statusCode).toBe(404);
  });
});

// ==================== Over a real socket ====================

describe('over a real socket', () => {
  let port: number;

  beforeAll(async () => {
    await ctx.app.listen({ port: 0, host: '127.0.0.1' });
    port = (ctx.app.server.address() as { port: number }).port;
  });

  /** Opens a connection, writes `chunks` (strings now, or {after ms, data}), and collects the answer until the server closes. */
  function exchange(first: string): { socket: Socket; answer: Promise<{ text: string; closedAfterMs: number }> } {
    const started = Date.now();
    const socket = connect(port, '127.0.0.1');
    socket.write(first);
    const answer = new Promise<{ text: string; closedAfterMs: number }>((resolve) => {
      let text = '';
      socket.on('data', (chunk: Buffer) => (text += chunk.toString('utf8')));
      socket.on('error', () => undefined);
      socket.on('close', () => resolve({ text, closedAfterMs: Date.now() - started }));
    });
    return { socket, answer };
  }

  const bodyOf = (text: string) => JSON.parse(text.slice(text.indexOf('\r\n\r\n') + 4)) as unknown;

  it('answers a body over the limit with 413 and reads the rest of it, so a client still sending gets the answer and keeps its connection', async () => {
    // 3 MB against BODY_LIMIT_BYTES (1 MB): the answer comes as the headers arrive. Closing the
    // connection then (as Fastify asks) left the client writing into a closed socket: EPIPE or
    // ECONNRESET instead of the 413.
    const size = 3 * 1024 * 1024;
    const socket = connect(port, '127.0.0.1');
    const answers: string[] = [];
    let text = '';
    socket.on('data', (chunk: Buffer) => {
      text += chunk.toString('utf8');
      // Each answer here has a content-length: split them as they complete.
      for (let match = /content-length: (\d+)\r\n[\s\S]*?\r\n\r\n/i.exec(text); match; match = /content-length: (\d+)\r\n[\s\S]*?\r\n\r\n/i.exec(text)) {
        const end = match.index + match[0].length + Number(match[1]);
        if (text.length < end) break;
        answers.push(text.slice(0, end));
        text = text.slice(end);
      }
    });
    const failed = new Promise<Error>((resolve) => socket.on('error', resolve));
    const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
    const write = (data: string | Buffer) => new Promise<void>((resolve, reject) => socket.write(data, (error) => (error ? reject(error) : resolve())));
    await write(`POST /api/v1/users/signup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${size}\r\n\r\n`);
    const piece = Buffer.alloc(64 * 1024, 0x20);
    for (let sent = 0; sent < size; sent += piece.length) {
      await write(piece);
      if (sent === 0) await eventually(async () => answers.length === 1); // answered before the body is sent
    }
    // The same connection takes the next request.
    await write('GET /health HTTP/1.1\r\nHost: x\r\n\r\n');
    await Promise.race([eventually(async () => answers.length === 2), failed.then((error) => Promise.reject(error))]);
    expect(answers[0]).toMatch(/^HTTP\/1\.1 413 /);
    expect(answers[0]).not.toMatch(/connection: close/i);
    expect(bodyOf(answers[0]!)).toEqual({ detail: 'Request body too large' });
    expect(answers[1]).toMatch(/^HTTP\/1\.1 200 /);
    socket.end();
    await closed;
  });

  it('answers a malformed request line with 400 in the {detail} shape', async () => {
    const { text } = await exchange('NOT AN HTTP REQUEST\r\n\r\n').answer;
    expect(text).toMatch(/^HTTP\/1\.1 400 Bad Request\r\n/);
    expect(text).toMatch(/content-type: application\/json/i);
    expect(bodyOf(text)).toEqual({ detail: 'Malformed HTTP request' });
  });

  it('answers over-large headers with 431 in the {detail} shape', async () => {
    const { text } = await exchange(`GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`).answer;
    expect(text).toMatch(/^HTTP\/1\.1 431 /);
    expect(bodyOf(text)).toEqual({ detail: 'Request header fields too large' });
  });

  it('cuts off a body trickled one byte a second once HTTP_REQUEST_TIMEOUT_MS has passed', async () => {
    const { socket, answer } = exchange(
      'POST /api/v1/users/signup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{',
    );
    const trickle = setInterval(() => {
      if (!socket.destroyed) socket.write(' ');
    }, 1_000);
    const { text, closedAfterMs } = await answer;
    clearInterval(trickle);
    expect(text).toMatch(/^HTTP\/1\.1 408 /);
    expect(bodyOf(text)).toEqual({ detail: 'Request timeout: the request was not received in time' });
    expect(closedAfterMs).toBeGreaterThanOrEqual(1_900);
    expect(closedAfterMs).toBeLessThan(4_500);
  });

  it('applies the configured timeouts to the server', () => {
    expect(ctx.app.server.requestTimeout).toBe(2_000);
    expect(ctx.app.server.headersTimeout).toBe(1_000);
    expect(ctx.app.server.keepAliveTimeout).toBe(ctx.app.settings.HTTP_KEEP_ALIVE_TIMEOUT_MS);
  });

  it('has sane defaults, and never a headers timeout longer than the request timeout (Node refuses it)', () => {
    const defaults = serverOptions(testSettings());
    expect(defaults).toMatchObject({ requestTimeout: 30_000, keepAliveTimeout: 72_000, http: { headersTimeout: 20_000 } });
    const clamped = serverOptions(testSettings({ HTTP_HEADERS_TIMEOUT_MS: '60000', HTTP_REQUEST_TIMEOUT_MS: '5000' }));
    expect(clamped.http.headersTimeout).toBe(5_000);
    expect(() => testSettings({ HTTP_REQUEST_TIMEOUT_MS: '0' })).toThrow(/HTTP_REQUEST_TIMEOUT_MS/);
  });
});

// ==================== /metrics ====================

describe('METRICS_TOKEN', () => {
  const token = 'metrics-token-0123456789abcdef';
  let app: FastifyInstance;
  let destroy: () => Promise<void>;

  beforeAll(async () => {
    const opened = await openTestDatabase();
    destroy = opened.destroy;
    app = await buildTestApp(opened.database, { METRICS_TOKEN: token });
  });
  afterAll(async () => {
    await app?.close();
    await destroy?.();
  });

  it.each([
    ['no credentials', {}],
    ['a wrong token', { authorization: `Bearer ${token}x` }],
    ['the token in another scheme', { authorization: `Basic ${token}` }],
    ['a user API key header', { 'x-api-key': token }],
  ])('answers 401 to %s', async (_label, headers: Record<string, string>) => {
    const response = await app.inject({ method: 'GET', url: '/metrics', headers });
    expect(response.statusCode).toBe(401);
    expect(response.json()).toEqual({ detail: 'Not authenticated' });
    expect(response.body).not.toContain('http_request_duration_seconds');
  });

  it('documents the token as the route\'s security (not `security: []`)', async () => {
    const document = (await app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).json<{ paths: Record<string, { get: { security?: unknown } }>; components: { securitySchemes: Record<string, unknown> } }>();
    expect(document.paths['/metrics']!.get.security).toEqual([{ metricsToken: [] }]);
    expect(document.components.securitySchemes.metricsToken).toMatchObject({ type: 'http', scheme: 'bearer' });
  });

  it('answers the metrics to the bearer of the token', async () => {
    const response = await app.inject({ method: 'GET', url: '/metrics', headers: { authorization: `Bearer ${token}` } });
    expect(response.statusCode).toBe(200);
    expect(response.body).toContain('http_request_duration_seconds');
  });

  it('refuses a guessable token in the settings', () => {
    expect(() => testSettings({ METRICS_TOKEN: 'short' })).toThrow(/METRICS_TOKEN/);
  });

  it('stays open without the setting', async () => {
    expect((await ctx.app.inject({ method: 'GET', url: '/metrics' })).statusCode).toBe(200);
  });
});

// ==================== Closing ====================

describe('closing the server', () => {
  it('cuts a model stream still running near the shutdown deadline with an error event, metered and its hold released, so closing ends in time', async () => {
    const opened = await openTestDatabase();
    const fake = await FakeModelServer.start();
    let app: FastifyInstance | null = null;
    try {
      // The deadline 2 s away: streams are cut a quarter of it before (at 1.5 s).
      app = await buildTestApp(opened.database, { SHUTDOWN_TIMEOUT_MS: '2000', BILLING_ENABLED: 'true' });
      const admin = await superuserHeaders(app);
      await addFakeModels(app, admin, fake.url);
      const user = await createUser(app);
      expect((await call(app, 'POST', '/billing/credits', admin, { user_id: user.user.id, amount: '1000', description: 'test credits' })).statusCode).toBe(200);
      const { key } = await createKey(app, user);
      await app.listen({ host: '127.0.0.1', port: 0 });
      const { port } = app.server.address() as { port: number };
      // 50 chunks 200 ms apart: 10 s, far past the deadline.
      // Then a whole answer 10 s away.
      fake.script('fake-billed', { chunks: Array.from({ length: 50 }, (_, i) => `part ${i} `), chunkDelayMs: 200 }, { text: 'late', chunkDelayMs: 10_000 });
      const ask = (stream: boolean) =>
        fetch(`http://127.0.0.1:${port}/v1/chat/completions`, {
          method: 'POST',
          headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
          body: JSON.stringify({ model: 'fake-billed', stream, max_tokens: 100, messages: [{ role: 'user', content: 'Go on' }] }),
        });
      const response = await ask(true);
      expect(response.status).toBe(200);
      const whole = ask(false);
      await fake.waitFor((log) => log.length === 2);
      const reader = (response.body as ReadableStream<Uint8Array>).getReader();
      const decoder = new TextDecoder();
      let text = decoder.decode((await reader.read()).value);
      const started = Date.now();
      const closed = app.close();
      for (let part = await reader.read(); !part.done; part = await reader.read()) text += decoder.decode(part.value);
      await closed;
      app = null;
      expect(Date.now() - started).toBeLessThan(2_000);
      const events = text.split('\n\n').filter(Boolean);
      // Not the client's doing: a 503 it may retry elsewhere, in the stream and as the whole answer's status.
      expect(JSON.parse(events.at(-1)!.slice('data: '.length))).toEqual({ error: { message: 'The server is shutting down', type: 'server_error', param: null, code: 'service_unavailable' } });
      expect(text).not.toContain('[DONE]');
      const cut = await whole;
      expect(cut.status).toBe(503);
      expect(((await cut.json()) as { error: { code: string } }).error.code).toBe('service_unavailable');
      await fake.waitFor((log) => log[0]?.aborted === true && log[1]?.aborted === true);
      const result = await opened.database.db.execute(
        sql`select (select string_agg(status::text, ',') from usage_records where owner_id = ${user.user.id}) as status,
                   (select count(*)::int from credit_reservations where user_id = ${user.user.id}) as holds,
                   (select reserved::float from credit_accounts where user_id = ${user.user.id}) as reserved`,
      );
      expect((result as { rows: unknown[] }).rows[0]).toEqual({ status: 'aborted,aborted', holds: 0, reserved: 0 });
    } finally {
      await app?.close();
      await fake.close();
      await opened.destroy();
    }
  });

  it("refuses a request that arrives once closing has begun with 503 in the API's shape ({detail}, OpenAI's under /v1), asking the client to reconnect", async () => {
    const opened = await openTestDatabase();
    try {
      const app = await buildTestApp(opened.database);
      await app.listen({ host: '127.0.0.1', port: 0 });
      const { port } = app.server.address() as { port: number };
      const socket = connect(port, '127.0.0.1');
      await new Promise((resolve) => socket.once('connect', resolve));
      let received = '';
      socket.on('data', (chunk: Buffer) => (received += chunk.toString('utf8')));
      const ended = new Promise((resolve) => socket.once('close', resolve));
      // A request in flight (half its body sent) keeps the connection busy, so closing does not end it.
      const form = 'username=nobody%40keel.test&password=wrong-password';
      socket.write(`POST /api/v1/login/access-token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: ${form.length}\r\n\r\n${form.slice(0, 10)}`);
      await new Promise((resolve) => setTimeout(resolve, 300));
      const closing = app.close();
      await new Promise((resolve) => setTimeout(resolve, 100));
      // The rest of that body, then two requests pipelined behind it: they reach the app while it closes.
      socket.write(`${form.slice(10)}GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer keel_x\r\n\r\nGET /api/v1/projects/ HTTP/1.1\r\nHost: x\r\n\r\n`);
      await Promise.race([ended, new Promise((resolve) => setTimeout(resolve, 5_000))]);
      socket.destroy();
      await closing;
      const answers = received.split(/(?=HTTP\/1\.1 )/);
      expect(answers[0]).toMatch(/^HTTP\/1\.1 400 /); // served: it was in flight
      expect(answers[1]).toMatch(/^HTTP\/1\.1 503 /);
      expect(answers[1]).toMatch(/\r\nconnection: close\r\n/i);
      expect(answers[1]).toMatch(/\r\nx-request-id: [\w-]+\r\n/);
      expect(JSON.parse(answers[1]!.split('\r\n\r\n')[1]!)).toEqual({ error: { message: 'The server is shutting down', type: 'server_error', param: null, code: 'service_unavailable' } });
      // The connection was closed after the 503, as it asked: the third request was never answered, or answered alike.
      if (answers[2]) expect(JSON.parse(answers[2].split('\r\n\r\n')[1]!)).toEqual({ detail: 'The server is shutting down' });
    } finally {
      await opened.destroy();
    }
  });

  it('ends connections with no request in flight at once, one that never sent a request included (Node 20 keeps those otherwise)', async () => {
    const opened = await openTestDatabase();
    try {
      const app = await buildTestApp(opened.database, { HTTP_HEADERS_TIMEOUT_MS: '60000', HTTP_REQUEST_TIMEOUT_MS: '60000' });
      await app.listen({ host: '127.0.0.1', port: 0 });
      const { port } = app.server.address() as { port: number };
      const silent = connect(port, '127.0.0.1');
      await new Promise((resolve) => silent.once('connect', resolve));
      // A keep-alive connection that carried a request and is idle now.
      const used = connect(port, '127.0.0.1');
      await new Promise((resolve) => used.once('connect', resolve));
      used.write('GET /health HTTP/1.1\r\nHost: x\r\n\r\n');
      await new Promise((resolve) => used.once('data', resolve));
      const ended = Promise.all([silent, used].map((socket) => new Promise((resolve) => socket.once('close', resolve))));

      const closing = app.close().then(() => 'closed');
      // The keep-alive timeout (72 s) and the header timeout (60 s) are far away: only closing ends them.
      const outcome = await Promise.race([closing, new Promise((resolve) => setTimeout(() => resolve('still open'), 10_000))]);
      expect(outcome).toBe('closed');
      await ended;
    } finally {
      await opened.destroy();
    }
  });
});
