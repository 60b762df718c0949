/**
 * Keel as its own model provider (core/hop.ts): a provider record whose base_url is this
 * deployment's /v1, with one of its API keys, made one call recurse without bound. Every request
 * to a provider carries the deployment's hop mark, and a request that comes in with it is refused
 * (400 `upstream_loop`) before authentication, metering or a model call: one call, one nested
 * request. Another deployment's mark is served as any request is.
 */
import { randomBytes } from 'node:crypto';

import { count } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { describe, expect, it } from 'vitest';

import { UpstreamLoopError } from '../../src/core/errors.js';
import { HOP_HEADER, hopMark, MAX_HOPS } from '../../src/core/hop.js';

import { usageRecords } from '../../src/models/index.js';

import type { ModelOverride } from '../../src/modules/ai-models/types.js';
import type { OpenAIErrorBody } from '../../src/services/openai-gateway.js';
import { useTestApp } from '../helpers/app.js';
import { listen } from '../helpers/browser.js';
import { superuserHeaders } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { call } from '../helpers/http.js';
import { fakeModelManager, MANAGER_SECRET_KEY, useFakeManagerServer } from '../helpers/model-manager.js';

const pricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' };
const hello = [{ role: 'user' as const, content: 'Hello' }];
const UpstreamLoopMessage = new UpstreamLoopError().detail;
const errorOf = (body: string) => (JSON.parse(body) as OpenAIErrorBody).error;

/** Runs `test` with `real-model` in `app` on a provider record at a fake model server of its own. */
async function withRealModel(app: FastifyInstance, test: (fake: FakeModelServer, admin: Record<string, string>) => Promise<void>): Promise<void> {
  const fake = await FakeModelServer.start();
  try {
    const admin = await superuserHeaders(app);
    expect((await call(app, 'POST', '/providers', admin, { name: 'real', kind: 'openai-compatible', base_url: fake.url })).statusCode).toBe(200);
    expect((await call(app, 'POST', '/models', admin, { id: 'real-model', provider: 'real', pricing })).statusCode).toBe(200);
    await test(fake, admin);
  } finally {
    await fake.close();
  }
}

/** Requests that reach `app`'s server, by path. */
function countRequests(app: FastifyInstance): Map<string, number> {
  const seen = new Map<string, number>();
  app.server.on('request', (request: { url?: string }) => {
    const path = (request.url ?? '').split('?', 1)[0]!;
    seen.set(path, (seen.get(path) ?? 0) + 1);
  });
  return seen;
}

describe('requests to providers', () => {
  const fake = useFakeManagerServer();
  const MODELS: ModelOverride[] = [
    { id: 'hop-wire', provider: 'fake', capabilities: ['chat'], pricing },
    { id: 'hop-wire-embed', provider: 'fake', capabilities: ['embedding'], pricing },
    { id: 'hop-openai', provider: 'oai', capabilities: ['chat'], pricing },
    { id: 'hop-claude', provider: 'ant', capabilities: ['chat'], pricing },
    { id: 'hop-gemini', provider: 'gem', capabilities: ['chat'], pricing },
    { id: 'hop-gemini-embed', provider: 'gem', capabilities: ['embedding'], pricing },
  ];

  it.each([
    ['the deployment\'s hop mark', undefined],
    ['the marks the call came with, then the deployment\'s', ['another-deployment-mark', 'and-a-third']],
  ])('carry %s on every path: the wire and the SDK\'s, chat, stream and embeddings, of every kind', async (_, hops) => {
    const m = fakeModelManager(fake.server, {
      models: MODELS,
      records: fake.records,
      providers: [
        // A record's own x-keel- header cannot be stored (schemas/provider.ts); were one there, the mark goes last all the same.
        { id: 'oai', kind: 'openai', base_url: fake.server.url, api_key: 'sk-oai-test', headers: { [HOP_HEADER]: 'from-the-record' } },
        { id: 'ant', kind: 'anthropic', base_url: fake.server.url, api_key: 'sk-ant-test' },
        { id: 'gem', kind: 'google', base_url: fake.server.url, api_key: 'g-key-test' },
      ],
      overrides: { maxRetries: 0 },
    });
    try {
      const streamed = async (model: string) => {
        for await (const event of m.stream({ model, messages: hello, hops })) void event;
      };
      for (const model of ['hop-wire', 'hop-openai', 'hop-claude', 'hop-gemini']) {
        await m.chat({ model, messages: hello, hops });
        await streamed(model);
      }
      // Provider options take an openai-compatible call off the wire, to the SDK's provider.
      await m.chat({ model: 'hop-wire', messages: hello, providerOptions: { fake: { user: 'someone' } }, hops });
      await m.embed({ model: 'hop-wire-embed', values: ['hello'], hops });
      await m.embed({ model: 'hop-gemini-embed', values: ['hello'], hops });
    } finally {
      await m.close();
    }
    const sent = fake.server.log.map((r) => [r.path, r.headers[HOP_HEADER]]);
    expect(sent).toHaveLength(11);
    expect(sent).toEqual(sent.map(([path]) => [path, [...(hops ?? []), hopMark(MANAGER_SECRET_KEY)].join(',')]));
    // A mark of 22 characters that says nothing of the key; another key, another deployment's mark.
    expect(hopMark(MANAGER_SECRET_KEY)).toMatch(/^[\w-]{22}$/);
    expect(hopMark(MANAGER_SECRET_KEY)).not.toContain(MANAGER_SECRET_KEY.slice(0, 8));
    expect(hopMark(`${MANAGER_SECRET_KEY}-elsewhere`)).not.toBe(hopMark(MANAGER_SECRET_KEY));
  });
});

describe('a provider record that points at Keel itself', () => {
  // Retries on (the default): a refused hop must not be tried again.
  const ctx = useTestApp({ MODEL_MAX_RETRIES: '2', MODEL_RETRY_MAX_WAIT_MS: '100' });
  const v1Chat = (headers: Record<string, string>, payload: object) => ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers, payload });

  it('answers one call with the loop named after exactly one nested request: chat, stream, embeddings and an agent on such a model', async () => {
    const origin = await listen(ctx.app);
    const seen = countRequests(ctx.app);
    const admin = await superuserHeaders(ctx.app);
    const key = (await call(ctx.app, 'POST', '/api-keys', admin, { name: 'loop' })).json<{ key: string }>();
    const provider = await call(ctx.app, 'POST', '/providers', admin, { name: 'self', kind: 'openai-compatible', base_url: `${origin}/v1`, api_key: key.key });
    expect(provider.statusCode, provider.body).toBe(200);
    for (const model of [
      { id: 'loop', provider: 'self', pricing },
      { id: 'loop-embed', provider: 'self', capabilities: ['embedding'], pricing },
    ]) {
      const created = await call(ctx.app, 'POST', '/models', admin, model);
      expect(created.statusCode, created.body).toBe(200);
    }
    const post = async (path: string, body: unknown) => {
      const response = await fetch(`${origin}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...admin }, body: JSON.stringify(body), signal: AbortSignal.timeout(30_000) });
      return { status: response.status, text: await response.text() };
    };

    const answered = await post('/v1/chat/completions', { model: 'loop', messages: hello });
    expect(seen.get('/v1/chat/completions')).toBe(2);
    expect(answered.status).toBe(400);
    expect(errorOf(answered.text).code).toBe('upstream_loop');
    expect(errorOf(answered.text).message).toContain('Loop detected');

    const streamed = await post('/v1/chat/completions', { model: 'loop', messages: hello, stream: true });
    expect(seen.get('/v1/chat/completions')).toBe(4);
    expect(streamed.text).toContain('upstream_loop');

    const embedded = await post('/v1/embeddings', { model: 'loop-embed', input: 'hello' });
    expect(seen.get('/v1/embeddings')).toBe(2);
    expect([embedded.status, errorOf(embedded.text).code]).toEqual([400, 'upstream_loop']);

    // An agent on it: its run's model call is the nested request, refused; the run fails saying why.
    const agent = await call(ctx.app, 'POST', '/agents', admin, { name: 'Loop agent', model: 'loop' });
    expect(agent.statusCode, agent.body).toBe(200);
    const run = await post('/v1/chat/completions', { model: `agent:${agent.json<{ id: string }>().id}`, messages: hello });
    expect(seen.get('/v1/chat/completions')).toBe(6);
    expect(run.status).toBeGreaterThanOrEqual(400);
    expect(run.text).toContain('Loop detected');
  }, 60_000);

  it('refuses a request with this deployment\'s mark on any route, before authentication and metering; serves another deployment\'s', async () => {
    await withRealModel(ctx.app, async (fake, admin) => {
      const [before] = await ctx.database.db.select({ value: count() }).from(usageRecords);
      const ownMark = { [HOP_HEADER]: hopMark(ctx.app.settings.SECRET_KEY) };
      const chat = { model: 'real-model', messages: hello };

      const refused = await v1Chat({ ...admin, ...ownMark }, chat);
      expect(refused.statusCode).toBe(400);
      expect(errorOf(refused.body)).toEqual({ message: UpstreamLoopMessage, type: 'invalid_request_error', param: null, code: 'upstream_loop' });
      // Without credentials too: the mark is checked first.
      expect((await v1Chat(ownMark, chat)).json()).toMatchObject({ error: { code: 'upstream_loop' } });
      // Joined with another deployment's by a proxy: still this one's.
      expect((await v1Chat({ ...admin, [HOP_HEADER]: `${hopMark('another-deployment-secret-key-000000')}, ${ownMark[HOP_HEADER]}` }, chat)).statusCode).toBe(400);
      // The API's own routes (runs, threads: an agent's model could lead there) answer in their shape.
      const api = await call(ctx.app, 'GET', '/users/me', { ...admin, ...ownMark });
      expect([api.statusCode, api.json<{ detail: string }>().detail]).toEqual([400, expect.stringContaining('Loop detected')]);
      expect(fake.log).toHaveLength(0);
      const [after] = await ctx.database.db.select({ value: count() }).from(usageRecords);
      expect(after).toEqual(before);

      // What another deployment (another SECRET_KEY) sends its providers: served as any call is.
      const served = await v1Chat({ ...admin, [HOP_HEADER]: hopMark('another-deployment-secret-key-000000') }, chat);
      expect(served.statusCode, served.body).toBe(200);
      expect(fake.log).toHaveLength(1);
      // And this deployment's mark goes on to its provider after the other's, as on every request it sends one.
      expect(fake.log[0]!.headers[HOP_HEADER]).toBe(`${hopMark('another-deployment-secret-key-000000')},${ownMark[HOP_HEADER]}`);
    });
  });
});

describe('two deployments that are each other\'s provider', () => {
  // Two SECRET_KEYs, two deployments; retries on, as above: a refused hop is not tried again.
  const settings = { MODEL_MAX_RETRIES: '2', MODEL_RETRY_MAX_WAIT_MS: '100' };
  const a = useTestApp({ ...settings, SECRET_KEY: randomBytes(32).toString('hex') });
  const b = useTestApp({ ...settings, SECRET_KEY: randomBytes(32).toString('hex') });

  /** In `app`, a provider at `target` (its /v1, with one of its keys) and a chat and an embedding model on it. */
  async function pointAt(app: FastifyInstance, target: FastifyInstance, targetOrigin: string): Promise<Record<string, string>> {
    const admin = await superuserHeaders(app);
    const key = (await call(target, 'POST', '/api-keys', await superuserHeaders(target), { name: 'peer' })).json<{ key: string }>();
    expect((await call(app, 'POST', '/providers', admin, { name: 'peer', kind: 'openai-compatible', base_url: `${targetOrigin}/v1`, api_key: key.key })).statusCode).toBe(200);
    expect((await call(app, 'POST', '/models', admin, { id: 'ping', provider: 'peer', pricing })).statusCode).toBe(200);
    expect((await call(app, 'POST', '/models', admin, { id: 'ping-embed', provider: 'peer', capabilities: ['embedding'], pricing })).statusCode).toBe(200);
    return admin;
  }

  it('answer one call with the loop named after one request each way: chat, stream and embeddings', async () => {
    const [originA, originB] = [await listen(a.app), await listen(b.app)];
    const [seenA, seenB] = [countRequests(a.app), countRequests(b.app)];
    const admin = await pointAt(a.app, b.app, originB);
    await pointAt(b.app, a.app, originA);
    const post = async (path: string, body: unknown) => {
      const response = await fetch(`${originA}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...admin }, body: JSON.stringify(body), signal: AbortSignal.timeout(30_000) });
      return { status: response.status, text: await response.text() };
    };

    // A → B (A's mark) → A (A's and B's): refused there; B hands the refusal back, not tried again.
    const answered = await post('/v1/chat/completions', { model: 'ping', messages: hello });
    expect([seenA.get('/v1/chat/completions'), seenB.get('/v1/chat/completions')]).toEqual([2, 1]);
    expect(answered.status).toBe(400);
    expect(errorOf(answered.text).code).toBe('upstream_loop');
    expect(errorOf(answered.text).message).toContain('Keel deployments that use each other');

    const streamed = await post('/v1/chat/completions', { model: 'ping', messages: hello, stream: true });
    expect([seenA.get('/v1/chat/completions'), seenB.get('/v1/chat/completions')]).toEqual([4, 2]);
    expect(streamed.text).toContain('upstream_loop');

    const embedded = await post('/v1/embeddings', { model: 'ping-embed', input: 'hello' });
    expect([seenA.get('/v1/embeddings'), seenB.get('/v1/embeddings')]).toEqual([2, 1]);
    expect([embedded.status, errorOf(embedded.text).code]).toEqual([400, 'upstream_loop']);
  }, 60_000);

  it('sends on the marks a request came with, before its own; refuses a chain of MAX_HOPS', async () => {
    await withRealModel(a.app, async (fake, admin) => {
      const own = hopMark(a.app.settings.SECRET_KEY);
      const others = Array.from({ length: MAX_HOPS }, (_, i) => hopMark(`another-deployment-${i}-secret-key-00000000`));
      const chat = (marks: string) => a.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: { ...admin, [HOP_HEADER]: marks }, payload: { model: 'real-model', messages: hello } });

      // Seven others (one repeated, and what is not a mark, dropped): served, sent on with this one's last.
      const served = await chat(`${others.slice(0, 7).join(', ')}, ${others[0]}, not a mark!, ${'x'.repeat(65)}`);
      expect(served.statusCode, served.body).toBe(200);
      expect(fake.log.at(-1)!.headers[HOP_HEADER]).toBe([...others.slice(0, 7), own].join(','));

      // Eight: the chain is too long, whoever is in it.
      const refused = await chat(others.join(','));
      expect(refused.statusCode).toBe(400);
      expect(errorOf(refused.body).code).toBe('upstream_loop');
      expect(errorOf(refused.body).message).toContain(`${MAX_HOPS} of them`);
      expect(fake.log).toHaveLength(1);
    });
  });
});
