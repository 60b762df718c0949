import { STATUS_CODES } from 'node:http';

import swagger from '@fastify/swagger';
import type { FastifyInstance } from 'fastify';
import { jsonSchemaTransform, jsonSchemaTransformObject } from 'fastify-type-provider-zod';

import { API_PREFIX } from '../api/main.js';
import type { Settings } from './config.js';

/** Where the document is published (the FastAPI template's address) and where its reference page lives. */
export const OPENAPI_PATH = `${API_PREFIX}/openapi.json`;
export const DOCS_PREFIX = '/docs';

/**
 * The OpenAPI 3.1 document. Register before the routes: @fastify/swagger collects them as they
 * are added. Each route's Zod schemas become JSON Schema (`jsonSchemaTransform`, which writes a
 * `$ref` for every schema with `.meta({ id })`), and the object transform puts those named
 * schemas into `components.schemas` so every `$ref` resolves (request bodies get an `…Input`
 * variant when their input and output shapes differ).
 *
 * `servers` is the relative URL `/`: clients resolve it against the address they fetched the
 * document from, so it is right behind any proxy that serves Keel at a host's root (whatever the
 * host name or scheme) without trusting `Host` or `X-Forwarded-*` headers, and the document stays
 * the same for every caller (cacheable). The paths in it are absolute (`/api/v1/...`, `/health`).
 */
export async function registerOpenApi(app: FastifyInstance, settings: Settings): Promise<void> {
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: settings.PROJECT_NAME,
        version: '0.1.0',
        description: `Keel: accounts, projects and API keys for AI-agent products.\n\n[Download this OpenAPI document](${OPENAPI_PATH}).`,
      },
      servers: [{ url: '/', description: 'This server' }],
      components: {
        securitySchemes: {
          bearer: { type: 'http', scheme: 'bearer', description: 'An access token or an API key' },
          apiKey: { type: 'apiKey', in: 'header', name: 'X-API-Key', description: 'An API key only (an access token goes in Authorization: Bearer)' },
          metricsToken: { type: 'http', scheme: 'bearer', description: 'METRICS_TOKEN (GET /metrics, when it is set)' },
        },
      },
      // Routes that need no credentials say `security: []` in their schema.
      security: [{ bearer: [] }, { apiKey: [] }],
    },
    transform: (input) => withFormBody(jsonSchemaTransform(input), input.schema.form),
    transformObject: (document) => describeResponses(documentBodyLimit(keepUsedSchemas(jsonSchemaTransformObject(document)))),
  });
}

declare module 'fastify' {
  interface FastifySchema {
    /**
     * A `multipart/form-data` body the handler reads itself (a file upload, streamed): its file
     * fields by name, with their descriptions. For the OpenAPI document only — nothing validates it.
     */
    form?: Record<string, string>;
  }
}

/** The route's document with its form as the request body (`consumes` names the media type). */
function withFormBody<T extends { schema: object }>(transformed: T, form: Record<string, string> | undefined): T {
  if (!form) return transformed;
  const { form: _form, ...schema } = transformed.schema as { form?: unknown };
  const properties = Object.fromEntries(Object.entries(form).map(([name, description]) => [name, { type: 'string', format: 'binary', description }]));
  return { ...transformed, schema: { ...schema, body: { type: 'object', required: Object.keys(form), properties } } };
}

interface DocumentedOperation {
  requestBody?: unknown;
  responses?: Record<string, { description?: string; content?: unknown }>;
}

/** Every operation of the document (each method of each path). */
function operationsOf(document: object): DocumentedOperation[] {
  const paths = (document as { paths?: Record<string, Record<string, DocumentedOperation>> }).paths ?? {};
  return Object.values(paths).flatMap((item) => Object.values(item));
}

/**
 * Every operation that takes a body answers 413 past its limit (BODY_LIMIT_BYTES, the gateway's
 * GATEWAY_BODY_LIMIT_BYTES, an upload's own): documented where a route does not say it itself, in
 * the shape of the operation's 401 (`{detail}`, or OpenAI's error object under /v1), so that a
 * generated client knows the answer.
 */
function documentBodyLimit<T extends object>(document: T): T {
  for (const operation of operationsOf(document)) {
    const responses = operation.responses;
    if (!operation.requestBody || !responses || responses['413']) continue;
    // A copy: one object in two places is written as a YAML alias (&a/*a), which some parsers cap.
    const content = structuredClone(responses['401']?.content) ?? { 'application/json': { schema: { $ref: `${SCHEMA_REF}HTTPError` } } };
    responses['413'] = { description: 'Request body too large', content };
  }
  return document;
}

/** @fastify/swagger calls every response "Default Response"; say what the status means instead (as FastAPI does). */
function describeResponses<T extends object>(document: T): T {
  for (const operation of operationsOf(document)) {
    for (const [status, response] of Object.entries(operation.responses ?? {})) {
      if (response.description !== 'Default Response') continue;
      response.description = status.startsWith('2') ? 'Successful Response' : status === '422' ? 'Validation Error' : (STATUS_CODES[status] ?? 'Response');
    }
  }
  return document;
}

const SCHEMA_REF = '#/components/schemas/';
const INPUT_SUFFIX = 'Input';

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** Calls `visit` with every `$ref` string in `value` and replaces each with what it returns. */
function mapRefs(value: Json, visit: (ref: string) => string): Json {
  if (Array.isArray(value)) return value.map((item) => mapRefs(item, visit));
  if (value === null || typeof value !== 'object') return value;
  const result: Record<string, Json> = {};
  for (const [key, child] of Object.entries(value)) {
    result[key] = key === '$ref' && typeof child === 'string' ? visit(child) : mapRefs(child, visit);
  }
  return result;
}

/**
 * The object transform writes every named schema twice, as read (`XInput`) and as written (`X`),
 * used or not. Keep the ones the operations reach, and drop the `Input` suffix where only the
 * input form is used (so a request body is `ProjectCreate`, not `ProjectCreateInput`).
 */
export function keepUsedSchemas<T extends object>(document: T): T {
  const doc = document as unknown as { paths?: Json; components?: { schemas?: Record<string, Json> } };
  const schemas = doc.components?.schemas ?? {};
  const used = new Set<string>();
  const reach = (value: Json | undefined) =>
    mapRefs(value ?? null, (ref) => {
      const name = ref.startsWith(SCHEMA_REF) ? ref.slice(SCHEMA_REF.length) : null;
      if (name !== null && !used.has(name) && name in schemas) {
        used.add(name);
        reach(schemas[name]);
      }
      return ref;
    });
  reach(doc.paths);
  const rename = (name: string) =>
    name.endsWith(INPUT_SUFFIX) && !used.has(name.slice(0, -INPUT_SUFFIX.length)) ? name.slice(0, -INPUT_SUFFIX.length) : name;
  const renameRef = (ref: string) => (ref.startsWith(SCHEMA_REF) ? SCHEMA_REF + rename(ref.slice(SCHEMA_REF.length)) : ref);
  const kept: Record<string, Json> = {};
  for (const name of [...used].sort((a, b) => rename(a).localeCompare(rename(b)))) kept[rename(name)] = mapRefs(schemas[name] ?? null, renameRef);
  return {
    ...document,
    paths: mapRefs(doc.paths ?? {}, renameRef),
    components: { ...doc.components, schemas: kept },
  };
}

/**
 * The document at {@link OPENAPI_PATH} and the Scalar reference at {@link DOCS_PREFIX}, set up for
 * a self-hosted (possibly offline) API: the page loads only its own script and the document from
 * this server; no AI agent, no request proxy, no telemetry, no developer toolbar (whose "share"
 * uploads to Scalar's registry), no web fonts. The plugin's own `/docs/openapi.json` and
 * `/docs/openapi.yaml` serve the same document (the page fetches the JSON one, by a relative URL,
 * so it also works behind a proxy); the HTML does not embed it.
 *
 * The plugin (its 3.5 MB script, an OpenAPI parser: ~12 MB and ~0.15 s of CPU) is loaded when the
 * page is first asked for, not at start-up: these routes hand each request to a small Fastify
 * instance of its own that it is registered on, made then, and answer with what it answers. The
 * API's hooks (security headers, CORS, the access log) and error handler apply as to any route.
 */
export async function registerDocs(app: FastifyInstance): Promise<void> {
  app.get(OPENAPI_PATH, { schema: { hide: true } }, async () => app.swagger());
  const reference = referenceApp(app);
  for (const path of DOCS_ROUTES) {
    app.get(`${DOCS_PREFIX}${path}`, { schema: { hide: true } }, async (request, reply) => {
      const answer = await (await reference()).inject({ method: 'GET', url: request.url, headers: { host: request.headers.host ?? 'localhost' } });
      if (answer.statusCode >= 500) throw new Error(`API reference answered ${answer.statusCode}: ${answer.body.slice(0, 200)}`);
      for (const [name, value] of Object.entries(answer.headers)) {
        if (value !== undefined && !HOP_HEADERS.has(name)) void reply.header(name, value);
      }
      // A redirect has no body (and so no content type).
      return reply.code(answer.statusCode).send(answer.rawPayload.length ? answer.rawPayload : undefined);
    });
  }
}

/** The routes @scalar/fastify-api-reference registers under its prefix (trailing slashes ignored). */
const DOCS_ROUTES = ['/', '/js/scalar.js', '/openapi.json', '/openapi.yaml'];

/** Headers of the inner answer that describe its own connection, not the content. */
const HOP_HEADERS = new Set(['content-length', 'connection', 'keep-alive', 'date', 'transfer-encoding']);

/** The Fastify instance the Scalar plugin runs in, made on first use (again after a failure). */
function referenceApp(app: FastifyInstance): () => Promise<FastifyInstance> {
  let made: Promise<FastifyInstance> | null = null;
  const make = async () => {
    const [{ default: scalar }, { default: Fastify }] = await Promise.all([import('@scalar/fastify-api-reference'), import('fastify')]);
    const inner = Fastify({ routerOptions: { ignoreTrailingSlash: true } });
    await inner.register(scalar, {
      routePrefix: DOCS_PREFIX,
      configuration: {
        pageTitle: `${app.settings.PROJECT_NAME} API reference`,
        content: () => app.swagger() as unknown as Record<string, unknown>,
        agent: { disabled: true },
        telemetry: false,
        showDeveloperTools: 'never',
        hideClientButton: true,
        withDefaultFonts: false,
        documentDownloadType: 'both',
        favicon: 'data:,',
      },
    });
    await inner.ready();
    return inner;
  };
  app.addHook('onClose', async () => {
    const inner = await made?.catch(() => null);
    await inner?.close();
  });
  return () => {
    made ??= make().catch((error: unknown) => {
      made = null;
      throw error;
    });
    return made;
  };
}
