import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import S3rver from 's3rver';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { openDatabase } from '../../src/core/db.js';

import { buildApp } from '../../src/app.js';
import { STORAGE_CHECK_CACHE_MS } from '../../src/services/storage-service.js';
import { buildTestApp, openTestDatabase, SUPERUSER_EMAIL, SUPERUSER_PASSWORD, testSettings, useTestApp } from '../helpers/app.js';
import { bearer, createUser, login } from '../helpers/factories.js';
import { eventually } from '../helpers/http.js';
import { type CapturedLogs, captureLogs, LEVEL } from '../helpers/logs.js';
import { routePath, servedRoutes } from '../helpers/routes.js';

const ctx = useTestApp();
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const JSON_HEADERS = { 'content-type': 'application/json' };

interface RawResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** A request over a real socket, with the path sent byte for byte as given. */
function raw(app: FastifyInstance, options: { method?: string; path: string; headers?: Record<string, string>; body?: Buffer | string; chunks?: Buffer[] }): Promise<RawResponse> {
  const { port } = app.server.address() as AddressInfo;
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port, method: options.method ?? 'GET', path: options.path, headers: options.headers }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (chunk: Buffer) => parts.push(chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(parts).toString('utf8') }));
      res.on('error', reject);
    });
    // The server may answer (413) and close before the whole body is written.
    req.on('error', reject);
    if (options.chunks) for (const chunk of options.chunks) req.write(chunk);
    req.end(options.body);
  });
}

beforeAll(async () => {
  await ctx.app.listen({ host: '127.0.0.1', port: 0 });
});

/** What /ready logged about its checks. */
const readinessLines = (logs: CapturedLogs) => logs.lines().filter((line) => String(line.msg).startsWith('readiness: '));

describe('health and readiness', () => {
  it('GET /health answers ok', async () => {
    const response = await ctx.app.inject({ method: 'GET', url: '/health' });
    expect(response.statusCode).toBe(200);
    expect(response.json()).toEqual({ status: 'ok' });
  });

  it('GET /ready reports every dependency as ok', async () => {
    const response = await ctx.app.inject({ method: 'GET', url: '/ready' });
    expect(response.statusCode).toBe(200);
    const checks: Record<string, string> = process.env.REDIS_URL ? { database: 'ok', redis: 'ok' } : { database: 'ok' };
    expect(response.json()).toEqual({
      status: 'ready',
      checks,
      database: ctx.database.kind,
      vector_search: expect.any(Boolean) as boolean,
    });
  });

  it('GET /ready answers 503 once the database is gone, and logs why once, not at every poll', async () => {
    const opened = await openTestDatabase();
    const logs = captureLogs('info');
    const app = await buildTestApp(opened.database, {}, { logger: logs.logger });
    try {
      expect((await app.inject({ method: 'GET', url: '/ready' })).statusCode).toBe(200);
      expect(readinessLines(logs)).toEqual([]);
      await opened.database.close();
      const response = await app.inject({ method: 'GET', url: '/ready' });
      expect(response.statusCode).toBe(503);
      expect(response.json()).toMatchObject({ status: 'unavailable', checks: { database: 'unavailable' }, database: opened.database.kind });
      for (let poll = 0; poll < 3; poll++) expect((await app.inject({ method: 'GET', url: '/ready' })).statusCode).toBe(503);
      const [warned, ...more] = readinessLines(logs);
      expect(more).toEqual([]);
      expect(warned).toMatchObject({ level: LEVEL.warn, check: 'database', msg: 'readiness: database unavailable', reason: expect.any(String) as string });
      expect((warned!.reason as string).length).toBeGreaterThan(0);
      // Liveness does not depend on the database.
      expect((await app.inject({ method: 'GET', url: '/health' })).statusCode).toBe(200);
    } finally {
      await app.close();
      await opened.destroy();
    }
  });

  it('GET /ready answers 503 when the database server cannot be reached, logging the refusal without the password, and API calls answer 503', async () => {
    const settings = testSettings({ DATABASE_URL: 'postgres://postgres:a-db-password@127.0.0.1:1/x', REDIS_URL: '' });
    const database = await openDatabase(settings);
    const logs = captureLogs('info');
    const app = await buildApp({ settings, database, logger: logs.logger, vectorSearch: false, runJobs: true });
    try {
      const ready = await app.inject({ method: 'GET', url: '/ready' });
      expect(ready.statusCode).toBe(503);
      expect(ready.json()).toMatchObject({ status: 'unavailable', checks: { database: 'unavailable' }, database: 'postgres' });
      expect(readinessLines(logs)).toEqual([expect.objectContaining({ level: LEVEL.warn, check: 'database', reason: expect.stringContaining('ECONNREFUSED') as string })]);
      expect(JSON.stringify(logs.lines())).not.toContain('a-db-password');
      // The model catalog still starts (built-ins; the database's rows are read again later).
      expect(app.models.getModel('gpt-4.1')?.id).toBe('gpt-4.1');

      const loginAttempt = await app.inject({
        method: 'POST',
        url: '/api/v1/login/access-token',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        payload: new URLSearchParams({ username: 'someone@keel.test', password: 'a-password' }).toString(),
      });
      expect(loginAttempt.statusCode).toBe(503);
      expect(loginAttempt.json()).toEqual({ detail: 'Service unavailable' });
    } finally {
      await app.close();
      await database.close();
    }
  });

  it('GET /ready answers 503 when Redis cannot be reached, logging why without the password', async () => {
    const logs = captureLogs('info');
    const app = await buildTestApp(ctx.database, { REDIS_URL: 'redis://:a-redis-password@127.0.0.1:1' }, { logger: logs.logger });
    try {
      const response = await app.inject({ method: 'GET', url: '/ready' });
      expect(response.statusCode).toBe(503);
      expect(response.json()).toMatchObject({ status: 'unavailable', checks: { database: 'ok', redis: 'unavailable' } });
      expect(readinessLines(logs)).toEqual([expect.objectContaining({ level: LEVEL.warn, check: 'redis', reason: expect.any(String) as string })]);
      expect(JSON.stringify(logs.lines())).not.toContain('a-redis-password');
    } finally {
      await app.close();
    }
  });
});

describe('readiness with STORAGE_BACKEND=s3', () => {
  /** An app whose files go to a bucket of an s3rver of the test's own, which the test stops. */
  async function s3App(bucket: string) {
    const dir = mkdtempSync(join(tmpdir(), 'keel-ready-s3-'));
    const s3 = new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory: dir, configureBuckets: [{ name: 'keel-ready' }] });
    const { port } = await s3.run();
    let running = true;
    const stopS3 = async () => {
      if (running) await new Promise<void>((done) => s3.close(() => done()));
      running = false;
    };
    const app = await buildTestApp(ctx.database, {
      STORAGE_BACKEND: 's3',
      S3_BUCKET: bucket,
      S3_ENDPOINT: `http://127.0.0.1:${port}`,
      S3_ACCESS_KEY_ID: 'S3RVER',
      S3_SECRET_ACCESS_KEY: 'S3RVER',
      S3_FORCE_PATH_STYLE: 'true',
    });
    const ready = async () => {
      const response = await app.inject({ method: 'GET', url: '/ready' });
      return { status: response.statusCode, body: response.json<{ status: string; checks: Record<string, string> }>() };
    };
    const close = async () => {
      await app.close();
      await stopS3();
      rmSync(dir, { recursive: true, force: true });
    };
    return { ready, stopS3, close };
  }

  it('reports the bucket beside the database, and answers 503 naming storage once the S3 server stops', async () => {
    const s3 = await s3App('keel-ready');
    try {
      const up = await s3.ready();
      expect(up.status).toBe(200);
      expect(up.body).toMatchObject({ status: 'ready', checks: { database: 'ok', storage: 'ok' } });
      await s3.stopS3();
      // The answer stands a few seconds (STORAGE_CHECK_CACHE_MS), so /ready stays cheap: then 503.
      let down = up;
      await eventually(async () => (down = await s3.ready()).status === 503, STORAGE_CHECK_CACHE_MS + 10_000);
      expect(down.body).toMatchObject({ status: 'unavailable', checks: { database: 'ok', storage: 'unavailable' } });
    } finally {
      await s3.close();
    }
  }, 30_000);

  // s3rver checks no credentials: these S3 answers come from a server that gives only them.
  it.each([
    ['AccessDenied, S3\'s answer for a missing key to credentials without s3:ListBucket', 200, 'ok', 403, 'AccessDenied'],
    ['SignatureDoesNotMatch (a wrong secret)', 503, 'unavailable', 403, 'SignatureDoesNotMatch'],
    ['InvalidAccessKeyId (a wrong key)', 503, 'unavailable', 403, 'InvalidAccessKeyId'],
    ['a server error', 503, 'unavailable', 500, 'InternalError'],
    ['a bare 404 (S3_ENDPOINT a web server that is not S3)', 503, 'unavailable', 404, null],
  ])('reads %s: /ready %i, storage %s', async (_label, readyStatus, storage, status, code) => {
    const server = createServer((_request, response) => {
      if (code === null) {
        response.writeHead(status, { 'content-type': 'text/html' });
        response.end('<html><body>Not Found</body></html>');
        return;
      }
      response.writeHead(status, { 'content-type': 'application/xml' });
      response.end(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>${code}</Code><Message>${code}</Message></Error>`);
    });
    await new Promise<void>((listening) => server.listen(0, '127.0.0.1', listening));
    const app = await buildTestApp(ctx.database, {
      STORAGE_BACKEND: 's3',
      S3_BUCKET: 'keel-ready',
      S3_ENDPOINT: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
      S3_ACCESS_KEY_ID: 'key',
      S3_SECRET_ACCESS_KEY: 'secret',
      S3_FORCE_PATH_STYLE: 'true',
    });
    try {
      const response = await app.inject({ method: 'GET', url: '/ready' });
      expect(response.statusCode).toBe(readyStatus);
      expect(response.json()).toMatchObject({ checks: { database: 'ok', storage } });
    } finally {
      await app.close();
      server.closeAllConnections();
      await new Promise((closed) => server.close(closed));
    }
  });

  it('logs why the bucket became unavailable once, however often /ready is asked, and that it is back once it answers again', async () => {
    let failing = true;
    const server = createServer((_request, response) => {
      response.writeHead(failing ? 500 : 404, { 'content-type': 'application/xml' });
      const code = failing ? 'InternalError' : 'NoSuchKey';
      response.end(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>${code}</Code><Message>${code} from the test's S3</Message></Error>`);
    });
    await new Promise<void>((listening) => server.listen(0, '127.0.0.1', listening));
    const logs = captureLogs('info');
    const app = await buildTestApp(
      ctx.database,
      {
        STORAGE_BACKEND: 's3',
        S3_BUCKET: 'keel-ready',
        S3_ENDPOINT: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
        S3_ACCESS_KEY_ID: 'key',
        S3_SECRET_ACCESS_KEY: 'a-storage-secret',
        S3_FORCE_PATH_STYLE: 'true',
      },
      { logger: logs.logger },
    );
    try {
      for (let poll = 0; poll < 3; poll++) expect((await app.inject({ method: 'GET', url: '/ready' })).statusCode).toBe(503);
      expect(readinessLines(logs)).toEqual([
        expect.objectContaining({ level: LEVEL.warn, check: 'storage', msg: 'readiness: storage unavailable', reason: expect.stringContaining("InternalError from the test's S3") as string }),
      ]);
      failing = false;
      await eventually(async () => (await app.inject({ method: 'GET', url: '/ready' })).statusCode === 200, STORAGE_CHECK_CACHE_MS + 10_000);
      expect((await app.inject({ method: 'GET', url: '/ready' })).statusCode).toBe(200);
      expect(readinessLines(logs).slice(1)).toEqual([expect.objectContaining({ level: LEVEL.info, check: 'storage', msg: 'readiness: storage available again' })]);
      expect(JSON.stringify(logs.lines())).not.toContain('a-storage-secret');
    } finally {
      await app.close();
      server.closeAllConnections();
      await new Promise((closed) => server.close(closed));
    }
  }, 30_000);

  it('answers 503 naming storage when the bucket does not exist', async () => {
    const s3 = await s3App('no-such-bucket');
    try {
      const missing = await s3.ready();
      expect(missing.status).toBe(503);
      expect(missing.body).toMatchObject({ status: 'unavailable', checks: { database: 'ok', storage: 'unavailable' } });
    } finally {
      await s3.close();
    }
  });
});

describe('metrics', () => {
  it('exposes the HTTP latency histogram by route template', async () => {
    await ctx.app.inject({ method: 'GET', url: '/health' });
    const alice = await createUser(ctx.app);
    const id = '00000000-0000-4000-8000-000000000000';
    expect((await ctx.app.inject({ method: 'GET', url: `/api/v1/projects/${id}`, headers: alice.headers })).statusCode).toBe(404);
    const unknown = `/no-such-route-${randomBytes(4).toString('hex')}`;
    expect((await ctx.app.inject({ method: 'GET', url: unknown })).statusCode).toBe(404);

    const response = await ctx.app.inject({ method: 'GET', url: '/metrics' });
    expect(response.statusCode).toBe(200);
    expect(response.headers['content-type']).toMatch(/^text\/plain/);
    const text = response.body;
    expect(text).toContain('# TYPE http_request_duration_seconds histogram');
    expect(text).toMatch(/^http_request_duration_seconds_count\{[^}]*route="\/health"[^}]*\} [1-9]\d*$/m);
    expect(text).toMatch(/^http_request_duration_seconds_bucket\{[^}]*le="\+Inf"[^}]*route="\/health"[^}]*\}|^http_request_duration_seconds_bucket\{[^}]*route="\/health"[^}]*le="\+Inf"/m);
    // Labelled by template, never by the concrete path (bounded cardinality).
    expect(text).toContain('route="/api/v1/projects/:project_id"');
    expect(text).not.toContain(id);
    expect(text).not.toContain(unknown);
    // Default process metrics come along.
    expect(text).toContain('process_cpu_user_seconds_total');
  });
});

describe('request ids', () => {
  it('every response carries a fresh x-request-id', async () => {
    const first = await ctx.app.inject({ method: 'GET', url: '/health' });
    const second = await ctx.app.inject({ method: 'GET', url: '/health' });
    expect(first.headers['x-request-id']).toMatch(UUID);
    expect(second.headers['x-request-id']).toMatch(UUID);
    expect(first.headers['x-request-id']).not.toBe(second.headers['x-request-id']);
    // Errors too.
    expect((await ctx.app.inject({ method: 'GET', url: '/nope' })).headers['x-request-id']).toMatch(UUID);
    const invalid = await ctx.app.inject({ method: 'POST', url: '/api/v1/users/signup', headers: JSON_HEADERS, payload: '{' });
    expect(invalid.headers['x-request-id']).toMatch(UUID);
  });

  it('echoes a sane incoming id', async () => {
    for (const given of ['abc-123', 'trace.id:42_x', 'a'.repeat(128), '7d3c3ad0-8b6b-4b61-9a8e-5d7f3e2b9c11']) {
      const response = await raw(ctx.app, { path: '/health', headers: { 'x-request-id': given } });
      expect(response.headers['x-request-id']).toBe(given);
    }
  });

  it('replaces a malformed incoming id', async () => {
    for (const given of ['has spaces', 'a'.repeat(500), 'line<script>', 'semi;colon', '']) {
      const response = await raw(ctx.app, { path: '/health', headers: { 'x-request-id': given } });
      expect(response.status).toBe(200);
      expect(response.headers['x-request-id']).toMatch(UUID);
    }
  });
});

describe('security headers and CORS', () => {
  it('sends helmet headers', async () => {
    const response = await ctx.app.inject({ method: 'GET', url: '/health' });
    expect(response.headers['x-content-type-options']).toBe('nosniff');
    expect(response.headers['x-frame-options']).toBe('SAMEORIGIN');
    expect(response.headers['strict-transport-security']).toMatch(/max-age=\d+/);
    expect(response.headers['referrer-policy']).toBe('no-referrer');
    expect(response.headers['content-security-policy']).toContain("default-src 'self'");
    expect(response.headers['x-powered-by']).toBeUndefined();
    // Error answers too.
    expect((await ctx.app.inject({ method: 'GET', url: '/nope' })).headers['x-content-type-options']).toBe('nosniff');
  });

  it('allows no cross-origin caller by default', async () => {
    const response = await ctx.app.inject({ method: 'GET', url: '/health', headers: { origin: 'http://evil.example' } });
    expect(response.headers['access-control-allow-origin']).toBeUndefined();
    // Nothing depends on the origin, so nothing says it does.
    expect(response.headers.vary).toBeUndefined();
  });

  it('answers a preflight by default as a plain OPTIONS: 405 with Allow, no CORS headers', async () => {
    const preflight = await ctx.app.inject({
      method: 'OPTIONS',
      url: '/api/v1/projects',
      headers: { origin: 'http://evil.example', 'access-control-request-method': 'POST' },
    });
    expect(preflight.statusCode).toBe(405);
    expect(preflight.headers.allow).toContain('POST');
    expect(preflight.headers['access-control-allow-origin']).toBeUndefined();
    expect(preflight.headers['access-control-allow-methods']).toBeUndefined();
  });

  describe('with BACKEND_CORS_ORIGINS', () => {
    let app: FastifyInstance;
    beforeAll(async () => {
      app = await buildTestApp(ctx.database, { BACKEND_CORS_ORIGINS: 'http://allowed.example, https://app.allowed.example' });
    });
    afterAll(async () => {
      await app?.close();
    });

    it('answers an allowed origin', async () => {
      for (const origin of ['http://allowed.example', 'https://app.allowed.example']) {
        const response = await app.inject({ method: 'GET', url: '/health', headers: { origin } });
        expect(response.statusCode).toBe(200);
        expect(response.headers['access-control-allow-origin']).toBe(origin);
        expect(response.headers['access-control-allow-credentials']).toBe('true');
        expect(String(response.headers['access-control-expose-headers'])).toContain('x-request-id');
      }
    });

    it('answers a preflight from an allowed origin', async () => {
      const response = await app.inject({
        method: 'OPTIONS',
        url: '/api/v1/projects',
        headers: { origin: 'http://allowed.example', 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization,content-type' },
      });
      expect(response.statusCode).toBeLessThan(300);
      expect(response.headers['access-control-allow-origin']).toBe('http://allowed.example');
      expect(String(response.headers['access-control-allow-methods'])).toContain('POST');
    });

    it('does not answer another origin', async () => {
      for (const origin of ['http://evil.example', 'http://allowed.example.evil.example', 'http://allowed.example:8080']) {
        const response = await app.inject({ method: 'GET', url: '/health', headers: { origin } });
        expect(response.headers['access-control-allow-origin']).toBeUndefined();
        const preflight = await app.inject({
          method: 'OPTIONS',
          url: '/api/v1/projects',
          headers: { origin, 'access-control-request-method': 'POST' },
        });
        expect(preflight.headers['access-control-allow-origin']).toBeUndefined();
      }
    });
  });
});

describe('client errors', () => {
  it('an unknown route answers 404 {detail: "Not Found"}', async () => {
    for (const [method, url] of [
      ['GET', '/nope'],
      ['POST', '/api/v1/nope'],
      ['DELETE', '/api/v2/projects'],
      ['PUT', '/nope/health'],
    ] as const) {
      const response = await ctx.app.inject({ method, url });
      expect(response.statusCode).toBe(404);
      expect(response.headers['content-type']).toMatch(/^application\/json/);
      expect(response.json()).toEqual({ detail: 'Not Found' });
    }
  });

  it('invalid JSON answers 422', async () => {
    for (const payload of ['{"email": ', '{bad}', '{"__proto__": {"is_superuser": true}}', '{"constructor": {"prototype": {"x": 1}}}']) {
      const response = await ctx.app.inject({ method: 'POST', url: '/api/v1/users/signup', headers: JSON_HEADERS, payload });
      expect(response.statusCode).toBe(422);
      expect(response.json()).toEqual({ detail: [{ loc: ['body'], msg: 'JSON decode error', type: 'json_invalid' }] });
    }
  });

  it('an unsupported content type answers 415 {detail}', async () => {
    for (const type of ['application/xml', 'multipart/form-data; boundary=x', 'image/png']) {
      const response = await ctx.app.inject({ method: 'POST', url: '/api/v1/users/signup', headers: { 'content-type': type }, payload: '<a/>' });
      expect(response.statusCode).toBe(415);
      expect(response.json()).toEqual({ detail: expect.any(String) as string });
    }
  });

  it('an oversized body answers 413 {detail}', async () => {
    const big = JSON.stringify({ email: 'big@keel.test', password: 'x'.repeat(ctx.app.settings.BODY_LIMIT_BYTES) });
    const response = await ctx.app.inject({ method: 'POST', url: '/api/v1/users/signup', headers: JSON_HEADERS, payload: big });
    expect(response.statusCode).toBe(413);
    expect(response.json()).toEqual({ detail: 'Request body too large' });

    const form = await ctx.app.inject({
      method: 'POST',
      url: '/api/v1/login/access-token',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      payload: `username=a%40b.co&password=${'x'.repeat(ctx.app.settings.BODY_LIMIT_BYTES)}`,
    });
    expect(form.statusCode).toBe(413);
    expect(form.json()).toEqual({ detail: 'Request body too large' });
  });

  it('an oversized streamed body (no content-length) answers 413 over a real socket', async () => {
    const chunk = Buffer.alloc(64 * 1024, 'a');
    const chunks = Array.from({ length: Math.ceil(ctx.app.settings.BODY_LIMIT_BYTES / chunk.length) + 2 }, () => chunk);
    const response = await raw(ctx.app, {
      method: 'POST',
      path: '/api/v1/users/signup',
      headers: { 'content-type': 'application/json', 'transfer-encoding': 'chunked' },
      chunks,
    });
    expect(response.status).toBe(413);
    expect(JSON.parse(response.body)).toEqual({ detail: 'Request body too large' });
  });

  it('no malformed request gives a 500, and every answer is {detail}', async () => {
    const alice = await createUser(ctx.app);
    const cases: { method?: string; path: string; headers?: Record<string, string>; body?: Buffer | string }[] = [
      { method: 'POST', path: '/api/v1/users/signup', headers: JSON_HEADERS, body: '' },
      { method: 'POST', path: '/api/v1/users/signup', headers: JSON_HEADERS, body: 'null' },
      { method: 'POST', path: '/api/v1/users/signup', headers: JSON_HEADERS, body: '[]' },
      { method: 'POST', path: '/api/v1/users/signup', headers: JSON_HEADERS, body: '"text"' },
      { method: 'POST', path: '/api/v1/users/signup', headers: JSON_HEADERS, body: '['.repeat(50_000) + ']'.repeat(50_000) },
      { method: 'POST', path: '/api/v1/users/signup', headers: JSON_HEADERS, body: Buffer.from([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x3a, 0x31, 0x7d]) },
      { method: 'POST', path: '/api/v1/users/signup', headers: { 'content-type': 'text/plain' }, body: 'hello' },
      { method: 'POST', path: '/api/v1/users/signup', headers: JSON_HEADERS, body: JSON.stringify({ email: 'x@keel.test', password: 'p'.repeat(8), full_name: 'x'.repeat(10_000) }) },
      { method: 'POST', path: '/api/v1/users/signup', headers: JSON_HEADERS, body: JSON.stringify({ email: `${'a'.repeat(300)}@keel.test`, password: 'p'.repeat(8) }) },
      { method: 'POST', path: '/api/v1/login/access-token', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: '%%%=&&&' },
      { method: 'POST', path: '/api/v1/login/access-token', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: 'username=a@b.co&username=c@d.co&password=12345678' },
      { path: '/api/v1/users/%E0%A4%A' },
      { path: `/api/v1/users/${'a'.repeat(300)}`, headers: alice.headers },
      { path: '/api/v1/users/not-a-uuid', headers: alice.headers },
      { path: '/api/v1/projects/00000000-0000-0000-0000-00000000000g', headers: alice.headers },
      { path: '/api/v1/projects?limit=abc', headers: alice.headers },
      { path: '/api/v1/projects?limit=1000&offset=-1', headers: alice.headers },
      { path: '/api/v1/projects?limit=1&limit=2', headers: alice.headers },
      { path: '/api/v1/projects?offset=99999999999999999999999', headers: alice.headers },
      { path: '/api/v1/projects?limit=%E0%A4%A', headers: alice.headers },
      { method: 'POST', path: '/api/v1/projects', headers: { ...alice.headers, ...JSON_HEADERS }, body: JSON.stringify({ name: 'x', id: 'y', owner_id: 'z' }) },
      { method: 'POST', path: '/api/v1/projects', headers: { ...alice.headers, ...JSON_HEADERS }, body: JSON.stringify({ name: 'a\u0000b' }) },
      { path: '/api/v1/users/me', headers: { authorization: 'Basic abc' } },
      { path: '/api/v1/users/me', headers: { authorization: `Bearer ${'x'.repeat(5000)}` } },
      { path: '/api/v1/users/me', headers: { authorization: 'Bearer a.b.c' } },
      { path: '/api/v1/users/me', headers: { 'x-api-key': 'garbage' } },
    ];
    for (const testCase of cases) {
      const response = await raw(ctx.app, testCase);
      const label = `${testCase.method ?? 'GET'} ${testCase.path.slice(0, 60)} -> ${response.status} ${response.body.slice(0, 200)}`;
      expect(response.status, label).toBeGreaterThanOrEqual(400);
      expect(response.status, label).toBeLessThan(500);
      expect(response.headers['content-type'], label).toMatch(/^application\/json/);
      expect(JSON.parse(response.body), label).toHaveProperty('detail');
      expect(response.headers['x-request-id'], label).toMatch(UUID);
    }
  });
});

describe('API reference', () => {
  it('/docs serves the interactive reference', async () => {
    let response = await raw(ctx.app, { path: '/docs' });
    for (let hops = 0; response.status >= 300 && response.status < 400 && hops < 5; hops++) {
      response = await raw(ctx.app, { path: String(response.headers.location) });
    }
    expect(response.status).toBe(200);
    expect(response.headers['content-type']).toMatch(/^text\/html/);
    expect(response.body.toLowerCase()).toContain('<html');
  });

  it('the OpenAPI document is 3.1 and documents every operation fully', async () => {
    const response = await ctx.app.inject({ method: 'GET', url: '/api/v1/openapi.json' });
    expect(response.statusCode).toBe(200);
    const document = response.json<{
      openapi: string;
      paths: Record<string, Record<string, { operationId?: string; summary?: string; tags?: string[]; responses?: Record<string, { content?: Record<string, { schema?: unknown }> }> }>>;
    }>();
    expect(document.openapi).toMatch(/^3\.1\./);

    const methods = new Set(['get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace']);
    const operationIds: string[] = [];
    for (const [path, item] of Object.entries(document.paths)) {
      for (const [method, operation] of Object.entries(item)) {
        if (!methods.has(method)) continue;
        const where = `${method.toUpperCase()} ${path}`;
        expect(operation.operationId, where).toMatch(/^[a-z][a-z0-9]*(_[a-z0-9]+)*$/);
        operationIds.push(operation.operationId!);
        expect(operation.summary?.trim(), where).toBeTruthy();
        expect(operation.tags?.length, where).toBeGreaterThan(0);
        for (const tag of operation.tags ?? []) expect(tag.trim(), where).toBeTruthy();
        const success = Object.entries(operation.responses ?? {}).filter(([status]) => /^2\d\d$/.test(status));
        expect(success.length, `${where} has a 2xx response`).toBeGreaterThan(0);
        for (const [status, answer] of success) {
          if (status === '204') continue;
          const schemas = Object.values(answer.content ?? {}).map((media) => media.schema);
          expect(schemas.length, `${where} ${status} has content`).toBeGreaterThan(0);
          for (const schema of schemas) expect(schema, `${where} ${status} has a schema`).toBeTruthy();
        }
      }
    }
    expect(new Set(operationIds).size).toBe(operationIds.length);

    // The operations exist, with path parameters in OpenAPI form; the reference's own routes are hidden.
    const paths = Object.keys(document.paths);
    for (const path of ['/health', '/ready', '/metrics', '/api/v1/login/access-token', '/api/v1/users/me', '/api/v1/projects/{project_id}']) {
      expect(paths).toContain(path);
    }
    expect(paths.some((p) => p.includes(':'))).toBe(false);
    expect(paths.some((p) => p.startsWith('/docs') || p.endsWith('openapi.json'))).toBe(false);
  });

  it('documents every route the app serves', async () => {
    const document = (await ctx.app.inject({ method: 'GET', url: '/api/v1/openapi.json' })).json<{ paths: Record<string, Record<string, unknown>> }>();
    const documented = new Set(
      Object.entries(document.paths).flatMap(([path, item]) => Object.keys(item).map((method) => `${method.toUpperCase()} ${routePath(path.replace(/\{(\w+)\}/g, ':$1'))}`),
      ),
    );
    const served = servedRoutes(ctx.app);
    expect(served.length).toBeGreaterThan(10);
    const undocumented = served.filter((route) => {
      const [method, path] = route.split(' ') as [string, string];
      if (method === 'HEAD' || method === 'OPTIONS') return false;
      if (path.startsWith('/docs') || path === '/api/v1/openapi.json') return false;
      return !documented.has(route);
    });
    expect(undocumented).toEqual([]);
  });
});

describe('logs', () => {
  const logs = captureLogs('info');
  let lines: Record<string, unknown>[] = [];
  /** Everything logged, as one text: what a secret must not be found in. */
  let loggedText = '';
  let app: FastifyInstance;

  beforeAll(async () => {
    const settings = testSettings({ LOG_LEVEL: 'info', LOG_FORMAT: 'json', REDIS_URL: '' });
    app = await buildApp({ settings, database: ctx.database, logger: logs.logger, vectorSearch: false, runJobs: true });
    // What careless code might log: it must come out redacted all the same.
    app.get('/test/log-everything', async (request) => {
      request.log.info(
        {
          headers: request.headers,
          password: 'top-level-password-value',
          token: 'top-level-token-value',
          secret: 'top-level-secret-value',
          user: { password: 'nested-password-value', hashed_password: 'nested-hash-value', access_token: 'nested-token-value' },
        },
        'careless log line',
      );
      return { ok: true };
    });
    app.get('/test/boom', async () => {
      throw new Error('boom with private details');
    });
    // A failing query whose parameters are secret: they must not reach the log.
    app.get('/test/failing-query', async () => {
      // Division by zero: an error the handler does not map, so it is logged as a 500.
      await app.db.execute(sql`select 1 / (${'parameter-secret-value'} = 'other')::int`);
      return { ok: true };
    });
    await app.ready();
  });
  afterAll(async () => {
    await app?.close();
  });

  const parse = () => {
    lines = logs.lines();
    loggedText = JSON.stringify(lines);
  };

  it('carry the request id, and never a bearer token, API key or password', async () => {
    const signupPassword = `signup-${randomBytes(8).toString('hex')}`;
    const signup = await app.inject({
      method: 'POST',
      url: '/api/v1/users/signup',
      headers: JSON_HEADERS,
      payload: { email: `log-${randomBytes(4).toString('hex')}@keel.test`, password: signupPassword },
    });
    expect(signup.statusCode).toBe(200);

    const token = await login(app, SUPERUSER_EMAIL, SUPERUSER_PASSWORD);
    const me = await app.inject({ method: 'GET', url: '/api/v1/users/me', headers: { ...bearer(token), 'x-request-id': 'trace-me-1' } });
    expect(me.statusCode).toBe(200);
    const wrongLogin = await app.inject({
      method: 'POST',
      url: '/api/v1/login/access-token',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      payload: new URLSearchParams({ username: SUPERUSER_EMAIL, password: 'wrong-password-value' }).toString(),
    });
    expect(wrongLogin.statusCode).toBe(400);

    const keyResponse = await app.inject({ method: 'POST', url: '/api/v1/api-keys', headers: bearer(token), payload: { name: 'log test' } });
    expect(keyResponse.statusCode).toBeLessThan(300);
    const apiKey = keyResponse.json<{ key: string }>().key;
    expect((await app.inject({ method: 'GET', url: '/api/v1/users/me', headers: { 'x-api-key': apiKey } })).statusCode).toBe(200);

    const careless = await app.inject({ method: 'GET', url: '/test/log-everything', headers: { ...bearer(token), 'x-api-key': apiKey, 'x-request-id': 'trace-careless' } });
    expect(careless.statusCode).toBe(200);

    parse();
    const completed = lines.filter((line) => line.msg === 'request completed');
    expect(completed.length).toBeGreaterThanOrEqual(6);
    for (const line of completed) {
      expect(line.reqId).toEqual(expect.any(String));
      expect(line).toMatchObject({ method: expect.any(String) as string, route: expect.any(String) as string, status: expect.any(Number) as number });
    }
    // The id in the log is the id the client saw.
    expect(completed.find((line) => line.reqId === 'trace-me-1')).toMatchObject({ route: '/api/v1/users/me', status: 200 });
    expect(completed.find((line) => line.reqId === me.headers['x-request-id'])).toBeDefined();

    const carelessLine = lines.find((line) => line.msg === 'careless log line');
    expect(carelessLine).toMatchObject({
      reqId: 'trace-careless',
      password: '[redacted]',
      token: '[redacted]',
      secret: '[redacted]',
      headers: { authorization: '[redacted]', 'x-api-key': '[redacted]' },
      user: { password: '[redacted]', hashed_password: '[redacted]', access_token: '[redacted]' },
    });

    for (const secret of [
      token,
      apiKey,
      SUPERUSER_PASSWORD,
      signupPassword,
      'wrong-password-value',
      'top-level-password-value',
      'top-level-token-value',
      'top-level-secret-value',
      'nested-password-value',
      'nested-hash-value',
      'nested-token-value',
    ]) {
      expect(loggedText).not.toContain(secret);
    }
    expect(loggedText).not.toMatch(/bearer\s+ey/i);
  });

  it('a failed query is logged with its SQL and cause, never its parameters', async () => {
    const response = await app.inject({ method: 'GET', url: '/test/failing-query', headers: { 'x-request-id': 'trace-query' } });
    expect(response.statusCode).toBe(500);
    parse();
    const errorLine = lines.find((line) => line.reqId === 'trace-query' && line.level === 50);
    expect(JSON.stringify(errorLine)).toContain('division by zero');
    expect(errorLine).toHaveProperty('query');
    expect(loggedText).not.toContain('parameter-secret-value');
  });

  it('a failure answers a bare 500 and logs the error with its request id', async () => {
    const response = await app.inject({ method: 'GET', url: '/test/boom', headers: { 'x-request-id': 'trace-boom' } });
    expect(response.statusCode).toBe(500);
    expect(response.json()).toEqual({ detail: 'Internal server error' });
    expect(response.body).not.toContain('boom');
    expect(response.body).not.toMatch(/\bat .*\.ts/);

    parse();
    const errorLine = lines.find((line) => line.reqId === 'trace-boom' && line.level === 50);
    expect(errorLine).toBeDefined();
    expect(JSON.stringify(errorLine)).toContain('boom with private details');
  });
});
