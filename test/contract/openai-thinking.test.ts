/**
 * OpenAI's `reasoning_effort`, `parallel_tool_calls` and JSON mode for Anthropic and Google models through the
 * gateway, as the official `openai` package sends them: what reaches the provider (the fake model
 * server speaks Anthropic's Messages API and Google's generateContent as far as the AI SDK reads
 * them), what comes back, what is charged, and what a call holds with billing on.
 */
import type { AddressInfo } from 'node:net';

import { eq } from 'drizzle-orm';
import OpenAI from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { usageRecords } from '../../src/models/index.js';

import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer, type LoggedRequest, type ScriptedReply } from '../helpers/fake-model-server.js';
import { apiOf, createKey, eventually } from '../helpers/http.js';
import { apiError } from '../helpers/openai.js';

/** Holds per call (no credit windows: an account's `reserved` is then what its calls in flight hold), usage written soon after. */
const ctx = useTestApp({ MODEL_MAX_RETRIES: '0', BILLING_ENABLED: 'true', BILLING_CREDIT_WINDOW_CALLS: '0', USAGE_FLUSH_INTERVAL_MS: '20' });
const api = apiOf(ctx);

/** Reasoning priced above text: a hold counts every output token as reasoning (estimateCost). */
const PRICING = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '2', reasoning_cost_per_million_tokens: '4' };
const MAX_TOKENS = 1000;
/** The output cap of the catalog's capped models (PROVIDERS' `capped`). */
const CAP = 8192;
const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Why is the sky blue?' }];
const tools: OpenAI.ChatCompletionTool[] = [{ type: 'function', function: { name: 'lookup', description: 'Looks a word up', parameters: { type: 'object', properties: { word: { type: 'string' } }, required: ['word'] } } }];
const THOUGHT: ScriptedReply = { reasoning: 'Rayleigh scattering.', text: 'Short waves scatter most.', usage: { prompt_tokens: 10, completion_tokens: 50, reasoning_tokens: 30 } };
/** THOUGHT's usage at PRICING: 10 in at 1, 20 text out at 2, 30 reasoning at 4, per million. */
const THOUGHT_COST = 0.00017;

/** Each provider kind, its model that reasons and one that does not, and where a request's thinking and answer limit are. */
const PROVIDERS = [
  {
    kind: 'anthropic',
    reasons: 'th-claude',
    plain: 'th-claude-plain',
    capped: 'th-claude-capped',
    thinking: (r: LoggedRequest) => r.body.thinking,
    budget: (r: LoggedRequest) => (r.body.thinking as { budget_tokens?: number } | undefined)?.budget_tokens,
    maxTokens: (r: LoggedRequest) => r.body.max_tokens,
  },
  {
    kind: 'google',
    reasons: 'th-gemini',
    plain: 'th-gemini-plain',
    capped: 'th-gemini-capped',
    thinking: (r: LoggedRequest) => (r.body.generationConfig as Record<string, unknown>).thinkingConfig,
    budget: (r: LoggedRequest) => ((r.body.generationConfig as Record<string, unknown>).thinkingConfig as { thinkingBudget?: number } | undefined)?.thinkingBudget,
    maxTokens: (r: LoggedRequest) => (r.body.generationConfig as Record<string, unknown>).maxOutputTokens,
  },
] as const;

const reservedOf = async (owner: TestUser) => Number((await api('GET', '/billing/balance', owner.headers)).json<{ reserved: string }>().reserved);

/** What `owner`'s account holds while the call `make` starts is with the provider (its answer delayed, `reply` or text); released once it has settled. */
async function heldDuring(owner: TestUser, model: string, make: () => Promise<unknown>, reply: ScriptedReply = { text: 'Blue.', usage: { prompt_tokens: 5, completion_tokens: 2 } }): Promise<number> {
  fake.script(model, { ...reply, chunkDelayMs: 300 });
  const call = make();
  await fake.waitFor((log) => log.length > 0);
  const reserved = await reservedOf(owner);
  await call;
  await eventually(async () => (await reservedOf(owner)) === 0);
  fake.reset();
  return reserved;
}

let fake: FakeModelServer;
let admin: Record<string, string>;
let user: TestUser;
let client: OpenAI;
let baseURL: string;

const clientWith = (apiKey: string) => new OpenAI({ apiKey, baseURL, maxRetries: 0 });

async function grant(owner: TestUser, amount: string): Promise<void> {
  expect((await api('POST', '/billing/credits', admin, { user_id: owner.user.id, amount, description: 'test credits' })).statusCode).toBe(200);
}

/** The usage records of `owner`'s calls once `count` are written (settled off the caller's path). */
async function usageOf(owner: TestUser, count: number) {
  const read = () => ctx.app.db.select().from(usageRecords).where(eq(usageRecords.owner_id, owner.user.id));
  await eventually(async () => (await read()).length >= count);
  return read();
}

beforeAll(async () => {
  fake = await FakeModelServer.start();
  await ctx.app.listen({ host: '127.0.0.1', port: 0 });
  baseURL = `http://127.0.0.1:${(ctx.app.server.address() as AddressInfo).port}/v1`;
  admin = await superuserHeaders(ctx.app);
  for (const { kind, reasons, plain, capped } of PROVIDERS) {
    const provider = `th-${kind}`;
    const created = await api('POST', '/providers', admin, { name: provider, kind, base_url: fake.url, api_key: `sk-${kind}` });
    expect(created.statusCode, created.body).toBe(200);
    for (const [id, capabilities, max_output_tokens] of [
      [reasons, ['chat', 'tools', 'reasoning'], null],
      [plain, ['chat', 'tools'], null],
      [capped, ['chat', 'tools', 'reasoning'], CAP],
    ] as const) {
      const model = await api('POST', '/models', admin, { id, provider, pricing: PRICING, capabilities, max_output_tokens });
      expect(model.statusCode, model.body).toBe(200);
    }
  }
  // An OpenAI-style model that falls back to the Anthropic one.
  expect((await api('POST', '/providers', admin, { name: 'th-compatible', kind: 'openai-compatible', base_url: fake.url, api_key: 'sk-compatible' })).statusCode).toBe(200);
  expect((await api('POST', '/models', admin, { id: 'th-falls-to-claude', provider: 'th-compatible', pricing: PRICING, capabilities: ['chat', 'reasoning'], fallbacks: ['th-claude'] })).statusCode).toBe(200);
  user = await createUser(ctx.app);
  await grant(user, '1000');
  client = clientWith((await createKey(ctx.app, user)).key);
});
afterAll(async () => {
  await fake.close();
});
beforeEach(() => fake.reset());

describe('reasoning_effort on Anthropic and Google models that reason', () => {
  it('turns on the provider\'s thinking with the effort\'s budget; the thinking comes back as reasoning_content, its tokens charged at the reasoning price', async () => {
    const expected = {
      anthropic: { thinking: { type: 'enabled', budget_tokens: 2048 }, maxTokens: MAX_TOKENS + 2048 },
      // Gemini counts thoughts within maxOutputTokens: it makes room for them as Anthropic's max_tokens does.
      google: { thinking: { thinkingBudget: 2048, includeThoughts: true }, maxTokens: MAX_TOKENS + 2048 },
    };
    for (const { kind, reasons, thinking, maxTokens } of PROVIDERS) {
      fake.script(reasons, THOUGHT);
      // Thinking forbids Anthropic's temperature: left out, not an upstream 400.
      const completion = await client.chat.completions.create({ model: reasons, messages, max_tokens: MAX_TOKENS, reasoning_effort: 'medium', temperature: 0.5 });
      const sent = fake.requestsFor(reasons)[0]!;
      expect(thinking(sent), kind).toEqual(expected[kind].thinking);
      expect(maxTokens(sent), kind).toBe(expected[kind].maxTokens);
      if (kind === 'anthropic') expect(sent.body).not.toHaveProperty('temperature');
      const message = completion.choices[0]!.message as OpenAI.ChatCompletionMessage & { reasoning_content?: string };
      expect(message.content, kind).toBe(THOUGHT.text);
      expect(message.reasoning_content, kind).toBe(THOUGHT.reasoning);
      expect(completion.usage, kind).toMatchObject({ prompt_tokens: 10, completion_tokens: 50, completion_tokens_details: { reasoning_tokens: 30 } });
    }
    const rows = await usageOf(user, 2);
    expect(rows.map((r) => [r.model, r.status, r.output_tokens, r.reasoning_tokens, Number(r.cost)]).sort()).toEqual([
      ['th-claude', 'success', 50, 30, THOUGHT_COST],
      ['th-gemini', 'success', 50, 30, THOUGHT_COST],
    ]);
  });

  it('streams the thinking as reasoning_content deltas before the text, with the reasoning tokens in the usage chunk', async () => {
    for (const { kind, reasons, thinking, maxTokens } of PROVIDERS) {
      fake.script(reasons, THOUGHT);
      const stream = await client.chat.completions.create({ model: reasons, messages, max_tokens: MAX_TOKENS, reasoning_effort: 'high', stream: true, stream_options: { include_usage: true } });
      let reasoning = '';
      let text = '';
      let usage: OpenAI.CompletionUsage | null | undefined;
      for await (const chunk of stream) {
        // The reasoning is a field of the delta the client's types do not name.
        const delta: { content?: string | null; reasoning_content?: string } | undefined = chunk.choices[0]?.delta;
        if (delta?.reasoning_content) {
          expect(text, kind).toBe('');
          reasoning += delta.reasoning_content;
        }
        text += delta?.content ?? '';
        usage = chunk.usage ?? usage;
      }
      expect([reasoning, text], kind).toEqual([THOUGHT.reasoning, THOUGHT.text]);
      expect(usage, kind).toMatchObject({ completion_tokens: 50, completion_tokens_details: { reasoning_tokens: 30 } });
      const sent = fake.requestsFor(reasons)[0]!;
      expect(sent.stream, kind).toBe(true);
      expect(thinking(sent), kind).toMatchObject(kind === 'anthropic' ? { budget_tokens: 4096 } : { thinkingBudget: 4096 });
      expect(maxTokens(sent), kind).toBe(MAX_TOKENS + 4096);
    }
  });

  it('asks for no thinking for the efforts that ask for none, nor of a model without the reasoning capability: the call answers all the same', async () => {
    const calls = PROVIDERS.flatMap((p) => [
      { ...p, model: p.reasons, effort: 'none' as const },
      { ...p, model: p.reasons, effort: 'minimal' as const },
      { ...p, model: p.plain, effort: 'high' as const },
    ]);
    for (const { kind, model, effort, thinking, maxTokens } of calls) {
      fake.reset();
      fake.script(model, { text: 'Blue.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
      const completion = await client.chat.completions.create({ model, messages, max_tokens: MAX_TOKENS, reasoning_effort: effort });
      expect(completion.choices[0]!.message.content, `${model} ${effort}`).toBe('Blue.');
      const sent = fake.requestsFor(model)[0]!;
      expect(thinking(sent), `${kind} ${model} ${effort}`).toBeUndefined();
      expect(maxTokens(sent), `${model} ${effort}`).toBe(MAX_TOKENS);
    }
  });

  it('is told each model of a fallback chain its own way: the effort to an OpenAI-style one, a thinking budget to the Anthropic one after it', async () => {
    fake.script('th-falls-to-claude', { status: 500 });
    fake.script('th-claude', THOUGHT);
    const completion = await client.chat.completions.create({ model: 'th-falls-to-claude', messages, max_tokens: MAX_TOKENS, reasoning_effort: 'low' });
    expect(completion.model).toBe('th-claude');
    expect(fake.log.map((r) => [r.path, r.body.reasoning_effort, r.body.thinking])).toEqual([
      ['/v1/chat/completions', 'low', undefined],
      ['/v1/messages', undefined, { type: 'enabled', budget_tokens: 1024 }],
    ]);
  });

  it('refuses an effort OpenAI does not name with 400 before anything is sent', async () => {
    for (const { reasons } of PROVIDERS) {
      const refused = await apiError(client.chat.completions.create({ model: reasons, messages, reasoning_effort: 'extreme' as OpenAI.ReasoningEffort }));
      expect(refused.status).toBe(400);
      expect(refused.message).toContain('reasoning_effort');
    }
    expect(fake.log).toEqual([]);
  });
});

describe('reasoning_effort on an Anthropic call that cannot think', () => {
  const lookup = { id: 'toolu_1', type: 'function' as const, function: { name: 'lookup', arguments: '{"word":"sky"}' } };
  const toolLoop: OpenAI.ChatCompletionMessageParam[] = [...messages, { role: 'assistant', content: null, tool_calls: [lookup] }, { role: 'tool', tool_call_id: lookup.id, content: 'The air above.' }];
  const prefill: OpenAI.ChatCompletionMessageParam[] = [...messages, { role: 'assistant', content: 'Because' }];

  it('sends no thinking in a tool loop (the last assistant message calls tools) nor after a prefill, and holds none: Anthropic would want the signed thinking the client cannot send back', async () => {
    for (const conversation of [toolLoop, prefill]) {
      const base = { model: 'th-claude', messages: conversation, tools, max_tokens: MAX_TOKENS };
      const without = await heldDuring(user, 'th-claude', () => client.chat.completions.create(base));
      const held = await heldDuring(user, 'th-claude', () => client.chat.completions.create({ ...base, reasoning_effort: 'high' }));
      fake.script('th-claude', { text: 'Blue.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
      await client.chat.completions.create({ ...base, reasoning_effort: 'high' });
      const sent = fake.requestsFor('th-claude')[0]!.body;
      expect(sent.thinking, conversation.at(-1)!.role).toBeUndefined();
      expect(sent.max_tokens).toBe(MAX_TOKENS);
      expect(held).toBe(without);
      fake.reset();
    }
  });

  it('sends no thinking with a forced tool choice, and holds none: under thinking the SDK model would relax it to auto, and an answer without the call fail after it was billed', async () => {
    const forced = [
      { choice: 'required' as const, sent: { type: 'any' } },
      { choice: { type: 'function' as const, function: { name: 'lookup' } }, sent: { type: 'tool', name: 'lookup' } },
    ];
    const reply: ScriptedReply = { toolCalls: [{ id: lookup.id, name: 'lookup', arguments: lookup.function.arguments }], usage: { prompt_tokens: 20, completion_tokens: 8 } };
    for (const { choice, sent } of forced) {
      const base = { model: 'th-claude', messages, tools, tool_choice: choice, max_tokens: MAX_TOKENS };
      const without = await heldDuring(user, 'th-claude', () => client.chat.completions.create(base), reply);
      const held = await heldDuring(user, 'th-claude', () => client.chat.completions.create({ ...base, reasoning_effort: 'high' }), reply);
      fake.script('th-claude', reply);
      const completion = await client.chat.completions.create({ ...base, reasoning_effort: 'high' });
      expect(completion.choices[0]!.message.tool_calls).toMatchObject([{ function: { name: 'lookup' } }]);
      const body = fake.requestsFor('th-claude')[0]!.body;
      expect(body.thinking, sent.type).toBeUndefined();
      expect(body.tool_choice, sent.type).toMatchObject(sent);
      expect(held, sent.type).toBe(without);
      fake.reset();
    }
  });

  it('sends no thinking with a response schema the SDK model asks for through its forced json tool, and holds none; a schema sent as Anthropic\'s structured output keeps the thinking', async () => {
    // An id the SDK model reads as Claude Sonnet 4.5's, which takes output_config.format (th-claude it knows not).
    const known = 'th-claude-sonnet-4-5';
    expect((await api('POST', '/models', admin, { id: known, provider: 'th-anthropic', pricing: PRICING, capabilities: ['chat', 'reasoning'] })).statusCode).toBe(200);
    const closed = { type: 'object', properties: { color: { type: 'string' } }, required: ['color'], additionalProperties: false };
    // An open object: output_config.format cannot hold it, so the SDK takes the json tool for a known id too.
    const open = { type: 'object', additionalProperties: { type: 'string' } };
    const asTool: ScriptedReply = { toolCalls: [{ id: 'toolu_json', name: 'json', arguments: '{"color":"blue"}' }], usage: { prompt_tokens: 20, completion_tokens: 8 } };
    for (const [model, schema] of [['th-claude', closed], [known, open]] as const) {
      const base = { model, messages, max_tokens: MAX_TOKENS, response_format: { type: 'json_schema' as const, json_schema: { name: 'color', schema } } };
      const without = await heldDuring(user, model, () => client.chat.completions.create(base), asTool);
      const held = await heldDuring(user, model, () => client.chat.completions.create({ ...base, reasoning_effort: 'high' }), asTool);
      fake.script(model, asTool);
      const completion = await client.chat.completions.create({ ...base, reasoning_effort: 'high' });
      expect(JSON.parse(completion.choices[0]!.message.content!), model).toEqual({ color: 'blue' });
      const body = fake.requestsFor(model)[0]!.body;
      expect(body.thinking, model).toBeUndefined();
      expect(body.tools, model).toMatchObject([{ name: 'json' }]);
      expect(body.tool_choice, model).toMatchObject({ type: 'any' });
      expect(held, model).toBe(without);
      fake.reset();
    }
    fake.script(known, { text: '{"color":"blue"}', usage: { prompt_tokens: 20, completion_tokens: 8 } });
    await client.chat.completions.create({ model: known, messages, max_tokens: MAX_TOKENS, reasoning_effort: 'high', response_format: { type: 'json_schema', json_schema: { name: 'color', schema: closed } } });
    const body = fake.requestsFor(known)[0]!.body;
    expect(body.thinking).toEqual({ type: 'enabled', budget_tokens: 4096 });
    expect(body.output_config).toMatchObject({ format: { type: 'json_schema' } });
    expect(body).not.toHaveProperty('tools');
  });

  it('thinks again once the tool loop has ended in an answer; Google\'s thinking goes on in a tool loop (Gemini needs no thoughts sent back)', async () => {
    const after: OpenAI.ChatCompletionMessageParam[] = [...toolLoop, { role: 'assistant', content: 'The air scatters blue.' }, { role: 'user', content: 'Why blue?' }];
    for (const [model, conversation] of [['th-claude', after], ['th-gemini', toolLoop]] as const) {
      fake.script(model, THOUGHT);
      await client.chat.completions.create({ model, messages: conversation, tools, max_tokens: MAX_TOKENS, reasoning_effort: 'low' });
      const { thinking } = PROVIDERS.find((p) => p.reasons === model)!;
      expect(thinking(fake.requestsFor(model)[0]!), model).toMatchObject(model === 'th-claude' ? { budget_tokens: 1024 } : { thinkingBudget: 1024 });
    }
  });
});

describe('reasoning_effort on a Claude model that thinks only adaptively', () => {
  it('sends adaptive thinking with the effort itself, each effort its own, and holds the call\'s maximum alone: that thinking counts within max_tokens', async () => {
    // An id the Anthropic SDK model reads as Claude Opus 5.5's, which refuses a thinking budget.
    const model = 'th-claude-opus-5-5';
    expect((await api('POST', '/models', admin, { id: model, provider: 'th-anthropic', pricing: PRICING, capabilities: ['chat', 'reasoning'] })).statusCode).toBe(200);
    const base = { model, messages, max_tokens: MAX_TOKENS };
    const without = await heldDuring(user, model, () => client.chat.completions.create(base));
    for (const effort of ['low', 'high', 'max'] as const) {
      const held = await heldDuring(user, model, () => client.chat.completions.create({ ...base, reasoning_effort: effort }));
      fake.script(model, THOUGHT);
      const completion = await client.chat.completions.create({ ...base, reasoning_effort: effort });
      expect((completion.choices[0]!.message as { reasoning_content?: string }).reasoning_content, effort).toBe(THOUGHT.reasoning);
      const body = fake.requestsFor(model)[0]!.body;
      expect(body.thinking, effort).toEqual({ type: 'adaptive' });
      expect(body.output_config, effort).toEqual({ effort });
      expect(body.max_tokens, effort).toBe(MAX_TOKENS);
      expect(held, effort).toBe(without);
      fake.reset();
    }
    fake.script(model, { text: 'Blue.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
    await client.chat.completions.create({ ...base, reasoning_effort: 'minimal' });
    const body = fake.requestsFor(model)[0]!.body;
    expect(body).not.toHaveProperty('thinking');
    expect(body).not.toHaveProperty('output_config');
  });
});

describe('parallel_tool_calls on Anthropic and Google models', () => {
  it('false with tools is Anthropic\'s disable_parallel_tool_use; true, or no tools, sends none; Google has none to send', async () => {
    const call = { id: 'toolu_1', name: 'lookup', arguments: '{"word":"sky"}' };
    for (const { kind, plain } of PROVIDERS) {
      fake.script(plain, { toolCalls: [call], usage: { prompt_tokens: 20, completion_tokens: 8 } });
      const completion = await client.chat.completions.create({ model: plain, messages, tools, parallel_tool_calls: false });
      expect(completion.choices[0]!.message.tool_calls, kind).toMatchObject([{ type: 'function', function: { name: 'lookup', arguments: call.arguments } }]);
      const sent = fake.requestsFor(plain)[0]!.body;
      if (kind === 'anthropic') expect(sent.tool_choice).toEqual({ type: 'auto', disable_parallel_tool_use: true });
      else expect(JSON.stringify(sent)).not.toMatch(/parallel/i);
    }
    fake.reset();
    await client.chat.completions.create({ model: 'th-claude-plain', messages, tools, parallel_tool_calls: true });
    await client.chat.completions.create({ model: 'th-claude-plain', messages, parallel_tool_calls: false });
    expect(fake.log.map((r) => JSON.stringify(r.body))).toEqual([expect.not.stringMatching(/disable_parallel_tool_use/), expect.not.stringMatching(/disable_parallel_tool_use/)]);
  });
});

describe('the credit hold of a call that thinks', () => {
  it('holds the thinking budget on top of the answer\'s max tokens, at the reasoning price; not for a model that does not reason', async () => {
    for (const { kind, reasons, plain } of PROVIDERS) {
      const base = { messages, max_tokens: MAX_TOKENS };
      const without = await heldDuring(user, reasons, () => client.chat.completions.create({ ...base, model: reasons }));
      const medium = await heldDuring(user, reasons, () => client.chat.completions.create({ ...base, model: reasons, reasoning_effort: 'medium' }));
      const high = await heldDuring(user, reasons, () => client.chat.completions.create({ ...base, model: reasons, reasoning_effort: 'high', stream: true }).then(async (s) => { for await (const chunk of s) void chunk; }));
      // The same prompt: the holds differ by the budget alone, each token at 4 per million.
      expect(without, kind).toBeGreaterThan(MAX_TOKENS * 4e-6);
      expect(medium - without, kind).toBeCloseTo(2048 * 4e-6, 12);
      expect(high - without, kind).toBeCloseTo(4096 * 4e-6, 12);
      const plainWithout = await heldDuring(user, plain, () => client.chat.completions.create({ ...base, model: plain }));
      const plainHigh = await heldDuring(user, plain, () => client.chat.completions.create({ ...base, model: plain, reasoning_effort: 'high' }));
      expect(plainHigh, kind).toBe(plainWithout);
    }
  });

  it('shrinks the budget to what the model\'s output cap leaves beside max_tokens (none under 1,024), and holds what is sent: the two as the maximum for both providers', async () => {
    // [max_tokens, effort, the budget sent]: no max_tokens is the default maximum (4,096).
    const cases = [
      [MAX_TOKENS, 'medium', 2048],
      [6000, 'max', CAP - 6000],
      [undefined, 'max', CAP - 4096],
      [7500, 'low', undefined],
    ] as const;
    for (const { kind, capped, budget, maxTokens } of PROVIDERS) {
      for (const [max_tokens, effort, expected] of cases) {
        const base = { model: capped, messages, max_tokens };
        const without = await heldDuring(user, capped, () => client.chat.completions.create(base));
        const held = await heldDuring(user, capped, () => client.chat.completions.create({ ...base, reasoning_effort: effort }));
        fake.script(capped, { text: 'Blue.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
        await client.chat.completions.create({ ...base, reasoning_effort: effort });
        const sent = fake.requestsFor(capped)[0]!;
        const label = `${kind} ${max_tokens} ${effort}`;
        expect(budget(sent), label).toBe(expected);
        expect((held - without) / 4e-6, label).toBeCloseTo(expected ?? 0, 6);
        expect(maxTokens(sent), label).toBe((max_tokens ?? 4096) + (expected ?? 0));
        fake.reset();
      }
    }
  });

  it('refuses with 402 a thinking call the balance cannot hold, before it goes upstream; the same call without thinking goes', async () => {
    const poor = await createUser(ctx.app);
    // Enough for MAX_TOKENS at 4 per million (0.004 and the prompt), not for 4,096 more tokens of thinking.
    await grant(poor, '0.01');
    const poorClient = clientWith((await createKey(ctx.app, poor)).key);
    for (const { kind, reasons } of PROVIDERS) {
      const refused = await apiError(poorClient.chat.completions.create({ model: reasons, messages, max_tokens: MAX_TOKENS, reasoning_effort: 'high' }));
      expect(refused, kind).toMatchObject({ status: 402, code: 'insufficient_quota' });
      expect(fake.log, kind).toEqual([]);
      fake.script(reasons, { text: 'Blue.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
      expect((await poorClient.chat.completions.create({ model: reasons, messages, max_tokens: MAX_TOKENS })).choices[0]!.message.content, kind).toBe('Blue.');
      fake.reset();
    }
  });
});

describe("response_format json_object (OpenAI's JSON mode) on Anthropic and Google models", () => {
  const asTool: ScriptedReply = { toolCalls: [{ id: 'toolu_json', name: 'json', arguments: '{"color":"blue"}' }], usage: { prompt_tokens: 20, completion_tokens: 8 } };
  const jsonMode = { messages, max_tokens: MAX_TOKENS, response_format: { type: 'json_object' as const } };

  it('asks Claude for any JSON object through the forced json tool (Anthropic has no JSON mode) and answers its input, plain and streamed, without thinking', async () => {
    for (const model of ['th-claude-plain', 'th-claude']) {
      fake.script(model, asTool);
      const completion = await client.chat.completions.create({ ...jsonMode, model, reasoning_effort: 'high' });
      expect(JSON.parse(completion.choices[0]!.message.content!), model).toEqual({ color: 'blue' });
      expect(completion.choices[0]!.finish_reason, model).toBe('stop');
      expect(completion.choices[0]!.message.tool_calls ?? [], model).toEqual([]);
      const body = fake.requestsFor(model)[0]!.body;
      expect(body.tools, model).toMatchObject([{ name: 'json', input_schema: { type: 'object' } }]);
      expect((body.tools as unknown[]).length, model).toBe(1);
      expect(body.tool_choice, model).toMatchObject({ type: 'any' });
      expect(body.thinking, model).toBeUndefined();
      fake.reset();
    }
    fake.script('th-claude-plain', asTool);
    const stream = await client.chat.completions.create({ ...jsonMode, model: 'th-claude-plain', stream: true });
    let text = '';
    let finish: string | null | undefined;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta.content ?? '';
      expect(chunk.choices[0]?.delta.tool_calls).toBeUndefined();
      finish = chunk.choices[0]?.finish_reason ?? finish;
    }
    expect(JSON.parse(text)).toEqual({ color: 'blue' });
    expect(finish).toBe('stop');
  });

  it('keeps the thinking of a Claude model that refuses forced tool use: the SDK model offers it the json tool as auto, thinking or not', async () => {
    // An id the Anthropic SDK model reads as Claude Sonnet 5.5's (rejectsForcedToolUse; thinks only adaptively).
    const model = 'th-claude-sonnet-5-5';
    expect((await api('POST', '/models', admin, { id: model, provider: 'th-anthropic', pricing: PRICING, capabilities: ['chat', 'reasoning'] })).statusCode).toBe(200);
    fake.script(model, asTool);
    const completion = await client.chat.completions.create({ ...jsonMode, model, reasoning_effort: 'high' });
    expect(JSON.parse(completion.choices[0]!.message.content!)).toEqual({ color: 'blue' });
    const body = fake.requestsFor(model)[0]!.body;
    expect(body.thinking).toEqual({ type: 'adaptive' });
    expect(body.tools).toMatchObject([{ name: 'json' }]);
    expect(body.tool_choice).toMatchObject({ type: 'auto' });
  });

  it("keeps the user's tools beside the json tool for Claude; sends Gemini its JSON MIME type", async () => {
    fake.script('th-claude-plain', asTool);
    await client.chat.completions.create({ ...jsonMode, model: 'th-claude-plain', tools });
    expect((fake.requestsFor('th-claude-plain')[0]!.body.tools as { name: string }[]).map((t) => t.name)).toEqual(['lookup', 'json']);
    fake.script('th-gemini-plain', { text: '{"color":"blue"}', usage: { prompt_tokens: 20, completion_tokens: 8 } });
    const completion = await client.chat.completions.create({ ...jsonMode, model: 'th-gemini-plain' });
    expect(JSON.parse(completion.choices[0]!.message.content!)).toEqual({ color: 'blue' });
    expect(fake.requestsFor('th-gemini-plain')[0]!.body.generationConfig).toMatchObject({ responseMimeType: 'application/json' });
  });
});
