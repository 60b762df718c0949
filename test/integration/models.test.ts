import { eq } from 'drizzle-orm';
import { beforeAll, describe, expect, it } from 'vitest';

import { modelOverrides } from '../../src/models/index.js';

import { loadBuiltinModels } from '../../src/modules/ai-models/builtin-models.js';
import { refreshModels } from '../../src/services/model-sync.js';
import { buildTestApp, useTestApp } from '../helpers/app.js';
import { createProject, createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { apiOf, call, createKey, expectValidationError, type ListBody, xApiKey } from '../helpers/http.js';
import { captureLogs, LEVEL } from '../helpers/logs.js';

const logs = captureLogs('warn');
const ctx = useTestApp({}, { logger: logs.logger });
const api = apiOf(ctx);

interface ModelBody {
  id: string;
  name: string;
  provider: string;
  aliases: string[];
  context_window: number | null;
  max_output_tokens: number | null;
  capabilities: string[];
  pricing: Record<string, string> & { tiers?: Record<string, string | number>[] };
  enabled: boolean;
  recommended: boolean;
  priority: number;
  fallbacks: string[];
  available: boolean;
  unavailable_reason: string | null;
  unavailable_fallbacks: { name: string; reason: string }[];
  answered_by: string | null;
}

const MODEL_FIELDS = ['aliases', 'answered_by', 'available', 'capabilities', 'context_window', 'enabled', 'fallbacks', 'id', 'max_output_tokens', 'name', 'pricing', 'priority', 'provider', 'recommended', 'unavailable_fallbacks', 'unavailable_reason'];
const DECIMAL = /^\d+(\.\d+)?$/;
const BUILTIN = loadBuiltinModels().find((m) => m.id === 'gpt-4.1-mini')!;
const CUSTOM = {
  id: 'house-model',
  provider: 'openai',
  name: 'House model',
  aliases: ['house'],
  pricing: { input_cost_per_million_tokens: '0.000000000001', output_cost_per_million_tokens: '12.5' },
};

let admin: Record<string, string>;
let user: TestUser;

beforeAll(async () => {
  admin = await superuserHeaders(ctx.app);
  user = await createUser(ctx.app);
});

/** Every page of the list, as a client pages through it (at most 100 a page). */
async function allModels(headers: Record<string, string>, query = ''): Promise<ListBody<ModelBody>> {
  const data: ModelBody[] = [];
  for (;;) {
    const response = await api('GET', `/models?limit=100&offset=${data.length}${query}`, headers);
    expect(response.statusCode, response.body).toBe(200);
    const page = response.json<ListBody<ModelBody>>();
    data.push(...page.data);
    if (!page.data.length || data.length >= page.count) return { data, count: page.count };
  }
}

describe('GET /models', () => {
  it('lists the built-in catalog with decimal prices, by priority, paged', async () => {
    const { data, count } = await allModels(user.headers);
    expect(count).toBe(data.length);
    expect(count).toBeGreaterThan(10);
    for (const model of data) {
      expect(Object.keys(model).sort()).toEqual(MODEL_FIELDS);
      expect(model.pricing.input_cost_per_million_tokens).toMatch(DECIMAL);
      expect(model.pricing.output_cost_per_million_tokens).toMatch(DECIMAL);
      expect(model.enabled).toBe(true);
    }
    expect(data.map((m) => m.priority)).toEqual([...data.map((m) => m.priority)].sort((a, b) => b - a));
    const mini = data.find((m) => m.id === 'gpt-4.1-mini')!;
    expect(mini.pricing).toEqual(BUILTIN.pricing);
    expect(mini.pricing.cached_input_cost_per_million_tokens).toMatch(DECIMAL);

    const page = (await api('GET', '/models?limit=2&offset=1', user.headers)).json<ListBody<ModelBody>>();
    expect(page).toEqual({ data: data.slice(1, 3), count });
    // Paged as every list: 20 by default, at most 100.
    expect((await api('GET', '/models', user.headers)).json<ListBody<ModelBody>>()).toEqual({ data: data.slice(0, 20), count });
    expectValidationError(await api('GET', '/models?limit=0', user.headers), ['query', 'limit']);
    expectValidationError(await api('GET', '/models?limit=101', user.headers), ['query', 'limit']);
    expectValidationError(await api('GET', '/models?page=2', user.headers), ['query', 'page'], 'extra_forbidden');
  });

  it('marks models whose provider has no credentials unavailable, naming the setting', async () => {
    const { data } = await allModels(user.headers);
    const openai = data.find((m) => m.id === 'gpt-4.1-mini')!;
    expect(openai.available).toBe(false);
    expect(openai.unavailable_reason).toBe('OPENAI_API_KEY is not set');
    expect(data.find((m) => m.provider === 'anthropic')?.unavailable_reason).toBe('ANTHROPIC_API_KEY is not set');
  });

  it("shows a model's long-context prices as its calls are priced; a superuser's flat pricing replaces them", async () => {
    const builtin = loadBuiltinModels().find((m) => m.id === 'claude-sonnet-4-5')!;
    const shown = (await api('GET', '/models/claude-sonnet-4-5', user.headers)).json<ModelBody>();
    expect(shown.pricing.tiers).toEqual(builtin.pricing.tiers);
    expect(shown.pricing.tiers?.[0]).toMatchObject({ above_input_tokens: 200_000, input_cost_per_million_tokens: '6', output_cost_per_million_tokens: '22.5' });
    expect((await allModels(user.headers)).data.find((m) => m.id === 'claude-sonnet-4-5')?.pricing).toEqual(shown.pricing);
    expect(Object.keys((await api('GET', '/models/gpt-4.1-mini', user.headers)).json<ModelBody>().pricing)).not.toContain('tiers');

    const flat = { input_cost_per_million_tokens: '2', output_cost_per_million_tokens: '10' };
    const patched = await api('PATCH', '/models/claude-sonnet-4-5', admin, { pricing: flat });
    expect(patched.statusCode, patched.body).toBe(200);
    expect(patched.json<ModelBody>().pricing).toEqual(flat);
    expect(ctx.app.models.getModel('claude-sonnet-4-5')?.pricing.tiers).toBeUndefined();
    expect((await api('DELETE', '/models/claude-sonnet-4-5', admin)).statusCode).toBe(200);
    expect((await api('POST', '/models', admin, { id: 'claude-sonnet-4-5' })).json<ModelBody>().pricing.tiers).toEqual(builtin.pricing.tiers);
  });

  it('resolves an alias, answers 404 for an unknown id, 401 without credentials', async () => {
    const alias = BUILTIN.aliases[0]!;
    const byAlias = await api('GET', `/models/${alias}`, user.headers);
    expect(byAlias.statusCode, byAlias.body).toBe(200);
    expect(byAlias.json<ModelBody>().id).toBe('gpt-4.1-mini');
    const missing = await api('GET', '/models/no-such-model', user.headers);
    expect(missing.statusCode).toBe(404);
    expect(missing.json()).toEqual({ detail: 'Model no-such-model not found' });
    expect((await api('GET', '/models')).statusCode).toBe(401);
    expect((await api('GET', '/models/gpt-4.1-mini')).statusCode).toBe(401);
  });

  it('is readable with a project-scoped API key, whose admin calls are refused', async () => {
    const superuser = { headers: admin };
    const project = await createProject(ctx.app, admin);
    const scoped = await createKey(ctx.app, superuser, { name: 'scoped', project_id: project.id });
    expect((await api('GET', '/models', xApiKey(scoped.key))).statusCode).toBe(200);
    expect((await api('GET', '/models/gpt-4.1-mini', xApiKey(scoped.key))).statusCode).toBe(200);
    for (const [method, url, body] of [
      ['POST', '/models', CUSTOM],
      ['PATCH', '/models/gpt-4.1-mini', { enabled: false }],
      ['DELETE', '/models/gpt-4.1-mini', undefined],
    ] as const) {
      const response = await api(method, url, xApiKey(scoped.key), body);
      expect(response.statusCode, `${method} ${url}`).toBe(403);
    }
  });
});

describe('superuser changes', () => {
  it('refuses normal users (403) before reading the body', async () => {
    expect((await api('POST', '/models', user.headers, CUSTOM)).statusCode).toBe(403);
    expect((await api('POST', '/models', user.headers, { bogus: 1 })).statusCode).toBe(403);
    expect((await api('PATCH', '/models/gpt-4.1-mini', user.headers, { enabled: false })).statusCode).toBe(403);
    expect((await api('DELETE', '/models/gpt-4.1-mini', user.headers)).statusCode).toBe(403);
    expect((await api('POST', '/models', {}, CUSTOM)).statusCode).toBe(401);
    expect((await allModels(user.headers)).data.find((m) => m.id === 'gpt-4.1-mini')?.enabled).toBe(true);
  });

  it('refuses bad bodies with 422', async () => {
    expectValidationError(await api('POST', '/models', admin, { ...CUSTOM, secret: 1 }), ['body', 'secret'], 'extra_forbidden');
    expectValidationError(await api('POST', '/models', admin, { id: 'custom-without-price', provider: 'openai' }), ['body', 'pricing']);
    expectValidationError(await api('POST', '/models', admin, { id: 'no-provider', pricing: CUSTOM.pricing }), ['body', 'provider']);
    expectValidationError(await api('POST', '/models', admin, { ...CUSTOM, pricing: { input_cost_per_million_tokens: 1.5, output_cost_per_million_tokens: '1' } }), ['body', 'pricing', 'input_cost_per_million_tokens']);
    expectValidationError(await api('POST', '/models', admin, { ...CUSTOM, id: 'has space' }), ['body', 'id']);
    // Characters no provider's model id holds, which would show one name and be another: a control
    // character, a right-to-left override, a zero-width space, half of a surrogate pair.
    for (const id of ['ctl\u0001', 'ledom\u202e', 'zero\u200bwidth', 'half\ud800']) {
      expectValidationError(await api('POST', '/models', admin, { ...CUSTOM, id }), ['body', 'id']);
      expectValidationError(await api('POST', '/models', admin, { ...CUSTOM, aliases: [id] }), ['body', 'aliases', '0']);
      expectValidationError(await api('PATCH', '/models/gpt-4.1-mini', admin, { fallbacks: [id] }), ['body', 'fallbacks', '0']);
    }
    // `agent:` names a Keel agent (on /v1, here or on another Keel whose agent run would not carry the hop marks).
    expectValidationError(await api('POST', '/models', admin, { ...CUSTOM, id: 'agent:0b7a8d9e-3c1f-4e55-9a21-5d2c1e0f7a44' }), ['body', 'id']);
    expectValidationError(await api('POST', '/models', admin, { ...CUSTOM, aliases: ['agent:helper'] }), ['body', 'aliases', '0']);
    expectValidationError(await api('PATCH', '/models/gpt-4.1-mini', admin, { name: 'two\nlines' }), ['body', 'name']);
    // Letters of any script are names as any other.
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'модель-7b', aliases: [] })).statusCode).toBe(200);
    expect((await api('DELETE', `/models/${encodeURIComponent('модель-7b')}`, admin)).statusCode).toBe(200);
    expectValidationError(await api('PATCH', '/models/gpt-4.1-mini', admin, { capabilities: ['telepathy'] }), ['body', 'capabilities', '0']);
    expectValidationError(await api('PATCH', '/models/gpt-4.1-mini', admin, { id: 'renamed' }), ['body', 'id'], 'extra_forbidden');
    for (const bad of [0, -1, 1.5, '100']) expectValidationError(await api('PATCH', '/models/gpt-4.1-mini', admin, { max_output_tokens: bad }), ['body', 'max_output_tokens']);
  });

  it('creates a custom model (409 the second time), changes and removes it', async () => {
    const created = await api('POST', '/models', admin, CUSTOM);
    expect(created.statusCode, created.body).toBe(200);
    expect(created.headers.location).toBe('/api/v1/models/house-model');
    expect(created.json()).toMatchObject({ ...CUSTOM, capabilities: ['chat'], max_output_tokens: null, enabled: true, available: false, unavailable_reason: 'OPENAI_API_KEY is not set' });
    expect((await api('POST', '/models', admin, CUSTOM)).statusCode).toBe(409);
    expect((await api('GET', '/models/house', user.headers)).json<ModelBody>().id).toBe('house-model');

    const patched = await api('PATCH', '/models/house', admin, { pricing: { input_cost_per_million_tokens: '3', output_cost_per_million_tokens: '4', cached_input_cost_per_million_tokens: '0.3' }, priority: 7, max_output_tokens: 8192 });
    expect(patched.statusCode, patched.body).toBe(200);
    expect(patched.json()).toMatchObject({ id: 'house-model', priority: 7, max_output_tokens: 8192, pricing: { input_cost_per_million_tokens: '3', cached_input_cost_per_million_tokens: '0.3' } });
    expect(ctx.app.models.getModel('house-model')).toMatchObject({ max_output_tokens: 8192, pricing: { output_cost_per_million_tokens: '4' } });

    // An empty change changes nothing, for a custom model and a built-in one alike.
    const unchanged = await api('PATCH', '/models/house', admin, {});
    expect(unchanged.statusCode, unchanged.body).toBe(200);
    expect(unchanged.json()).toEqual(patched.json());
    const builtin = await api('PATCH', '/models/gpt-4.1-nano', admin, {});
    expect(builtin.statusCode, builtin.body).toBe(200);
    expect(builtin.json<ModelBody>().id).toBe('gpt-4.1-nano');

    expect((await api('DELETE', '/models/house-model', admin)).statusCode).toBe(200);
    expect((await api('GET', '/models/house-model', user.headers)).statusCode).toBe(404);
    expect(await ctx.database.db.select().from(modelOverrides).where(eq(modelOverrides.model_id, 'house-model'))).toEqual([]);
    expect((await api('DELETE', '/models/house-model', admin)).statusCode).toBe(404);
  });

  it('serves an id holding slashes (OpenRouter, vLLM style), the slashes percent-encoded or written as they are', async () => {
    const created = await api('POST', '/models', admin, { ...CUSTOM, id: 'meta-llama/llama-3-70b', aliases: [] });
    expect(created.statusCode, created.body).toBe(200);
    expect(created.headers.location).toBe('/api/v1/models/meta-llama%2Fllama-3-70b');
    for (const path of ['meta-llama%2Fllama-3-70b', 'meta-llama/llama-3-70b', 'meta-llama/llama-3-70b/', 'meta-llama/llama-3-70b?x=a/b']) {
      const got = await api('GET', `/models/${path}`, user.headers);
      expect(got.statusCode, `${path}: ${got.body}`).toBe(200);
      expect(got.json<ModelBody>().id).toBe('meta-llama/llama-3-70b');
    }
    const renamed = await api('PATCH', '/models/meta-llama/llama-3-70b', admin, { name: 'Llama 3 70B' });
    expect(renamed.statusCode, renamed.body).toBe(200);
    expect(renamed.json<ModelBody>().name).toBe('Llama 3 70B');
    expect((await api('GET', '/models/meta-llama/no-such-model', user.headers)).statusCode).toBe(404);
    // A refusal of the URL names it as the client wrote it, not as the rewrite escaped it.
    const wrongMethod = await ctx.app.inject({ method: 'DELETE', url: '/v1/models/meta-llama/llama-3-70b', headers: user.headers });
    expect(wrongMethod.statusCode).toBe(405);
    expect(wrongMethod.json<{ error: { message: string } }>().error.message).toBe('Invalid method for URL: DELETE /v1/models/meta-llama/llama-3-70b (it takes GET, HEAD)');
    expect((await api('PATCH', '/models/meta-llama/llama-3-70b', user.headers, { name: 'x' })).statusCode).toBe(403);
    expect((await api('DELETE', '/models/meta-llama/llama-3-70b', admin)).statusCode).toBe(200);
    expect((await api('GET', '/models/meta-llama%2Fllama-3-70b', user.headers)).statusCode).toBe(404);
  });

  it('refuses fallbacks that could not stand in (unknown, the model itself, another kind) with 422 naming each; takes one by alias', async () => {
    const refused = await api('POST', '/models', admin, { ...CUSTOM, id: 'with-fallbacks', aliases: [], fallbacks: ['gpt-4.1-mini', 'no-such-model', 'with-fallbacks', 'text-embedding-3-small'] });
    const issues = expectValidationError(refused, ['body', 'fallbacks', 1]).detail;
    expect(issues.map((issue) => [issue.loc, issue.msg])).toEqual([
      [['body', 'fallbacks', 1], 'Unknown model "no-such-model"; GET /models lists the catalog'],
      [['body', 'fallbacks', 2], 'A model cannot be its own fallback'],
      [['body', 'fallbacks', 3], 'Model "text-embedding-3-small" cannot stand in: it lacks chat'],
    ]);
    expectValidationError(await api('PATCH', '/models/gpt-5.1', admin, { fallbacks: ['gpt-5-1'] }), ['body', 'fallbacks', 0]); // its other spelling
    expectValidationError(await api('PATCH', '/models/text-embedding-3-small', admin, { fallbacks: ['gpt-4.1'] }), ['body', 'fallbacks', 0]);
    const taken = await api('PATCH', '/models/gpt-4.1', admin, { fallbacks: ['gpt-4.1-mini-2025-04-14', 'gpt-4.1-2025-04-14'] });
    expect(taken.statusCode, taken.body).toBe(200);
    expect(taken.json<ModelBody>().fallbacks).toEqual(['gpt-4.1-mini-2025-04-14', 'gpt-4.1-2025-04-14']);
    // One model named twice (by its other spelling, then by id again) would be tried twice.
    const twice = await api('PATCH', '/models/gpt-4.1', admin, { fallbacks: ['gpt-5.1', 'gpt-4.1-mini', 'gpt-5-1', 'gpt-5.1'] });
    expect(expectValidationError(twice, ['body', 'fallbacks', 2]).detail.map((issue) => [issue.loc, issue.msg])).toEqual([
      [['body', 'fallbacks', 2], 'Model "gpt-5.1" is already a fallback (as "gpt-5.1")'],
      [['body', 'fallbacks', 3], 'Model "gpt-5.1" is already a fallback (as "gpt-5.1")'],
    ]);
    // Capabilities changed alone are checked against the fallbacks kept.
    expectValidationError(await api('PATCH', '/models/gpt-4.1', admin, { capabilities: ['chat', 'embedding'] }), ['body', 'fallbacks', 0]);
    expect((await api('PATCH', '/models/gpt-4.1', admin, { fallbacks: [] })).statusCode).toBe(200);
    // A hidden built-in brought back is checked as what it is (an embedding model), not as a custom chat model.
    expect((await api('DELETE', '/models/text-embedding-3-small', admin)).statusCode).toBe(200);
    const back = await api('POST', '/models', admin, { id: 'text-embedding-3-small', fallbacks: ['text-embedding-3-large'] });
    expect(back.statusCode, back.body).toBe(200);
    expect((await api('DELETE', '/models/text-embedding-3-small', admin)).statusCode).toBe(200);
    expect((await api('POST', '/models', admin, { id: 'text-embedding-3-small' })).statusCode).toBe(200);
  });

  it('refuses an alias that already names another model (its id or alias) with 422 naming the holder; keeps its own', async () => {
    const refused = await api('POST', '/models', admin, { ...CUSTOM, id: 'alias-thief', aliases: ['thief', 'gpt-4.1', 'gpt-4.1-2025-04-14'] });
    const issues = expectValidationError(refused, ['body', 'aliases', 1]).detail;
    expect(issues.map((issue) => [issue.loc, issue.msg])).toEqual([
      [['body', 'aliases', 1], '"gpt-4.1" is the id of model "gpt-4.1"'],
      [['body', 'aliases', 2], '"gpt-4.1-2025-04-14" is already an alias of model "gpt-4.1"'],
    ]);
    expect((await api('GET', '/models/alias-thief', user.headers)).statusCode).toBe(404);

    const first = await api('POST', '/models', admin, { ...CUSTOM, id: 'alias-first', aliases: ['shared-name'] });
    expect(first.statusCode, first.body).toBe(200);
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'alias-second', aliases: [] })).statusCode).toBe(200);
    expectValidationError(await api('PATCH', '/models/alias-second', admin, { aliases: ['shared-name'] }), ['body', 'aliases', 0]);
    expect((await api('GET', '/models/alias-second', user.headers)).json<ModelBody>().aliases).toEqual([]);
    // Its own aliases (and a built-in's) are set again freely; a freed alias can be taken.
    expect((await api('PATCH', '/models/shared-name', admin, { aliases: ['shared-name', 'other-name'] })).statusCode).toBe(200);
    expect((await api('PATCH', '/models/gpt-4.1', admin, { aliases: ['gpt-4.1-2025-04-14'] })).statusCode).toBe(200);
    expect((await api('PATCH', '/models/alias-first', admin, { aliases: [] })).statusCode).toBe(200);
    const taken = await api('PATCH', '/models/alias-second', admin, { aliases: ['shared-name'] });
    expect(taken.statusCode, taken.body).toBe(200);
    expect((await api('GET', '/models/shared-name', user.headers)).json<ModelBody>().id).toBe('alias-second');
    for (const id of ['alias-first', 'alias-second']) expect((await api('DELETE', `/models/${id}`, admin)).statusCode).toBe(200);
    expect((await api('DELETE', '/models/gpt-4.1', admin)).statusCode).toBe(200);
    expect((await api('POST', '/models', admin, { id: 'gpt-4.1' })).statusCode).toBe(200);
  });

  it("refuses an alias listed twice or naming the model's own id with 422 naming it; a PATCH keeping a model's aliases passes", async () => {
    // ' twice' is trimmed (ModelId) into a second 'twice'; names are matched as written, so 'Twice' is another.
    const refused = await api('POST', '/models', admin, { ...CUSTOM, id: 'alias-repeater', aliases: ['twice', ' twice', 'alias-repeater', 'Twice'] });
    expect(expectValidationError(refused, ['body', 'aliases', 1]).detail.map((issue) => [issue.loc, issue.msg])).toEqual([
      [['body', 'aliases', 1], '"twice" is listed twice'],
      [['body', 'aliases', 2], '"alias-repeater" is this model\'s id'],
    ]);
    expect((await api('GET', '/models/alias-repeater', user.headers)).statusCode).toBe(404);
    // By an alias the model's id is still its own; a built-in's list is checked the same way.
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'alias-keeper', aliases: ['keeper'] })).statusCode).toBe(200);
    expectValidationError(await api('PATCH', '/models/keeper', admin, { aliases: ['keeper', 'alias-keeper'] }), ['body', 'aliases', 1]);
    expectValidationError(await api('PATCH', '/models/gpt-4.1', admin, { aliases: ['gpt-4.1-2025-04-14', 'gpt-4.1-2025-04-14'] }), ['body', 'aliases', 1]);
    // The built-in catalog keeps the rule, so each model's aliases as GET lists them are sent back unchanged.
    for (const model of loadBuiltinModels()) expect(new Set([model.id, ...model.aliases]).size, model.id).toBe(model.aliases.length + 1);
    for (const id of ['gpt-4.1', 'alias-keeper']) {
      const { aliases } = (await api('GET', `/models/${id}`, user.headers)).json<ModelBody>();
      expect(aliases.length, id).toBeGreaterThan(0);
      const kept = await api('PATCH', `/models/${id}`, admin, { aliases, priority: 7 });
      expect(kept.statusCode, kept.body).toBe(200);
      expect(kept.json<ModelBody>().aliases).toEqual(aliases);
    }
    // A row from before the rule is listed with each alias once and without its id, and can be written.
    const pricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' };
    await ctx.database.db.insert(modelOverrides).values({ model_id: 'alias-legacy', provider: 'openai', pricing, aliases: ['old', 'alias-legacy', 'old', 'older'], deleted: false });
    await refreshModels(ctx.app.models, ctx.database.db, ctx.app.settings, ctx.app.log);
    const legacy = (await api('GET', '/models/old', user.headers)).json<ModelBody>();
    expect(legacy).toMatchObject({ id: 'alias-legacy', aliases: ['old', 'older'] });
    expect((await api('PATCH', '/models/alias-legacy', admin, { priority: 2 })).statusCode).toBe(200);
    expect((await api('PATCH', '/models/alias-legacy', admin, { aliases: legacy.aliases })).statusCode).toBe(200);
    for (const id of ['alias-keeper', 'alias-legacy', 'gpt-4.1']) expect((await api('DELETE', `/models/${id}`, admin)).statusCode).toBe(200);
    expect((await api('POST', '/models', admin, { id: 'gpt-4.1' })).statusCode).toBe(200);
  });

  it("refuses a new model whose id is another model's alias, and a hidden built-in brought back while another model holds its alias (422)", async () => {
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'alias-holder', aliases: ['quick'] })).statusCode).toBe(200);
    const shadowing = await api('POST', '/models', admin, { ...CUSTOM, id: 'quick' });
    expect(expectValidationError(shadowing, ['body', 'id']).detail[0]!.msg).toBe('"quick" is already an alias of model "alias-holder"');
    expect((await api('GET', '/models/quick', user.headers)).json<ModelBody>().id).toBe('alias-holder');
    // While gpt-4.1-mini is hidden its alias is free; taken, the built-in comes back only with aliases of its own.
    expect((await api('DELETE', '/models/gpt-4.1-mini', admin)).statusCode).toBe(200);
    expect((await api('PATCH', '/models/alias-holder', admin, { aliases: ['quick', 'gpt-4.1-mini-2025-04-14'] })).statusCode).toBe(200);
    const back = await api('POST', '/models', admin, { id: 'gpt-4.1-mini' });
    expect(expectValidationError(back, ['body', 'id']).detail[0]!.msg).toBe('Its built-in alias "gpt-4.1-mini-2025-04-14" is already an alias of model "alias-holder"');
    expect((await api('POST', '/models', admin, { id: 'gpt-4.1-mini', aliases: [] })).statusCode).toBe(200);
    expect((await api('GET', '/models/gpt-4.1-mini-2025-04-14', user.headers)).json<ModelBody>().id).toBe('alias-holder');
    expect((await api('DELETE', '/models/alias-holder', admin)).statusCode).toBe(200);
    expect((await api('PATCH', '/models/gpt-4.1-mini', admin, { aliases: ['gpt-4.1-mini-2025-04-14'] })).statusCode).toBe(200);
  });

  it('an alias two models claim (rows from before aliases were checked) stays with the older one when the other is written', async () => {
    const pricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' };
    // A second apart: PGlite's clock counts milliseconds, and two rows of one millisecond would be ordered by model_id.
    const now = Date.now();
    for (const [i, model_id] of ['claim-older', 'claim-newer'].entries()) {
      await ctx.database.db.insert(modelOverrides).values({ model_id, provider: 'openai', pricing, aliases: ['claimed-twice'], deleted: false, created_at: new Date(now - 2000 + i * 1000) });
    }
    await refreshModels(ctx.app.models, ctx.database.db, ctx.app.settings, ctx.app.log);
    for (const id of ['claim-older', 'claim-newer', 'claim-older']) {
      expect((await api('PATCH', `/models/${id}`, admin, { priority: 3 })).statusCode).toBe(200);
      expect((await api('GET', '/models/claimed-twice', user.headers)).json<ModelBody>().id).toBe('claim-older');
    }
    for (const id of ['claim-newer', 'claim-older']) expect((await api('DELETE', `/models/${id}`, admin)).statusCode).toBe(200);
  });

  it('refuses with 409 to delete a model that others name as a fallback (by id or alias), and deletes it once none does', async () => {
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'stand-in', aliases: ['stand-in-alias'] })).statusCode).toBe(200);
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'leaning', aliases: [], fallbacks: ['stand-in'] })).statusCode).toBe(200);
    expect((await api('PATCH', '/models/gpt-4.1', admin, { fallbacks: ['stand-in-alias'] })).statusCode).toBe(200);

    const refused = await api('DELETE', '/models/stand-in-alias', admin);
    expect(refused.statusCode, refused.body).toBe(409);
    expect(refused.json()).toEqual({ detail: 'Model stand-in is a fallback of models gpt-4.1, leaning: remove it from their fallbacks first' });
    expect((await api('GET', '/models/stand-in', user.headers)).statusCode).toBe(200);
    // The fallbacks still name a model the catalog knows: a change of capabilities is checked against it, and passes.
    expect((await api('PATCH', '/models/leaning', admin, { capabilities: ['chat', 'tools'] })).statusCode).toBe(200);

    expect((await api('PATCH', '/models/gpt-4.1', admin, { fallbacks: [] })).statusCode).toBe(200);
    expect((await api('DELETE', '/models/leaning', admin)).statusCode).toBe(200);
    expect((await api('DELETE', '/models/stand-in', admin)).statusCode).toBe(200);
  });

  it("refuses with 409 a PATCH that would break another model's fallback (an alias it names dropped, a capability it needs removed), naming the dependents", async () => {
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'kept-in', aliases: ['kept-in-alias'] })).statusCode).toBe(200);
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'leaning-on', aliases: [], fallbacks: ['kept-in-alias'] })).statusCode).toBe(200);
    expect((await api('PATCH', '/models/gpt-4.1', admin, { fallbacks: ['kept-in'] })).statusCode).toBe(200);

    const dropped = await api('PATCH', '/models/kept-in', admin, { aliases: ['another-name'] });
    expect(dropped.statusCode, dropped.body).toBe(409);
    expect(dropped.json()).toEqual({ detail: 'Model kept-in is a fallback of model leaning-on: after this change "kept-in-alias" would name no model; remove it from their fallbacks first' });
    expect((await api('GET', '/models/kept-in-alias', user.headers)).json<ModelBody>()).toMatchObject({ id: 'kept-in', aliases: ['kept-in-alias'] });
    const unable = await api('PATCH', '/models/kept-in-alias', admin, { capabilities: ['embedding'] });
    expect(unable.statusCode, unable.body).toBe(409);
    expect(unable.json()).toEqual({ detail: 'Model kept-in is a fallback of models gpt-4.1, leaning-on: after this change it would lack chat; remove it from their fallbacks first' });
    expect((await api('GET', '/models/kept-in', user.headers)).json<ModelBody>().capabilities).toEqual(['chat']);
    // A built-in's pinned snapshot named as a fallback: dropping that alias breaks it too.
    expect((await api('PATCH', '/models/leaning-on', admin, { fallbacks: ['kept-in-alias', 'gpt-4.1-nano-2025-04-14'] })).statusCode).toBe(200);
    const snapshot = await api('PATCH', '/models/gpt-4.1-nano', admin, { aliases: [] });
    expect(snapshot.statusCode, snapshot.body).toBe(409);
    expect(snapshot.json()).toEqual({ detail: 'Model gpt-4.1-nano is a fallback of model leaning-on: after this change "gpt-4.1-nano-2025-04-14" would name no model; remove it from their fallbacks first' });

    // What keeps every fallback standing passes: another alias, more capabilities, other fields.
    expect((await api('PATCH', '/models/kept-in', admin, { aliases: ['kept-in-alias', 'another-name'], capabilities: ['chat', 'tools'], priority: 5 })).statusCode).toBe(200);
    // Once the dependents name it otherwise (or not at all), the change passes.
    expect((await api('PATCH', '/models/leaning-on', admin, { fallbacks: ['kept-in'] })).statusCode).toBe(200);
    expect((await api('PATCH', '/models/kept-in', admin, { aliases: [] })).statusCode).toBe(200);
    for (const id of ['gpt-4.1', 'leaning-on']) expect((await api('PATCH', `/models/${id}`, admin, { fallbacks: [] })).statusCode).toBe(200);
    expect((await api('PATCH', '/models/kept-in', admin, { capabilities: ['embedding'] })).statusCode).toBe(200);
    for (const id of ['leaning-on', 'kept-in']) expect((await api('DELETE', `/models/${id}`, admin)).statusCode).toBe(200);
    expect((await api('PATCH', '/models/gpt-4.1-nano', admin, { aliases: ['gpt-4.1-nano-2025-04-14'] })).statusCode).toBe(200);
  });

  it('disables a model that others name as a fallback (their calls skip it until it is enabled again), with a warning naming them', async () => {
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'resting', aliases: [] })).statusCode).toBe(200);
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'relying', aliases: [], fallbacks: ['resting'] })).statusCode).toBe(200);
    logs.clear();
    const disabled = await api('PATCH', '/models/resting', admin, { enabled: false });
    expect(disabled.statusCode, disabled.body).toBe(200);
    expect(logs.lines().filter((line) => line.level === LEVEL.warn).map(({ model, dependents, msg }) => ({ model, dependents, msg }))).toEqual([
      { model: 'resting', dependents: ['relying'], msg: 'Model disabled while other models name it as a fallback: their calls skip it until it is enabled again' },
    ]);
    expect((await api('GET', '/models/relying', user.headers)).json<ModelBody>().fallbacks).toEqual(['resting']);
    // Disabled, it still stands in as far as the catalog goes: a dependent's change is checked against it and passes.
    expect((await api('PATCH', '/models/relying', admin, { capabilities: ['chat', 'tools'] })).statusCode).toBe(200);
    logs.clear();
    expect((await api('PATCH', '/models/resting', admin, { enabled: true })).statusCode).toBe(200);
    expect(logs.lines().filter((line) => line.level === LEVEL.warn)).toEqual([]);
    expect((await api('PATCH', '/models/relying', admin, { fallbacks: [] })).statusCode).toBe(200);
    for (const id of ['relying', 'resting']) expect((await api('DELETE', `/models/${id}`, admin)).statusCode).toBe(200);
  });

  it('says in a model\'s view, and in the answer to its write, which of its fallbacks its calls skip as things stand and why (a provider without credentials or disabled, a disabled model): taken, since those may change later', async () => {
    const provider = async (body: Record<string, unknown>) => {
      const response = await api('POST', '/providers', admin, body);
      expect(response.statusCode, response.body).toBe(200);
      return response.json<{ id: string }>().id;
    };
    await provider({ name: 'fb-keyless', kind: 'anthropic' });
    const local = await provider({ name: 'fb-local', kind: 'openai-compatible', base_url: 'http://127.0.0.1:8449/v1' });
    for (const [id, on, enabled] of [['fb-claude', 'fb-keyless', true], ['fb-llama', 'fb-local', true], ['fb-resting', 'fb-local', false]] as const) {
      expect((await api('POST', '/models', admin, { ...CUSTOM, id, aliases: [], provider: on, enabled })).statusCode).toBe(200);
    }
    const created = await api('POST', '/models', admin, { ...CUSTOM, id: 'fb-leaning', aliases: [], provider: 'fb-local', fallbacks: ['fb-claude', 'fb-llama', 'fb-resting'] });
    expect(created.statusCode, created.body).toBe(200);
    expect(created.json<ModelBody>()).toMatchObject({
      available: true,
      unavailable_fallbacks: [
        { name: 'fb-claude', reason: 'Provider fb-keyless has no api_key' },
        { name: 'fb-resting', reason: 'Model fb-resting is disabled' },
      ],
    });
    // What changes after the write shows in the view as it is read.
    expect((await api('PATCH', `/providers/${local}`, admin, { enabled: false })).statusCode).toBe(200);
    expect((await api('GET', '/models/fb-leaning', user.headers)).json<ModelBody>().unavailable_fallbacks).toEqual([
      { name: 'fb-claude', reason: 'Provider fb-keyless has no api_key' },
      { name: 'fb-llama', reason: 'Provider fb-local is disabled' },
      { name: 'fb-resting', reason: 'Model fb-resting is disabled' },
    ]);
    expect((await api('PATCH', `/providers/${local}`, admin, { enabled: true })).statusCode).toBe(200);
    const mended = await api('PATCH', '/models/fb-leaning', admin, { fallbacks: ['fb-llama'] });
    expect(mended.json<ModelBody>().unavailable_fallbacks).toEqual([]);
    // A model without fallbacks lists none.
    expect((await api('GET', '/models/fb-llama', user.headers)).json<ModelBody>().unavailable_fallbacks).toEqual([]);
    for (const id of ['fb-leaning', 'fb-claude', 'fb-llama', 'fb-resting']) expect((await api('DELETE', `/models/${id}`, admin)).statusCode).toBe(200);
  });

  it("takes two models as each other's fallbacks (a call tries one model's own fallbacks, never theirs: no loop)", async () => {
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'pair-a', aliases: [] })).statusCode).toBe(200);
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'pair-b', aliases: [], fallbacks: ['pair-a'] })).statusCode).toBe(200);
    const paired = await api('PATCH', '/models/pair-a', admin, { fallbacks: ['pair-b'] });
    expect(paired.statusCode, paired.body).toBe(200);
    expect(paired.json<ModelBody>().fallbacks).toEqual(['pair-b']);
    expect((await api('DELETE', '/models/pair-a', admin)).json()).toEqual({ detail: 'Model pair-a is a fallback of model pair-b: remove it from their fallbacks first' });
    expect((await api('PATCH', '/models/pair-b', admin, { fallbacks: [] })).statusCode).toBe(200);
    for (const id of ['pair-a', 'pair-b']) expect((await api('DELETE', `/models/${id}`, admin)).statusCode).toBe(200);
  });

  it('refuses a custom model for a provider that does not exist (404)', async () => {
    const response = await api('POST', '/models', admin, { ...CUSTOM, id: 'orphan', provider: 'nowhere' });
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual({ detail: 'Provider nowhere not found' });
  });

  it('disables a built-in model and overrides its price; include_disabled shows it', async () => {
    const patched = await api('PATCH', '/models/gpt-4.1-mini', admin, { enabled: false, pricing: { input_cost_per_million_tokens: '0.1', output_cost_per_million_tokens: '0.2' } });
    expect(patched.statusCode, patched.body).toBe(200);
    expect(patched.json()).toMatchObject({ id: 'gpt-4.1-mini', enabled: false, name: BUILTIN.name, pricing: { input_cost_per_million_tokens: '0.1', output_cost_per_million_tokens: '0.2' } });
    expect((await allModels(user.headers)).data.map((m) => m.id)).not.toContain('gpt-4.1-mini');
    const all = await allModels(user.headers, '&include_disabled=true');
    expect(all.data.find((m) => m.id === 'gpt-4.1-mini')?.enabled).toBe(false);
    expect((await api('GET', '/models/gpt-4.1-mini', user.headers)).json<ModelBody>().enabled).toBe(false);
    // A second POST of an overridden built-in: it exists.
    expect((await api('POST', '/models', admin, { id: 'gpt-4.1-mini' })).statusCode).toBe(409);
  });

  it('hides a deleted built-in until it is created again (its overrides reset)', async () => {
    const id = 'gpt-4.1-nano';
    expect((await api('PATCH', `/models/${id}`, admin, { priority: 999 })).statusCode).toBe(200);
    expect((await api('DELETE', `/models/${id}`, admin)).statusCode).toBe(200);
    expect((await api('GET', `/models/${id}`, user.headers)).statusCode).toBe(404);
    expect((await allModels(user.headers, '&include_disabled=true')).data.map((m) => m.id)).not.toContain(id);
    expect((await api('PATCH', `/models/${id}`, admin, { enabled: true })).statusCode).toBe(404);

    const restored = await api('POST', '/models', admin, { id });
    expect(restored.statusCode, restored.body).toBe(200);
    expect(restored.json<ModelBody>().priority).toBe(loadBuiltinModels().find((m) => m.id === id)!.priority);
  });
});

describe('superuser changes at once (one lock; the rows checked are read under it)', () => {
  const statuses = (answers: { statusCode: number }[]) => answers.map((answer) => answer.statusCode).sort();

  it('of two models created at once claiming one alias, one is created and the other refused (422), each time', async () => {
    for (let round = 0; round < 6; round++) {
      const alias = `raced-alias-${round}`;
      const ids = [`race-a-${round}`, `race-b-${round}`];
      const answers = await Promise.all(ids.map((id) => api('POST', '/models', admin, { ...CUSTOM, id, aliases: [alias] })));
      expect(statuses(answers), answers.map((answer) => answer.body).join('\n')).toEqual([200, 422]);
      const winner = ids[answers.findIndex((answer) => answer.statusCode === 200)]!;
      expect((await api('GET', `/models/${alias}`, user.headers)).json<ModelBody>().id).toBe(winner);
      const rows = await ctx.database.db.select().from(modelOverrides);
      expect(rows.filter((row) => row.aliases?.includes(alias)).map((row) => row.model_id)).toEqual([winner]);
      expect((await api('DELETE', `/models/${winner}`, admin)).statusCode).toBe(200);
    }
  });

  it('of two models changed at once to take one alias, one takes it; a model deleted while another names it as a fallback stays or the fallback is refused', async () => {
    for (const id of ['race-left', 'race-right', 'race-stand-in', 'race-leaning']) {
      expect((await api('POST', '/models', admin, { ...CUSTOM, id, aliases: [] })).statusCode).toBe(200);
    }
    for (let round = 0; round < 6; round++) {
      const alias = `raced-patch-${round}`;
      const answers = await Promise.all(['race-left', 'race-right'].map((id) => api('PATCH', `/models/${id}`, admin, { aliases: [alias] })));
      expect(statuses(answers), answers.map((answer) => answer.body).join('\n')).toEqual([200, 422]);
      const rows = await ctx.database.db.select().from(modelOverrides);
      expect(rows.filter((row) => row.aliases?.includes(alias))).toHaveLength(1);
    }
    for (let round = 0; round < 6; round++) {
      const [deleted, leaning] = await Promise.all([
        api('DELETE', '/models/race-stand-in', admin),
        api('PATCH', '/models/race-leaning', admin, { fallbacks: ['race-stand-in'] }),
      ]);
      // Either the fallback was written first (the delete is refused) or the model is gone first (the fallback is unknown).
      expect([deleted.statusCode, leaning.statusCode], `${deleted.body}\n${leaning.body}`).toEqual(deleted.statusCode === 409 ? [409, 200] : [200, 422]);
      const [row] = await ctx.database.db.select().from(modelOverrides).where(eq(modelOverrides.model_id, 'race-leaning'));
      expect(row!.fallbacks ?? []).toEqual(deleted.statusCode === 409 ? ['race-stand-in'] : []);
      expect((await api('PATCH', '/models/race-leaning', admin, { fallbacks: [] })).statusCode).toBe(200);
      if (deleted.statusCode === 200) expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'race-stand-in', aliases: [] })).statusCode).toBe(200);
    }
    for (const id of ['race-left', 'race-right', 'race-stand-in', 'race-leaning']) expect((await api('DELETE', `/models/${id}`, admin)).statusCode).toBe(200);
  });

  it('an alias dropped while another model takes it as a fallback: one wins, never a fallback naming nothing', async () => {
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'race-named', aliases: [] })).statusCode).toBe(200);
    expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'race-naming', aliases: [] })).statusCode).toBe(200);
    for (let round = 0; round < 6; round++) {
      const alias = `race-named-${round}`;
      expect((await api('PATCH', '/models/race-named', admin, { aliases: [alias] })).statusCode).toBe(200);
      const [dropped, named] = await Promise.all([api('PATCH', '/models/race-named', admin, { aliases: [] }), api('PATCH', '/models/race-naming', admin, { fallbacks: [alias] })]);
      // The fallback first: the alias stays (409); the alias dropped first: the fallback is unknown (422).
      expect([dropped.statusCode, named.statusCode], `${dropped.body}\n${named.body}`).toEqual(dropped.statusCode === 409 ? [409, 200] : [200, 422]);
      const [row] = await ctx.database.db.select().from(modelOverrides).where(eq(modelOverrides.model_id, 'race-named'));
      expect(row!.aliases).toEqual(dropped.statusCode === 409 ? [alias] : []);
      expect((await api('PATCH', '/models/race-naming', admin, { fallbacks: [] })).statusCode).toBe(200);
    }
    for (const id of ['race-naming', 'race-named']) expect((await api('DELETE', `/models/${id}`, admin)).statusCode).toBe(200);
  });

  it('a node whose catalog is stale checks the rows as they are: it refuses an alias another node gave away a moment ago', async () => {
    const other = await buildTestApp(ctx.database);
    try {
      const otherAdmin = await superuserHeaders(other);
      // Seen by the other node before the change (its catalog then misses what this one writes).
      expect((await call(other, 'GET', '/models/stale-claim', otherAdmin)).statusCode).toBe(404);
      expect((await api('POST', '/models', admin, { ...CUSTOM, id: 'stale-first', aliases: ['stale-claim'] })).statusCode).toBe(200);
      const refused = await call(other, 'POST', '/models', otherAdmin, { ...CUSTOM, id: 'stale-second', aliases: ['stale-claim'] });
      expect(expectValidationError(refused, ['body', 'aliases', 0]).detail[0]!.msg).toBe('"stale-claim" is already an alias of model "stale-first"');
      expect((await ctx.database.db.select().from(modelOverrides).where(eq(modelOverrides.model_id, 'stale-second')))).toEqual([]);
    } finally {
      await other.close();
    }
    expect((await api('DELETE', '/models/stale-first', admin)).statusCode).toBe(200);
  });
});
