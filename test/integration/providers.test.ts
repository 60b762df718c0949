import { eq } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { providers, usageRecords } from '../../src/models/index.js';

import { sealSecret } from '../../src/services/model-sync.js';
import { useTestApp } from '../helpers/app.js';
import { createProject, createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey, expectValidationError, type ListBody, UUID, xApiKey } from '../helpers/http.js';

// Anthropic's key in the settings: a record named `anthropic` stands in for a provider that exists without it.
const ctx = useTestApp({ ANTHROPIC_API_KEY: 'sk-ant-from-settings' });
const api = apiOf(ctx);

interface ProviderBody {
  id: string;
  name: string;
  kind: string;
  base_url: string | null;
  has_api_key: boolean;
  header_names: string[];
  enabled: boolean;
}

const PROVIDER_FIELDS = ['base_url', 'created_at', 'enabled', 'has_api_key', 'header_names', 'id', 'kind', 'name', 'updated_at'];
const API_KEY = 'sk-fake-upstream-secret-0123456789';
const HEADER_VALUE = 'header-secret-value-9876';

let admin: Record<string, string>;
let user: TestUser;
let fake: FakeModelServer;

beforeAll(async () => {
  admin = await superuserHeaders(ctx.app);
  user = await createUser(ctx.app);
  fake = await FakeModelServer.start();
});
afterAll(async () => {
  await fake.close();
});

async function createProvider(body: Record<string, unknown>): Promise<ProviderBody> {
  const response = await api('POST', '/providers', admin, body);
  expect(response.statusCode, response.body).toBe(200);
  return response.json<ProviderBody>();
}

describe('/providers', () => {
  it('is for superusers only: 401, 403 for users and scoped keys', async () => {
    expect((await api('GET', '/providers')).statusCode).toBe(401);
    expect((await api('GET', '/providers', user.headers)).statusCode).toBe(403);
    expect((await api('POST', '/providers', user.headers, { name: 'x', kind: 'openai' })).statusCode).toBe(403);
    const project = await createProject(ctx.app, admin);
    const scoped = await createKey(ctx.app, { headers: admin }, { name: 'scoped', project_id: project.id });
    expect((await api('GET', '/providers', xApiKey(scoped.key))).statusCode).toBe(403);
    const unscoped = await createKey(ctx.app, { headers: admin }, { name: 'admin key' });
    expect((await api('GET', '/providers', xApiKey(unscoped.key))).statusCode).toBe(200);
  });

  it('refuses bad bodies with 422', async () => {
    expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai', token: 'a' }), ['body', 'token'], 'extra_forbidden');
    expectValidationError(await api('POST', '/providers', admin, { name: 'local', kind: 'openai-compatible' }), ['body', 'base_url']);
    expectValidationError(await api('POST', '/providers', admin, { name: 'Bad Name', kind: 'openai' }), ['body', 'name']);
    expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'mistral' }), ['body', 'kind']);
    expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai', base_url: 'ftp://example.com' }), ['body', 'base_url']);
    // What the client would call elsewhere than asked (the API paths are appended as text) or without the credentials given.
    for (const base_url of ['http://127.0.0.1:11434/v1?key=a', 'http://127.0.0.1:11434/v1?', 'http://127.0.0.1:11434/v1#x', 'http://user:pass@127.0.0.1:11434/v1', 'https://:token@example.com/v1']) {
      expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai-compatible', base_url }), ['body', 'base_url']);
    }
    expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai', headers: { 'bad header': 'v' } }), ['body', 'headers', 'bad header']);
    expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai', headers: { 'X-Keel-Answer': 'stream' } }), ['body', 'headers', 'X-Keel-Answer']);
    expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai', headers: { 'x-keel-hop': 'another-mark' } }), ['body', 'headers', 'x-keel-hop']);
    // What would make every call to the provider fail: a value the HTTP client refuses, a header it writes itself, a key that cannot travel in a header.
    for (const value of ['v\r\nX-Injected: 1', 'v\n', 'nul\u0000', 'snow ☃']) {
      expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai', headers: { 'X-A': value } }), ['body', 'headers', 'X-A']);
    }
    for (const name of ['Host', 'content-length', 'Transfer-Encoding', 'Connection', 'Accept-Encoding', 'Content-Encoding', 'Content-Type']) {
      const { detail } = expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai', headers: { [name]: '5' } }), ['body', 'headers', name]);
      // The header name's own rule is told, not Zod's "Invalid key in record".
      expect(detail).toEqual([{ loc: ['body', 'headers', name], msg: 'The HTTP client sets this header itself', type: 'value_error' }]);
    }
    expect(expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai', headers: { 'X Y': 'v' } }), ['body', 'headers', 'X Y']).detail[0]).toMatchObject({ msg: 'Not an HTTP header name', type: 'regex_parsing' });
    // One header twice but for its case: sent as one with both values joined (`Bearer a, Bearer b`) by the SDK's fetch.
    const twice = expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai', headers: { Authorization: 'Bearer a', authorization: 'Bearer b' } }), ['body', 'headers', 'authorization']);
    expect(twice.detail[0]!.msg).toBe('Header names are case-insensitive: this one is given twice');
    expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai', api_key: 'sk-pasted\n' }), ['body', 'api_key']);
    expectValidationError(await api('POST', '/providers', admin, { name: 'x', kind: 'openai', api_key: 'sk two' }), ['body', 'api_key']);
    const kept = await createProvider({ name: 'header-checks', kind: 'openai', headers: { 'X-Tab': 'a\tb', 'X-Latin': 'café' } });
    expectValidationError(await api('PATCH', `/providers/${kept.id}`, admin, { headers: { 'X-A': 'v\r\nX-Injected: 1' } }), ['body', 'headers', 'X-A']);
    expectValidationError(await api('PATCH', `/providers/${kept.id}`, admin, { base_url: 'https://api.example.com/v1?api-version=1' }), ['body', 'base_url']);
    // An openai-compatible provider keeps a base_url, as when created: not removed, not another kind's record turned into one without it.
    expectValidationError(await api('PATCH', `/providers/${kept.id}`, admin, { kind: 'openai-compatible' }), ['body', 'base_url']);
    const local = await createProvider({ name: 'keeps-base-url', kind: 'openai-compatible', base_url: 'http://127.0.0.1:11434/v1' });
    expectValidationError(await api('PATCH', `/providers/${local.id}`, admin, { base_url: null }), ['body', 'base_url']);
    expect((await api('GET', `/providers/${local.id}`, admin)).json<ProviderBody>().base_url).toBe('http://127.0.0.1:11434/v1');
    const moved = await api('PATCH', `/providers/${local.id}`, admin, { kind: 'openai', base_url: null });
    expect(moved.statusCode, moved.body).toBe(200);
    expect((await api('DELETE', `/providers/${local.id}`, admin)).statusCode).toBe(200);
    expect((await api('DELETE', `/providers/${kept.id}`, admin)).statusCode).toBe(200);
  });

  it('keeps the API key and headers sealed: never in an answer, never in clear in the table', async () => {
    const created = await createProvider({ name: 'sealed', kind: 'openai', api_key: API_KEY, headers: { 'X-Org': HEADER_VALUE } });
    expect(Object.keys(created).sort()).toEqual(PROVIDER_FIELDS);
    expect(created).toMatchObject({ name: 'sealed', kind: 'openai', base_url: null, has_api_key: true, header_names: ['X-Org'], enabled: true });
    expect(created.id).toMatch(UUID);

    const answers = [
      await api('GET', '/providers', admin),
      await api('GET', `/providers/${created.id}`, admin),
      await api('PATCH', `/providers/${created.id}`, admin, { enabled: true }),
    ];
    for (const response of answers) {
      expect(response.statusCode).toBe(200);
      expect(response.body).not.toContain(API_KEY);
      expect(response.body).not.toContain(HEADER_VALUE);
    }
    expect(answers[0]!.json<ListBody<ProviderBody>>().data.map((p) => p.name)).toContain('sealed');

    const [row] = await ctx.database.db.select().from(providers).where(eq(providers.id, created.id));
    const stored = JSON.stringify(row);
    expect(stored).not.toContain(API_KEY);
    expect(stored).not.toContain(HEADER_VALUE);
    expect(row!.api_key_sealed).toMatch(/^v1\./);

    // A sealed secret is bound to its row: copied onto another row it does not open. The record
    // says it has a key: its models say that it cannot be opened, not that there is none, and
    // none is called without it (nor without its headers: their Authorization, say).
    const other = await createProvider({ name: 'sealed-copy', kind: 'openai' });
    await ctx.database.db.update(providers).set({ api_key_sealed: row!.api_key_sealed }).where(eq(providers.id, other.id));
    const copied = await api('PATCH', `/providers/${other.id}`, admin, { enabled: false });
    expect(copied.json<ProviderBody>().has_api_key).toBe(true);
    await api('POST', '/models', admin, { id: 'copy-model', provider: 'sealed-copy', pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' } });
    await api('PATCH', `/providers/${other.id}`, admin, { enabled: true });
    const keyUnopened = "Provider sealed-copy's api_key cannot be opened (was SECRET_KEY changed?): set it again";
    expect(ctx.app.models.getModel('copy-model')).toMatchObject({ available: false, unavailable_reason: keyUnopened });
    const call = await ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: admin, payload: { model: 'copy-model', messages: [{ role: 'user', content: 'Hi' }] } });
    expect(call.statusCode).toBe(503);
    expect(call.json()).toMatchObject({ error: { message: keyUnopened, code: 'provider_unavailable' } });

    // Its headers alone (a keyless server behind an Authorization header): the same.
    const keyless = await createProvider({ name: 'sealed-headers', kind: 'openai-compatible', base_url: 'http://127.0.0.1:9/v1' });
    await ctx.database.db.update(providers).set({ headers_sealed: row!.headers_sealed }).where(eq(providers.id, keyless.id));
    await api('POST', '/models', admin, { id: 'copy-headers-model', provider: 'sealed-headers', pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' } });
    expect(ctx.app.models.getModel('copy-headers-model')).toMatchObject({
      available: false,
      unavailable_reason: "Provider sealed-headers's headers cannot be opened (was SECRET_KEY changed?): set them again",
    });
  });

  it('calls a record stored before the header checks without its framing headers, and with one value of a name given twice but for its case', async () => {
    const provider = await createProvider({ name: 'old-headers', kind: 'openai-compatible', base_url: fake.url, headers: { 'X-Org': HEADER_VALUE } });
    // As written before Accept-Encoding and case repeats were refused: sealed as the service seals them.
    const headers = { 'Accept-Encoding': 'gzip', Authorization: 'Bearer old-token-0001', authorization: 'Bearer new-token-0002', 'X-Org': HEADER_VALUE };
    const sealed = sealSecret(ctx.app.settings.SECRET_KEY, provider.id, 'headers', headers);
    await ctx.database.db.update(providers).set({ headers_sealed: sealed }).where(eq(providers.id, provider.id));
    await api('PATCH', `/providers/${provider.id}`, admin, { enabled: true }); // reloads the records
    await api('POST', '/models', admin, { id: 'old-headers-model', provider: 'old-headers', pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' } });
    fake.script('old-headers-model', { text: 'Hi' });
    expect((await ctx.app.models.chat({ model: 'old-headers-model', messages: [{ role: 'user', content: 'hello' }] })).text).toBe('Hi');
    const sent = fake.requestsFor('old-headers-model').at(-1)!.headers;
    expect(sent.authorization).toBe('Bearer new-token-0002');
    expect(sent['accept-encoding']).not.toBe('gzip');
    expect(sent['x-org']).toBe(HEADER_VALUE);
  });

  it('a change of base_url or kind does not carry the stored key and headers to the new host: 422 naming them until given again (or null)', async () => {
    const elsewhere = await FakeModelServer.start();
    try {
      const created = await createProvider({ name: 'moving', kind: 'openai-compatible', base_url: fake.url, api_key: API_KEY, headers: { 'X-Org': HEADER_VALUE } });
      await api('POST', '/models', admin, { id: 'moving-model', provider: 'moving', pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' } });
      const chat = () => ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: user.headers, payload: { model: 'moving-model', messages: [{ role: 'user', content: 'hi' }] } });
      // Another superuser, who never saw the key, points the record at a server of theirs: refused, the record as it was.
      const other = await createUser(ctx.app, { superuser: true });
      for (const change of [{ base_url: elsewhere.url }, { base_url: elsewhere.url, enabled: true }, { kind: 'openai' }, { base_url: elsewhere.url, api_key: 'sk-theirs-0123456789' }]) {
        const refused = await api('PATCH', `/providers/${created.id}`, other.headers, change);
        expect(refused.statusCode, refused.body).toBe(422);
        const named = refused.json<{ detail: { loc: string[]; msg: string; type: string }[] }>().detail;
        expect(named.map((issue) => issue.loc)).toEqual([...('api_key' in change ? [] : [['body', 'api_key']]), ['body', 'headers']]);
        expect(named.at(-1)).toMatchObject({ type: 'missing', msg: expect.stringContaining('send headers again in the same request, or null to drop it') as string });
      }
      expect((await api('GET', `/providers/${created.id}`, admin)).json<ProviderBody>()).toMatchObject({ kind: 'openai-compatible', base_url: fake.url, has_api_key: true, header_names: ['X-Org'] });
      // The same base_url again moves nothing.
      expect((await api('PATCH', `/providers/${created.id}`, other.headers, { base_url: fake.url })).statusCode).toBe(200);
      expect((await chat()).statusCode).toBe(200);
      expect(fake.requestsFor('moving-model').at(-1)!.headers.authorization).toBe(`Bearer ${API_KEY}`);
      expect(elsewhere.log).toHaveLength(0);

      // Moved with a key of its own (and its headers dropped): the new host gets that key, never the old secrets.
      const moved = await api('PATCH', `/providers/${created.id}`, other.headers, { base_url: elsewhere.url, api_key: 'sk-theirs-0123456789', headers: null });
      expect(moved.statusCode, moved.body).toBe(200);
      expect(moved.json<ProviderBody>()).toMatchObject({ base_url: elsewhere.url, has_api_key: true, header_names: [] });
      expect((await chat()).statusCode).toBe(200);
      expect(elsewhere.log).toHaveLength(1);
      expect(elsewhere.log[0]!.headers.authorization).toBe('Bearer sk-theirs-0123456789');
      expect(JSON.stringify(elsewhere.log[0]!.headers)).not.toContain(API_KEY);
      expect(JSON.stringify(elsewhere.log[0]!.headers)).not.toContain(HEADER_VALUE);

      // Dropped rather than given (null): moved, and unavailable for want of a key, as a record without one is.
      const dropped = await api('PATCH', `/providers/${created.id}`, other.headers, { kind: 'openai', base_url: null, api_key: null });
      expect(dropped.statusCode, dropped.body).toBe(200);
      expect(ctx.app.models.getModel('moving-model')).toMatchObject({ available: false, unavailable_reason: 'Provider moving has no api_key' });
      expect((await api('DELETE', '/models/moving-model', admin)).statusCode).toBe(200);
      expect((await api('DELETE', `/providers/${created.id}`, admin)).statusCode).toBe(200);
    } finally {
      await elsewhere.close();
    }
  });

  it('answers 409 for a taken name, 404 for a missing id; null clears the key; delete removes', async () => {
    const created = await createProvider({ name: 'dup', kind: 'anthropic', api_key: 'k' });
    expect((await api('POST', '/providers', admin, { name: 'dup', kind: 'openai' })).statusCode).toBe(409);
    const cleared = await api('PATCH', `/providers/${created.id}`, admin, { api_key: null });
    expect(cleared.json()).toMatchObject({ has_api_key: false });
    expect((await api('PATCH', `/providers/${created.id}`, admin, { name: 'renamed' })).statusCode).toBe(422);
    expect((await api('DELETE', `/providers/${created.id}`, admin)).statusCode).toBe(200);
    expect((await api('GET', `/providers/${created.id}`, admin)).statusCode).toBe(404);
    expect((await api('DELETE', `/providers/${created.id}`, admin)).statusCode).toBe(404);
  });

  it('a record named like a built-in provider supplies its credentials: its models become available', async () => {
    expect(ctx.app.models.getModel('gpt-4.1')).toMatchObject({ available: false, unavailable_reason: 'OPENAI_API_KEY is not set' });
    const record = await createProvider({ name: 'openai', kind: 'openai', api_key: API_KEY });
    expect(ctx.app.models.getModel('gpt-4.1')).toMatchObject({ available: true, unavailable_reason: null });
    const model = await api('GET', '/models/gpt-4.1', user.headers);
    expect(model.json()).toMatchObject({ available: true });
    // Built-in models naming the provider go back to the settings' credentials once the record is
    // gone; a custom one holds the record while the settings have no key for it (it would answer 503).
    const pricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' };
    expect((await api('POST', '/models', admin, { id: 'house-on-openai', provider: 'openai', pricing })).statusCode).toBe(200);
    expect((await api('PATCH', '/models/gpt-4.1-mini', admin, { provider: 'openai' })).statusCode).toBe(200);
    const held = await api('DELETE', `/providers/${record.id}`, admin);
    expect([held.statusCode, held.json<{ detail: string }>().detail]).toEqual([409, expect.stringContaining('used by model house-on-openai:')]);
    expect((await api('DELETE', '/models/house-on-openai', admin)).statusCode).toBe(200);
    const deleted = await api('DELETE', `/providers/${record.id}`, admin);
    expect(deleted.statusCode, deleted.body).toBe(200);
    expect(ctx.app.models.getModel('gpt-4.1')?.available).toBe(false);
    expect(ctx.app.models.getModel('gpt-4.1-mini')).toMatchObject({ provider: 'openai', available: false, unavailable_reason: 'OPENAI_API_KEY is not set' });
  });

  it('a record named like a built-in provider whose key the settings hold: deleted under its custom models when of that kind, held by them when of another (their prompts would go elsewhere)', async () => {
    const pricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' };
    const local = await createProvider({ name: 'anthropic', kind: 'openai-compatible', base_url: fake.url, api_key: API_KEY });
    expect((await api('POST', '/models', admin, { id: 'house-on-anthropic', provider: 'anthropic', pricing })).statusCode).toBe(200);
    const held = await api('DELETE', `/providers/${local.id}`, admin);
    expect([held.statusCode, held.json<{ detail: string }>().detail]).toEqual([409, expect.stringContaining('used by model house-on-anthropic:')]);
    // Of Anthropic's own kind, the model goes on with the settings' key once the record is gone.
    expect((await api('PATCH', `/providers/${local.id}`, admin, { kind: 'anthropic', base_url: null, api_key: null })).statusCode).toBe(200);
    const deleted = await api('DELETE', `/providers/${local.id}`, admin);
    expect(deleted.statusCode, deleted.body).toBe(200);
    expect(ctx.app.models.getModel('house-on-anthropic')).toMatchObject({ provider: 'anthropic', available: true });
    expect((await api('DELETE', '/models/house-on-anthropic', admin)).statusCode).toBe(200);
  });

  it('an openai-compatible provider and a custom model added at run time answer through app.models.chat', async () => {
    const provider = await createProvider({ name: 'fake', kind: 'openai-compatible', base_url: fake.url, api_key: API_KEY, headers: { 'X-Org': HEADER_VALUE } });
    const model = await api('POST', '/models', admin, {
      id: 'fake-chat',
      provider: 'fake',
      aliases: ['fake-latest'],
      pricing: { input_cost_per_million_tokens: '2', output_cost_per_million_tokens: '8' },
    });
    expect(model.statusCode, model.body).toBe(200);
    expect(model.json()).toMatchObject({ provider: 'fake', available: true, unavailable_reason: null });

    fake.script('fake-chat', { text: 'Hi from upstream', usage: { prompt_tokens: 100, completion_tokens: 50 } });
    const result = await ctx.app.models.chat({ model: 'fake-latest', messages: [{ role: 'user', content: 'hello' }] });
    expect(result).toMatchObject({ text: 'Hi from upstream', model: 'fake-chat', provider: 'fake' });
    // 100 × 2 + 50 × 8 = 600 per million.
    expect(result.cost).toBe('0.0006');
    const [sent] = fake.requestsFor('fake-chat');
    expect(sent?.headers.authorization).toBe(`Bearer ${API_KEY}`);
    expect(sent?.headers['x-org']).toBe(HEADER_VALUE);

    // Disabled provider: the model stays listed, unavailable, and a call names why.
    await api('PATCH', `/providers/${provider.id}`, admin, { enabled: false });
    expect(ctx.app.models.getModel('fake-chat')).toMatchObject({ available: false, unavailable_reason: 'Provider fake is disabled' });
    await expect(ctx.app.models.chat({ model: 'fake-chat', messages: [{ role: 'user', content: 'hello' }] })).rejects.toThrow('Provider fake is disabled');
  });

  it('a model whose provider is disabled is answered by its fallback on /v1 (stream or not), listed by /v1/models, and GET /models says which answers', async () => {
    const pricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' };
    const down = await createProvider({ name: 'off-for-now', kind: 'openai-compatible', base_url: fake.url });
    await createProvider({ name: 'standing-in', kind: 'openai-compatible', base_url: fake.url });
    expect((await api('POST', '/models', admin, { id: 'stand-in', provider: 'standing-in', pricing })).statusCode).toBe(200);
    expect((await api('POST', '/models', admin, { id: 'off-model', provider: 'off-for-now', pricing, fallbacks: ['stand-in'] })).statusCode).toBe(200);
    expect((await api('POST', '/models', admin, { id: 'off-alone', provider: 'off-for-now', pricing })).statusCode).toBe(200);
    await api('PATCH', `/providers/${down.id}`, admin, { enabled: false });

    const view = (await api('GET', '/models/off-model', admin)).json<Record<string, unknown>>();
    expect(view).toMatchObject({ available: false, unavailable_reason: 'Provider off-for-now is disabled', answered_by: 'stand-in' });
    expect((await api('GET', '/models/off-alone', admin)).json()).toMatchObject({ available: false, answered_by: null });
    const listed = (await ctx.app.inject({ method: 'GET', url: '/v1/models', headers: admin })).json<{ data: { id: string }[] }>().data.map((m) => m.id);
    expect(listed).toContain('off-model');
    expect(listed).not.toContain('off-alone');
    expect((await ctx.app.inject({ method: 'GET', url: '/v1/models/off-model', headers: admin })).statusCode).toBe(200);
    expect((await ctx.app.inject({ method: 'GET', url: '/v1/models/off-alone', headers: admin })).statusCode).toBe(404);

    fake.script('stand-in', { text: 'Standing in', usage: { prompt_tokens: 7, completion_tokens: 3 } }, { text: 'Standing in streamed', usage: { prompt_tokens: 7, completion_tokens: 3 } });
    const payload = { model: 'off-model', messages: [{ role: 'user', content: 'Hi' }] };
    const answer = await ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: admin, payload });
    expect(answer.statusCode, answer.body).toBe(200);
    expect(answer.json()).toMatchObject({ model: 'stand-in', choices: [{ message: { content: 'Standing in' } }] });
    const streamed = await ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: admin, payload: { ...payload, stream: true } });
    expect(streamed.statusCode).toBe(200);
    expect(streamed.body).toContain('"model":"stand-in"');
    expect(streamed.body).toContain('data: [DONE]');
    // Without one standing in: the 503 that names why, as before.
    const alone = await ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: admin, payload: { ...payload, model: 'off-alone' } });
    expect(alone.statusCode).toBe(503);
    expect(alone.json()).toMatchObject({ error: { message: 'Provider off-for-now is disabled', code: 'provider_unavailable' } });

    await ctx.app.meter.idle();
    const rows = await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.provider, 'standing-in'));
    expect(rows.map((row) => [row.model, row.status, row.input_tokens, row.output_tokens])).toEqual([
      ['stand-in', 'success', 7, 3],
      ['stand-in', 'success', 7, 3],
    ]);
    expect(await ctx.database.db.select().from(usageRecords).where(eq(usageRecords.provider, 'off-for-now'))).toHaveLength(0);
  });

  it('refuses with 409 to delete a provider that models name (custom, or a built-in moved to it), and deletes it once none does', async () => {
    const provider = await createProvider({ name: 'in-use', kind: 'openai-compatible', base_url: fake.url });
    const pricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' };
    expect((await api('POST', '/models', admin, { id: 'in-use-chat', provider: 'in-use', pricing })).statusCode).toBe(200);
    expect((await api('PATCH', '/models/gpt-4.1-nano', admin, { provider: 'in-use' })).statusCode).toBe(200);
    const refused = await api('DELETE', `/providers/${provider.id}`, admin);
    expect(refused.statusCode).toBe(409);
    expect(refused.json<{ detail: string }>().detail).toBe('Provider in-use is used by models gpt-4.1-nano, in-use-chat: delete them or move them to another provider first');
    expect((await api('GET', `/providers/${provider.id}`, admin)).statusCode).toBe(200);
    expect((await api('DELETE', '/models/in-use-chat', admin)).statusCode).toBe(200);
    expect((await api('PATCH', '/models/gpt-4.1-nano', admin, { provider: 'openai' })).statusCode).toBe(200);
    expect((await api('DELETE', `/providers/${provider.id}`, admin)).statusCode).toBe(200);
  });

  it('a model created while its provider is deleted: one of them wins, never a model naming a provider that is gone', async () => {
    const pricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' };
    const outcomes = new Set<string>();
    for (let i = 0; i < 12; i++) {
      const provider = await createProvider({ name: `racing-${i}`, kind: 'openai-compatible', base_url: fake.url });
      const [created, deleted] = await Promise.all([api('POST', '/models', admin, { id: `racing-chat-${i}`, provider: provider.name, pricing }), api('DELETE', `/providers/${provider.id}`, admin)]);
      const outcome = `${created.statusCode}/${deleted.statusCode}`;
      outcomes.add(outcome);
      // The model first (the delete then refused), or the delete first (the model's provider then not found).
      expect(['200/409', '404/200'], `${outcome}: ${created.body} ${deleted.body}`).toContain(outcome);
      if (created.statusCode === 200) {
        expect((await api('DELETE', `/models/racing-chat-${i}`, admin)).statusCode).toBe(200);
        expect((await api('DELETE', `/providers/${provider.id}`, admin)).statusCode).toBe(200);
      }
    }
  });
});
