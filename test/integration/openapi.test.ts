import { compileErrors, validate } from '@readme/openapi-parser';
import type { FastifyInstance } from 'fastify';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { CORS_ALLOWED_HEADERS, CORS_EXPOSED_HEADERS, CORS_METHODS } from '../../src/core/cors.js';

import { buildTestApp, useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { type OpenApiDocument, operationsOf, resolvePointer, routePath, servedRoutes } from '../helpers/routes.js';

const ctx = useTestApp();

/** The operations that need no credentials: every other one must answer 401 without them. */
const PUBLIC_OPERATIONS = ['health', 'ready', 'metrics', 'login_access_token', 'register_user', 'recover_password', 'reset_password'];

/** A concrete URL for a documented path (`{email}` → an address, any other parameter → a UUID). */
const concrete = (path: string) =>
  path.replace(/\{(\w+)\}/g, (_, name: string) => (name === 'email' ? 'nobody%40keel.test' : '00000000-0000-4000-8000-000000000000'));

/** Every `$ref` anywhere in `value`. */
function refsIn(value: unknown, found: string[] = []): string[] {
  if (Array.isArray(value)) for (const item of value) refsIn(item, found);
  else if (value !== null && typeof value === 'object') {
    for (const [key, child] of Object.entries(value)) {
      if (key === '$ref' && typeof child === 'string') found.push(child);
      else refsIn(child, found);
    }
  }
  return found;
}

let document: OpenApiDocument;
beforeAll(async () => {
  const response = await ctx.app.inject({ method: 'GET', url: '/api/v1/openapi.json' });
  expect(response.statusCode).toBe(200);
  document = response.json<OpenApiDocument>();
});

describe('the OpenAPI document', () => {
  it('validates with @readme/openapi-parser', async () => {
    const result = await validate(structuredClone(document) as never);
    expect(result.valid, result.valid ? '' : compileErrors(result)).toBe(true);
    expect(result.specification).toBe('OpenAPI');
  });

  it('has every named schema in components.schemas, each used, and no dangling $ref', () => {
    const names = Object.keys(document.components.schemas);
    expect(names.length).toBeGreaterThan(10);
    const refs = refsIn(document);
    expect(refs.length).toBeGreaterThan(names.length);
    expect(refs.filter((ref) => resolvePointer(document, ref) === undefined)).toEqual([]);
    const used = new Set(refs.map((ref) => ref.replace('#/components/schemas/', '')));
    expect(names.filter((name) => !used.has(name))).toEqual([]);
  });

  it('documents the run event stream as text/event-stream, and its errors as JSON', () => {
    const { responses } = operationsOf(document).find(({ operation }) => operation.operationId === 'stream_run_events')!.operation;
    expect(Object.keys(responses['200']!.content ?? {})).toEqual(['text/event-stream']);
    for (const status of ['404', '410', '503']) expect(Object.keys(responses[status]!.content ?? {})).toEqual(['application/json']);
  });

  it('documents each answer that is no JSON with the media type it goes out with: a file as bytes, text as text, metrics; their errors as JSON', () => {
    const mediaTypes = (operationId: string, status: string) => Object.keys(operationsOf(document).find(({ operation }) => operation.operationId === operationId)!.operation.responses[status]!.content ?? {});
    expect(mediaTypes('download_knowledge_entry', '200')).toEqual(['application/octet-stream']);
    expect(mediaTypes('get_knowledge_entry_content', '200')).toEqual(['text/plain']);
    expect(mediaTypes('metrics', '200')).toEqual(['text/plain']);
    for (const [operationId, status] of [['download_knowledge_entry', '404'], ['get_knowledge_entry_content', '409'], ['metrics', '401']]) expect(mediaTypes(operationId!, status!)).toEqual(['application/json']);
  });

  it('documents 413 on every operation that takes a body, in the shape of its other errors', () => {
    const withBody = operationsOf(document).filter(({ operation }) => (operation as { requestBody?: unknown }).requestBody);
    expect(withBody.length).toBeGreaterThan(20);
    for (const { operation } of withBody) {
      const { responses } = operation;
      expect(responses['413'], operation.operationId).toBeDefined();
      if (responses['401']) expect(responses['413']!.content, operation.operationId).toEqual(responses['401'].content);
    }
    const chat = operationsOf(document).find(({ operation }) => operation.operationId === 'openai_create_chat_completion')!.operation;
    expect(JSON.stringify(chat.responses['413']!.content)).not.toContain('HTTPError');
  });

  it('types query parameters as what they hold: limit and offset integers with their defaults, include_disabled a boolean', () => {
    const parameter = (operationId: string, name: string) =>
      (operationsOf(document).find(({ operation }) => operation.operationId === operationId)!.operation as unknown as { parameters: { name: string; schema: Record<string, unknown> }[] }).parameters.find((p) => p.name === name)!.schema;
    expect(parameter('list_models', 'include_disabled')).toMatchObject({ type: 'boolean', default: false });
    expect(parameter('list_models', 'limit')).toMatchObject({ type: 'integer', default: 20, minimum: 1, maximum: 100 });
    expect(parameter('list_projects', 'offset')).toMatchObject({ type: 'integer', default: 0, minimum: 0 });
    expect(parameter('stream_run_events', 'after')).toMatchObject({ type: 'integer', minimum: 0 });
  });

  it('documents a chat completion as JSON or, streamed, as text/event-stream', () => {
    const { responses } = operationsOf(document).find(({ operation }) => operation.operationId === 'openai_create_chat_completion')!.operation;
    expect(Object.keys(responses['200']!.content ?? {})).toEqual(['application/json', 'text/event-stream']);
  });

  it('gives every operation a success response whose schema resolves', () => {
    const missing: string[] = [];
    for (const { path, method, operation } of operationsOf(document)) {
      const success = Object.entries(operation.responses).filter(([status]) => /^2\d\d$/.test(status));
      const schemas = success.flatMap(([, response]) => Object.values(response.content ?? {}).map((media) => media.schema));
      const resolved = schemas.map((schema) => {
        const ref = (schema as { $ref?: string } | undefined)?.$ref;
        return ref ? resolvePointer(document, ref) : schema;
      });
      if (!resolved.length || resolved.some((schema) => !schema)) missing.push(`${method.toUpperCase()} ${path}`);
      for (const [status, response] of Object.entries(operation.responses)) {
        expect(response.description, `${operation.operationId} ${status}`).not.toBe('Default Response');
      }
    }
    expect(missing).toEqual([]);
    const getProject = document.paths['/api/v1/projects/{project_id}']!.get!.responses['200']!.content!['application/json']!.schema;
    expect(getProject).toEqual({ $ref: '#/components/schemas/ProjectPublic' });
    expect(Object.keys(document.components.schemas.ProjectPublic!.properties!).sort()).toEqual(
      ['created_at', 'description', 'id', 'name', 'owner_id', 'updated_at'],
    );
  });

  it("documents login's form body (application/x-www-form-urlencoded)", () => {
    const body = document.paths['/api/v1/login/access-token']!.post!.requestBody!;
    expect(Object.keys(body.content)).toEqual(['application/x-www-form-urlencoded']);
    const schema = resolvePointer(document, (body.content['application/x-www-form-urlencoded']!.schema as { $ref: string }).$ref) as {
      properties: Record<string, unknown>;
      required: string[];
    };
    expect(schema.required).toEqual(['username', 'password']);
    expect(Object.keys(schema.properties)).toEqual(expect.arrayContaining(['username', 'password', 'grant_type']));
  });

  it("names a relative server, whatever Host and X-Forwarded-* headers say (right behind a proxy)", async () => {
    expect(document.servers).toEqual([{ url: '/', description: 'This server' }]);
    const proxied = await ctx.app.inject({
      method: 'GET',
      url: '/api/v1/openapi.json',
      headers: { host: 'api.example.com', 'x-forwarded-proto': 'https', 'x-forwarded-host': 'evil.example' },
    });
    expect(proxied.json<OpenApiDocument>().servers).toEqual(document.servers);
  });

  it('says `security: []` on the public routes, and every other route answers 401 without credentials', async () => {
    expect(document.security).toEqual([{ bearer: [] }, { apiKey: [] }]);
    const wrong: string[] = [];
    for (const { path, method, operation } of operationsOf(document)) {
      const isPublic = PUBLIC_OPERATIONS.includes(operation.operationId);
      const response = await ctx.app.inject({ method: method.toUpperCase() as 'GET', url: concrete(path) });
      const where = `${operation.operationId}: ${response.statusCode}, security ${JSON.stringify(operation.security)}`;
      if (isPublic && (response.statusCode === 401 || JSON.stringify(operation.security) !== '[]')) wrong.push(where);
      if (!isPublic && (response.statusCode !== 401 || operation.security !== undefined)) wrong.push(where);
    }
    expect(wrong).toEqual([]);
    const documented = operationsOf(document).map(({ operation }) => operation.operationId);
    expect(documented).toEqual(expect.arrayContaining(PUBLIC_OPERATIONS));
  });
});

describe('the /docs page', () => {
  it('answers every /docs route without a 5xx; the plugin serves the same document as JSON and YAML', async () => {
    const docsRoutes = servedRoutes(ctx.app).filter((route) => route.startsWith('GET /docs'));
    expect(docsRoutes.length).toBeGreaterThanOrEqual(4);
    for (const route of docsRoutes) {
      const response = await ctx.app.inject({ method: 'GET', url: route.slice(4) });
      expect(response.statusCode, route).toBeLessThan(400);
    }
    const json = await ctx.app.inject({ method: 'GET', url: '/docs/openapi.json' });
    expect(json.statusCode).toBe(200);
    expect(json.json<OpenApiDocument>().paths).toEqual(document.paths);
    const yaml = await ctx.app.inject({ method: 'GET', url: '/docs/openapi.yaml' });
    expect(yaml.statusCode).toBe(200);
    expect(yaml.body).toContain('ProjectPublic:');
  });

  it('loads only its own script and the document by a relative URL: no third-party host, nothing embedded', async () => {
    const page = await ctx.app.inject({ method: 'GET', url: '/docs/' });
    expect(page.statusCode).toBe(200);
    expect(page.body).not.toMatch(/https?:\/\//);
    expect(page.body).toContain('<script src="js/scalar.js">');
    expect(page.body).toContain('"url": "./openapi.json"');
    expect(page.body).not.toContain('"paths"');
    expect(page.body).toContain('"agent": {\n');
    expect(page.body).toMatch(/"disabled": true/);
    expect(page.body).toMatch(/"telemetry": false/);
    // The CSP lets the page use this origin only.
    const csp = String(page.headers['content-security-policy']);
    for (const directive of ['default-src', 'script-src', 'style-src', 'img-src', 'font-src', 'connect-src']) {
      const sources = new RegExp(`(?:^|;)${directive} ([^;]*)`).exec(csp)?.[1]?.split(' ') ?? [];
      expect(sources.length, directive).toBeGreaterThan(0);
      expect(sources.filter((source) => /^(https?:|\*|wss?:)/.test(source)), directive).toEqual([]);
    }
  });
});

describe('HTTP methods', () => {
  const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const;

  it('answers a wrong method on any existing path with 405 and Allow listing that path\'s methods', async () => {
    const routes = servedRoutes(ctx.app)
      .map((route) => route.split(' ') as [string, string])
      .filter(([, path]) => path !== '*' && path !== '/*');
    // A route pattern as a regular expression over concrete paths (`:name` is one segment).
    const matcher = (path: string) => new RegExp(`^${path.replace(/:\w+/g, '[^/]+')}/?$`);
    const patterns = routes.map(([method, path]) => ({ method, match: matcher(path) }));
    const paths = [...new Set(routes.map(([, path]) => path))];
    expect(paths.length).toBeGreaterThan(10);
    const wrong: string[] = [];
    // /v1 authenticates first, then answers OpenAI's error object.
    const { headers } = await createUser(ctx.app);
    for (const path of paths) {
      const openAI = path.startsWith('/v1/');
      const url = path.replace(/:(\w+)/g, (_, name: string) => (name === 'email' ? 'nobody%40keel.test' : '00000000-0000-4000-8000-000000000000'));
      // The methods some route answers at this URL (`/users/signup` is also `/users/:user_id`).
      const served = new Set(patterns.filter(({ match }) => match.test(url)).map(({ method }) => method));
      const allow = [...served].sort().join(', ');
      for (const method of METHODS.filter((m) => !served.has(m))) {
        const response = await ctx.app.inject({ method, url, headers: openAI ? headers : {} });
        const body = response.json<{ detail?: string; error?: { code: string } }>();
        const shaped = openAI ? body.error?.code === 'method_not_allowed' : body.detail === 'Method Not Allowed';
        const ok = response.statusCode === 405 && response.headers.allow === allow && shaped;
        if (!ok) wrong.push(`${method} ${path}: ${response.statusCode} allow=${String(response.headers.allow)} (want ${allow})`);
      }
    }
    expect(wrong).toEqual([]);
  });

  it('answers OPTIONS without CORS with 405 and Allow (as FastAPI does)', async () => {
    const response = await ctx.app.inject({ method: 'OPTIONS', url: '/api/v1/projects/00000000-0000-4000-8000-000000000000' });
    expect(response.statusCode).toBe(405);
    expect(response.headers.allow).toBe('DELETE, GET, HEAD, PATCH');
    expect(response.json()).toEqual({ detail: 'Method Not Allowed' });
    expect(response.headers['access-control-allow-origin']).toBeUndefined();
  });

  it('keeps 404 for unknown paths, whatever the method', async () => {
    for (const method of METHODS) {
      const response = await ctx.app.inject({ method, url: `/api/v1/nothing-here/${routePath('x/')}` });
      expect(response.statusCode, method).toBe(404);
      expect(response.headers.allow, method).toBeUndefined();
      if (method !== 'HEAD') expect(response.json(), method).toEqual({ detail: 'Not Found' });
    }
  });
});

describe('CORS preflight', () => {
  const origin = 'http://localhost:5173';
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp(ctx.database, { BACKEND_CORS_ORIGINS: origin });
  });
  afterAll(async () => {
    await app?.close();
  });

  it('allows every method the API has and the headers it reads, and exposes x-request-id and retry-after', async () => {
    const served = new Set(servedRoutes(app).map((route) => route.split(' ')[0]!));
    expect(CORS_METHODS).toEqual(expect.arrayContaining([...served]));
    for (const method of ['DELETE', 'PATCH', 'PUT']) {
      const response = await app.inject({
        method: 'OPTIONS',
        url: '/api/v1/projects/00000000-0000-4000-8000-000000000000',
        headers: { origin, 'access-control-request-method': method, 'access-control-request-headers': 'authorization,content-type,x-api-key,x-request-id' },
      });
      expect(response.statusCode, method).toBe(204);
      expect(response.headers['access-control-allow-origin']).toBe(origin);
      expect(String(response.headers['access-control-allow-methods']).split(', ')).toEqual(CORS_METHODS);
      expect(String(response.headers['access-control-allow-headers']).split(', ')).toEqual(CORS_ALLOWED_HEADERS);
    }
    const answer = await app.inject({ method: 'GET', url: '/health', headers: { origin } });
    expect(String(answer.headers['access-control-expose-headers']).split(', ')).toEqual(CORS_EXPOSED_HEADERS);
  });

  it("lets the official openai client's requests through from a browser: every header it sends is allowed, the ones it reads exposed", async () => {
    // What the client sends, caught at its fetch (the headers of a browser build are the same names).
    const sent = new Set<string>();
    const client = new OpenAI({
      apiKey: 'sk-test',
      baseURL: 'http://keel.test/v1',
      maxRetries: 0,
      fetch: (_url: string | URL | Request, init?: RequestInit) => {
        for (const name of new Headers(init?.headers).keys()) sent.add(name);
        return Promise.resolve(new Response(JSON.stringify({ object: 'list', data: [] }), { headers: { 'content-type': 'application/json' } }));
      },
    });
    await client.models.list();
    await client.chat.completions.create({ model: 'm', messages: [] }).catch(() => undefined);
    client.chat.completions.stream({ model: 'm', messages: [] }).on('error', () => undefined);
    await new Promise((resolve) => setTimeout(resolve, 10));
    const custom = [...sent].filter((name) => !['accept', 'content-type', 'content-length', 'user-agent'].includes(name));
    expect(custom).toEqual(expect.arrayContaining(['authorization', 'x-stainless-os', 'x-stainless-retry-count', 'x-stainless-helper-method']));
    const response = await app.inject({
      method: 'OPTIONS',
      url: '/v1/chat/completions',
      headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': custom.join(',') },
    });
    expect(response.statusCode).toBe(204);
    const allowed = String(response.headers['access-control-allow-headers']).split(', ');
    expect(allowed).toEqual(expect.arrayContaining(custom));
    // The client reads these of an answer to decide whether and when to retry.
    expect(CORS_EXPOSED_HEADERS).toEqual(expect.arrayContaining(['x-request-id', 'retry-after', 'x-should-retry']));
  });

  it('lets a page resume a run\'s events with Last-Event-ID, and read where a creation went and a download\'s name', async () => {
    // A fetch-based SSE reader sends Last-Event-ID itself (SPEC §5), so its preflight names it.
    const preflight = await app.inject({
      method: 'OPTIONS',
      url: '/api/v1/runs/00000000-0000-4000-8000-000000000000/events',
      headers: { origin, 'access-control-request-method': 'GET', 'access-control-request-headers': 'authorization,last-event-id' },
    });
    expect(preflight.statusCode).toBe(204);
    expect(String(preflight.headers['access-control-allow-headers']).split(', ')).toEqual(expect.arrayContaining(['authorization', 'last-event-id']));
    // Creations carry Location (SPEC §2), downloads their file's name, `agent:` completions their thread and run.
    const answer = await app.inject({ method: 'GET', url: '/health', headers: { origin } });
    const exposed = String(answer.headers['access-control-expose-headers']).split(', ');
    expect(exposed).toEqual(expect.arrayContaining(['location', 'content-disposition', 'x-keel-thread-id', 'x-keel-run-id']));
  });

  it('gives a refused origin no CORS headers (a plain 405)', async () => {
    const response = await app.inject({
      method: 'OPTIONS',
      url: '/api/v1/projects',
      headers: { origin: 'http://evil.example', 'access-control-request-method': 'DELETE' },
    });
    expect(response.statusCode).toBe(405);
    expect(response.headers['access-control-allow-origin']).toBeUndefined();
    expect(response.headers['access-control-allow-methods']).toBeUndefined();
  });
});
