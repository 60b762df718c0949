/**
 * OpenAI requests that Anthropic's Messages API or Gemini's generateContent cannot take as they
 * are, through the gateway as the official `openai` package sends them: what reaches the provider
 * (the fake model server logs every body), what the client gets back, and what is held or charged.
 * A request Keel can map is sent the way the provider takes it; one it cannot is refused before any
 * hold and any upstream call, naming the parameter.
 */
import type { AddressInfo } from 'node:net';

import { eq } from 'drizzle-orm';
import OpenAI from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { usageRecords } from '../../src/models/index.js';

import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer, type LoggedRequest } from '../helpers/fake-model-server.js';
import { apiOf, createKey, eventually } from '../helpers/http.js';
import { apiError } from '../helpers/openai.js';

const ctx = useTestApp({ MODEL_MAX_RETRIES: '0', BILLING_ENABLED: 'true', BILLING_CREDIT_WINDOW_CALLS: '0', USAGE_FLUSH_INTERVAL_MS: '20' });
const api = apiOf(ctx);

const PRICING = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '2' };
/** The output cap the catalog knows for each model here (ids the Anthropic SDK model does not know, so it clamps nothing itself). */
const CAP = 8192;

/** Each provider kind, its model, and where a request's conversation and maximum are. */
const PROVIDERS = [
  {
    kind: 'anthropic',
    model: 'pl-claude',
    system: (r: LoggedRequest) => r.body.system,
    conversation: (r: LoggedRequest) => r.body.messages,
    maxTokens: (r: LoggedRequest) => r.body.max_tokens,
  },
  {
    kind: 'google',
    model: 'pl-gemini',
    system: (r: LoggedRequest) => r.body.systemInstruction,
    conversation: (r: LoggedRequest) => r.body.contents,
    maxTokens: (r: LoggedRequest) => (r.body.generationConfig as Record<string, unknown>).maxOutputTokens,
  },
] as const;

let fake: FakeModelServer;
let admin: Record<string, string>;
let client: OpenAI;
let baseURL: string;

const reservedOf = async (owner: TestUser) => Number((await api('GET', '/billing/balance', owner.headers)).json<{ reserved: string }>().reserved);
/** A user with credits of their own and a client on their key: what they were held and charged is theirs alone. */
async function funded(): Promise<{ owner: TestUser; client: OpenAI }> {
  const owner = await createUser(ctx.app);
  expect((await api('POST', '/billing/credits', admin, { user_id: owner.user.id, amount: '1000', description: 'test credits' })).statusCode).toBe(200);
  return { owner, client: new OpenAI({ apiKey: (await createKey(ctx.app, owner)).key, baseURL, maxRetries: 0 }) };
}
/** `owner`'s usage records, read once the meter has written every call settled so far. */
async function usageCount(owner: TestUser): Promise<number> {
  await ctx.app.meter.idle();
  return (await ctx.app.db.select().from(usageRecords).where(eq(usageRecords.owner_id, owner.user.id))).length;
}

beforeAll(async () => {
  fake = await FakeModelServer.start();
  await ctx.app.listen({ host: '127.0.0.1', port: 0 });
  baseURL = `http://127.0.0.1:${(ctx.app.server.address() as AddressInfo).port}/v1`;
  admin = await superuserHeaders(ctx.app);
  for (const { kind, model } of PROVIDERS) {
    const provider = `pl-${kind}`;
    expect((await api('POST', '/providers', admin, { name: provider, kind, base_url: fake.url, api_key: `sk-${kind}` })).statusCode).toBe(200);
    const created = await api('POST', '/models', admin, { id: model, provider, pricing: PRICING, capabilities: ['chat', 'tools', 'reasoning'], max_output_tokens: CAP });
    expect(created.statusCode, created.body).toBe(200);
  }
  // An OpenAI-style model (OpenAI answers a conversation of system messages) that falls back to the Anthropic one.
  expect((await api('POST', '/providers', admin, { name: 'pl-compatible', kind: 'openai-compatible', base_url: fake.url, api_key: 'sk-compatible' })).statusCode).toBe(200);
  expect((await api('POST', '/models', admin, { id: 'pl-falls-to-claude', provider: 'pl-compatible', pricing: PRICING, capabilities: ['chat'], max_output_tokens: CAP, fallbacks: ['pl-claude'] })).statusCode).toBe(200);
  ({ client } = await funded());
});
afterAll(async () => {
  await fake.close();
});
beforeEach(() => fake.reset());

describe('a conversation without a user or assistant message that says anything', () => {
  const unanswerable: Record<string, OpenAI.ChatCompletionMessageParam[]> = {
    'only system and developer messages': [
      { role: 'system', content: 'Say hello.' },
      { role: 'developer', content: 'Be brief.' },
    ],
    'only empty messages': [
      { role: 'system', content: '' },
      { role: 'user', content: '' },
      { role: 'assistant', content: '' },
    ],
  };
  /** Blank to Anthropic (it refuses a whitespace text block), not to Gemini (which answers it). */
  const whitespaceOnly: OpenAI.ChatCompletionMessageParam[][] = [
    [
      { role: 'system', content: 'Say hello.' },
      { role: 'user', content: ' ' },
    ],
    [
      { role: 'system', content: 'Say hello.' },
      { role: 'user', content: [{ type: 'text', text: ' \n' }] },
    ],
  ];

  it('is refused for Anthropic and Google models with 400 at messages, before anything is held or sent (they refuse an empty conversation upstream)', async () => {
    const { owner, client } = await funded();
    for (const { kind, model } of PROVIDERS) {
      const cases = { ...unanswerable, ...(kind === 'anthropic' ? Object.fromEntries(whitespaceOnly.map((messages, i) => [`whitespace-only user text ${i}`, messages])) : {}) };
      for (const [name, messages] of Object.entries(cases)) {
        const refused = await apiError(client.chat.completions.create({ model, messages }), () => fake.log);
        expect(refused.status, `${kind}: ${name}`).toBe(400);
        expect(refused.error, `${kind}: ${name}`).toMatchObject({ type: 'invalid_request_error', param: 'messages', code: 'unsupported_value' });
        expect(refused.message, `${kind}: ${name}`).toMatch(new RegExp(`${model}.*user or assistant message`));
        expect(fake.log, `${kind}: ${name}`).toEqual([]);
      }
    }
    expect(await reservedOf(owner)).toBe(0);
    expect(await usageCount(owner)).toBe(0);
  });

  it('of whitespace only goes to a Google model as it is (Gemini takes whitespace text; only an empty part is none to it)', async () => {
    for (const messages of whitespaceOnly) {
      fake.script('pl-gemini', { text: 'Hello.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
      expect((await client.chat.completions.create({ model: 'pl-gemini', messages })).choices[0]!.message.content).toBe('Hello.');
      const sent = fake.requestsFor('pl-gemini')[0]!;
      const text = messages[1]!.content;
      expect(sent.body.systemInstruction).toEqual({ parts: [{ text: 'Say hello.' }] });
      expect(sent.body.contents).toEqual([{ role: 'user', parts: [{ text: typeof text === 'string' ? text : ' \n' }] }]);
      fake.reset();
    }
    // A whitespace system message too, which says nothing to either: not sent.
    const messages: OpenAI.ChatCompletionMessageParam[] = [
      { role: 'system', content: ' ' },
      { role: 'user', content: 'Hi.' },
    ];
    for (const { kind, model, system } of PROVIDERS) {
      fake.script(model, { text: 'Hello.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
      await client.chat.completions.create({ model, messages });
      expect(system(fake.requestsFor(model)[0]!), kind).toBeUndefined();
    }
    // Past the start as well: to Gemini it is no late system message (refused), it is nothing.
    fake.reset();
    fake.script('pl-gemini', { text: 'Green.', usage: { prompt_tokens: 9, completion_tokens: 2 } });
    const late: OpenAI.ChatCompletionMessageParam[] = [
      { role: 'system', content: 'Answer in one word.' },
      { role: 'user', content: 'Name a colour.' },
      { role: 'assistant', content: 'Blue.' },
      { role: 'system', content: ' ' },
      { role: 'user', content: 'Another.' },
    ];
    expect((await client.chat.completions.create({ model: 'pl-gemini', messages: late })).choices[0]!.message.content).toBe('Green.');
    expect(fake.requestsFor('pl-gemini')[0]!.body.contents).toHaveLength(3);
  });

  it('goes to an OpenAI-style model as it is, and an Anthropic fallback that could not take it is skipped', async () => {
    const messages = unanswerable['only system and developer messages']!;
    fake.script('pl-falls-to-claude', { text: 'Hello.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
    const completion = await client.chat.completions.create({ model: 'pl-falls-to-claude', messages });
    expect(completion.choices[0]!.message.content).toBe('Hello.');
    expect(fake.requestsFor('pl-falls-to-claude')[0]!.body.messages).toEqual([
      { role: 'system', content: 'Say hello.' },
      { role: 'system', content: 'Be brief.' },
    ]);
    fake.reset();
    fake.script('pl-falls-to-claude', { status: 500 });
    const failed = await apiError(client.chat.completions.create({ model: 'pl-falls-to-claude', messages }));
    expect(failed.status).toBe(502);
    expect(fake.log.map((r) => r.model)).toEqual(['pl-falls-to-claude']);
  });
});

describe('a system or developer message after the conversation has started', () => {
  const messages: OpenAI.ChatCompletionMessageParam[] = [
    { role: 'system', content: 'You answer questions.' },
    { role: 'user', content: 'Why is the sky blue?' },
    { role: 'assistant', content: 'Scattering.' },
    { role: 'developer', content: 'Answer in one word from now on.' },
    { role: 'user', content: 'And sunsets?' },
  ];

  it('is refused for a Google model with 400 naming the message, before anything is held or sent (Gemini has no place for it, and its SDK model refuses it after the hold)', async () => {
    const { owner, client } = await funded();
    const refused = await apiError(client.chat.completions.create({ model: 'pl-gemini', messages }), () => fake.log);
    expect(refused.status).toBe(400);
    expect(refused.error).toMatchObject({ type: 'invalid_request_error', param: 'messages[3]', code: 'unsupported_value' });
    expect(refused.message).toMatch(/pl-gemini.*only before/);
    expect(fake.log).toEqual([]);
    expect(await reservedOf(owner)).toBe(0);
    expect(await usageCount(owner)).toBe(0);
  });

  it('goes to an Anthropic model, which takes system messages within the conversation', async () => {
    fake.script('pl-claude', { text: 'Red.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
    expect((await client.chat.completions.create({ model: 'pl-claude', messages })).choices[0]!.message.content).toBe('Red.');
    expect(fake.requestsFor('pl-claude')[0]!.body.messages).toContainEqual({ role: 'system', content: [{ type: 'text', text: 'Answer in one word from now on.' }] });
  });
});

describe('empty text within a conversation', () => {
  it('is left out for Anthropic and Google models (both refuse an empty text block or part), the rest of the conversation sent as it was', async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [
      { role: 'system', content: '' },
      { role: 'user', content: 'Name a colour.' },
      // An answer of nothing, replayed as the client got it.
      { role: 'assistant', content: '' },
      { role: 'user', content: [{ type: 'text', text: '' }, { type: 'text', text: 'Any colour.' }] },
    ];
    const expected = {
      anthropic: [
        { role: 'user', content: [{ type: 'text', text: 'Name a colour.' }, { type: 'text', text: 'Any colour.' }] },
      ],
      google: [
        { role: 'user', parts: [{ text: 'Name a colour.' }] },
        { role: 'user', parts: [{ text: 'Any colour.' }] },
      ],
    };
    for (const { kind, model, system, conversation } of PROVIDERS) {
      fake.script(model, { text: 'Blue.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
      const completion = await client.chat.completions.create({ model, messages });
      expect(completion.choices[0]!.message.content, kind).toBe('Blue.');
      const sent = fake.requestsFor(model)[0]!;
      expect(system(sent), kind).toBeUndefined();
      expect(conversation(sent), kind).toEqual(expected[kind]);
      // Streamed the same.
      fake.script(model, { text: 'Blue.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
      let text = '';
      for await (const chunk of await client.chat.completions.create({ model, messages, stream: true })) text += chunk.choices[0]?.delta.content ?? '';
      expect(text, kind).toBe('Blue.');
      expect(conversation(fake.requestsFor(model)[1]!), kind).toEqual(expected[kind]);
    }
  });
});

describe('a blank last message after an assistant message', () => {
  const asked: OpenAI.ChatCompletionMessageParam[] = [
    { role: 'user', content: 'Name a colour.' },
    { role: 'assistant', content: 'Blue ' },
  ];

  it("is refused with 400 naming it, before anything is held or sent, where the provider reads it as blank (left out, it would make the assistant's answer a prefill to continue)", async () => {
    const { owner, client } = await funded();
    const cases: [string, OpenAI.ChatCompletionMessageParam[], number][] = [
      ['pl-claude', [...asked, { role: 'user', content: ' ' }], 2],
      ['pl-claude', [...asked, { role: 'user', content: [{ type: 'text', text: '\n' }] }], 2],
      ['pl-claude', [...asked, { role: 'user', content: '' }, { role: 'system', content: ' ' }], 3],
      ['pl-gemini', [...asked, { role: 'user', content: '' }], 2],
      ['pl-gemini', [...asked, { role: 'user', content: [{ type: 'text', text: '' }] }, { role: 'developer', content: '' }], 3],
    ];
    for (const [model, messages, index] of cases) {
      const name = `${model}: ${JSON.stringify(messages.slice(2))}`;
      const refused = await apiError(client.chat.completions.create({ model, messages }), () => fake.log);
      expect(refused.status, name).toBe(400);
      expect(refused.error, name).toMatchObject({ type: 'invalid_request_error', param: `messages[${index}]`, code: 'unsupported_value' });
      expect(refused.message, name).toMatch(new RegExp(`${model}.*assistant message before it`));
      // Streamed the same.
      const streamed = await apiError(client.chat.completions.create({ model, messages, stream: true }), () => fake.log);
      expect(streamed.status, name).toBe(400);
      expect(streamed.error, name).toMatchObject({ param: `messages[${index}]` });
    }
    expect(fake.log).toEqual([]);
    expect(await reservedOf(owner)).toBe(0);
    expect(await usageCount(owner)).toBe(0);
  });

  it('goes to a Google model as it is where it is whitespace (Gemini answers it as a new turn), and is left out where an assistant message does not come before it', async () => {
    fake.script('pl-gemini', { text: 'Red.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
    expect((await client.chat.completions.create({ model: 'pl-gemini', messages: [...asked, { role: 'user', content: ' ' }] })).choices[0]!.message.content).toBe('Red.');
    expect(fake.requestsFor('pl-gemini')[0]!.body.contents).toEqual([
      { role: 'user', parts: [{ text: 'Name a colour.' }] },
      { role: 'model', parts: [{ text: 'Blue ' }] },
      { role: 'user', parts: [{ text: ' ' }] },
    ]);
    for (const { kind, model, conversation } of PROVIDERS) {
      fake.script(model, { text: 'Red.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
      const messages: OpenAI.ChatCompletionMessageParam[] = [...asked, { role: 'user', content: 'Another.' }, { role: 'user', content: '' }];
      expect((await client.chat.completions.create({ model, messages })).choices[0]!.message.content, kind).toBe('Red.');
      expect(conversation(fake.requestsFor(model).at(-1)!), kind).toHaveLength(3);
    }
  });
});

describe('a function name OpenAI takes and Gemini does not', () => {
  it('is refused for a Google model with 400 naming the function, before anything is held or sent (Gemini wants it to start with a letter or _); Anthropic takes it', async () => {
    const { owner, client } = await funded();
    const tools: OpenAI.ChatCompletionTool[] = [
      { type: 'function', function: { name: 'lookup' } },
      { type: 'function', function: { name: '3d-render' } },
    ];
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Render a cube.' }];
    const refused = await apiError(client.chat.completions.create({ model: 'pl-gemini', messages, tools }), () => fake.log);
    expect(refused.status).toBe(400);
    expect(refused.error).toMatchObject({ type: 'invalid_request_error', param: 'tools', code: 'unsupported_value' });
    expect(refused.message).toMatch(/pl-gemini.*3d-render/);
    expect(fake.log).toEqual([]);
    expect(await reservedOf(owner)).toBe(0);
    expect(await usageCount(owner)).toBe(0);
    fake.script('pl-claude', { text: 'Done.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
    expect((await client.chat.completions.create({ model: 'pl-claude', messages, tools })).choices[0]!.message.content).toBe('Done.');
  });
});

describe('tool call ids of other providers in the conversation', () => {
  /** Ids as other servers write them (Kimi's `functions.name:index`, a dotted one) beside OpenAI's own. */
  const ids = ['functions.lookup:0', 'call.1', 'call_OpenAI-2'];
  const messages: OpenAI.ChatCompletionMessageParam[] = [
    { role: 'user', content: 'Look up three words.' },
    { role: 'assistant', content: null, tool_calls: ids.map((id, i) => ({ id, type: 'function' as const, function: { name: 'lookup', arguments: `{"word":"w${i}"}` } })) },
    ...ids.map((id, i): OpenAI.ChatCompletionToolMessageParam => ({ role: 'tool', tool_call_id: id, content: `meaning ${i}` })),
  ];
  const tools: OpenAI.ChatCompletionTool[] = [{ type: 'function', function: { name: 'lookup', parameters: { type: 'object', properties: { word: { type: 'string' } } } } }];

  it("are sent to Anthropic in the form its tool_use ids take (letters, digits, _ and -), each call still paired with its result; to Google as they came", async () => {
    for (const { kind, model } of PROVIDERS) {
      fake.script(model, { text: 'Done.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
      expect((await client.chat.completions.create({ model, messages, tools })).choices[0]!.message.content, kind).toBe('Done.');
    }
    const [, call, results] = fake.requestsFor('pl-claude')[0]!.body.messages as { content: { id?: string; tool_use_id?: string; content?: unknown }[] }[];
    const sentIds = call!.content.map((part) => part.id!);
    for (const id of sentIds) expect(id).toMatch(/^[a-zA-Z0-9_-]+$/);
    expect(new Set(sentIds).size).toBe(3);
    // An id Anthropic takes is kept as it is.
    expect(sentIds[2]).toBe('call_OpenAI-2');
    expect(results!.content.map((part) => [part.tool_use_id, part.content])).toEqual(sentIds.map((id, i) => [id, `meaning ${i}`]));
    const [, modelTurn] = fake.requestsFor('pl-gemini')[0]!.body.contents as { parts: { functionCall?: { id: string } }[] }[];
    expect(modelTurn!.parts.map((part) => part.functionCall!.id)).toEqual(ids);
  });
});

describe('reasoning_effort on a Claude model beside blank messages', () => {
  it('reads a prefill from the conversation as it is sent: a blank last assistant message is none (thinking), one that says something is one (no thinking)', async () => {
    const cases: [OpenAI.ChatCompletionMessageParam[], unknown][] = [
      [[{ role: 'user', content: 'Name a colour.' }, { role: 'assistant', content: ' ' }], { type: 'enabled', budget_tokens: 1024 }],
      [[{ role: 'user', content: 'Name a colour.' }, { role: 'assistant', content: 'Blue' }], undefined],
    ];
    for (const [messages, thinking] of cases) {
      fake.script('pl-claude', { text: 'Blue.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
      await client.chat.completions.create({ model: 'pl-claude', messages, max_tokens: 1000, reasoning_effort: 'low' });
      expect(fake.log[0]!.body.thinking, JSON.stringify(messages)).toEqual(thinking);
      fake.reset();
    }
  });
});

describe("max_tokens above the model's output cap", () => {
  it("is sent and held as the cap the catalog knows for Anthropic and Google models (both refuse more upstream; the answer could not be longer), max_tokens and max_completion_tokens alike", async () => {
    // A user of their own, whose only hold is the call's: the upstream hangs until the client goes, so the hold is read while it stands.
    const { owner, client } = await funded();
    for (const { kind, model, maxTokens } of PROVIDERS) {
      for (const asked of [{ max_tokens: 100_000 }, { max_completion_tokens: 100_000 }]) {
        await eventually(async () => (await reservedOf(owner)) === 0);
        fake.script(model, { hang: true });
        const gone = new AbortController();
        const call = client.chat.completions.create({ model, messages: [{ role: 'user', content: 'Why is the sky blue?' }], ...asked }, { signal: gone.signal });
        const settled = call.then(
          () => 'answered',
          () => 'aborted',
        );
        await fake.waitFor((log) => log.length > 0);
        // Held: the prompt's few tokens at 1 per million and CAP output tokens at 2, not 100,000 of them.
        const held = await reservedOf(owner);
        gone.abort();
        expect(await settled, kind).toBe('aborted');
        expect(held, kind).toBeGreaterThanOrEqual(CAP * 2e-6);
        expect(held, kind).toBeLessThan(CAP * 2e-6 + 1e-4);
        expect(maxTokens(fake.log[0]!), kind).toBe(CAP);
        await fake.waitFor((log) => log[0]!.aborted === true);
        fake.reset();
      }
    }
    await eventually(async () => (await reservedOf(owner)) === 0);
  });
});

describe('participant names (`messages[].name`)', () => {
  it('are dropped for Anthropic and Google models, whose APIs have no such field: the conversation goes as it would without them', async () => {
    const named: OpenAI.ChatCompletionMessageParam[] = [
      { role: 'system', content: 'Be brief.', name: 'rules' },
      { role: 'user', content: 'Hi, I am Ada.', name: 'ada' },
      { role: 'assistant', content: 'Hello Ada.', name: 'bot' },
      { role: 'user', content: [{ type: 'text', text: 'And Bob?' }], name: 'bob' },
    ];
    const plain = named.map((message) => ({ ...message, name: undefined })) as OpenAI.ChatCompletionMessageParam[];
    for (const { kind, model, system, conversation } of PROVIDERS) {
      for (const messages of [named, plain]) {
        fake.script(model, { text: 'Hello.', usage: { prompt_tokens: 5, completion_tokens: 2 } });
        expect((await client.chat.completions.create({ model, messages })).choices[0]!.message.content, kind).toBe('Hello.');
      }
      const [withNames, without] = fake.requestsFor(model);
      expect(system(withNames!), kind).toEqual(system(without!));
      expect(conversation(withNames!), kind).toEqual(conversation(without!));
    }
  });
});
