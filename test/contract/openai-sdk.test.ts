/**
 * The OpenAI-compatible gateway (/v1) as the official `openai` package sees it, against a live Keel
 * server whose models are served by the fake model server (through a provider record a superuser
 * adds at run time, as a real deployment would).
 */
import type { AddressInfo } from 'node:net';
import { gzipSync } from 'node:zlib';

import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import OpenAI from 'openai';
import { zodResponseFormat } from 'openai/helpers/zod';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { z } from 'zod';

import { usageRecords } from '../../src/models/index.js';

import { buildTestApp, useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { EMBEDDING_DIMENSIONS, fakeEmbedding, fakeLogprobs, FakeModelServer, type ScriptedReply } from '../helpers/fake-model-server.js';
import { apiOf, createKey } from '../helpers/http.js';
import { captureLogs, LEVEL } from '../helpers/logs.js';
import { apiError } from '../helpers/openai.js';
import { createAgent } from '../helpers/runs.js';

const TIMEOUT_MS = 1_000;
/**
 * A stream's whole time: a test of it waits this long, but the streams of log probabilities past
 * MAX_ANSWER_BYTES (hundreds of events of 20 alternatives each, parsed and written again on both
 * sides, all in this one process) must end well inside it. At 2 s they took 1.4 s unloaded and past
 * 2 s beside the other worker, failing the test (the AI SDK's path, which validates every chunk, is
 * the slowest: 8.7 s for 1,500 tokens under load).
 */
const STREAM_TIMEOUT_MS = 6_000;
/**
 * An answer's limit small enough that reading past it is quick beside TIMEOUT_MS: at the default
 * (16 MiB) a loaded machine took longer than the attempt's timeout to read it, and the retry got
 * the fake's plain answer (CI, PostgreSQL pass, 2026-12-04). Half of 1 MiB halves what the tests
 * of answers past it send (1,500 tokens of log probabilities became 600); below ~400 KiB a batch of
 * embeddings (the fake's floats) no longer fits.
 */
const MAX_ANSWER_BYTES = 512 * 1024;
/**
 * The attempt's time of the second node that serves the large-but-allowed calls (thousands of
 * messages or parts, a 1 MB image, 90,000 dimensions of embeddings): written, parsed and answered
 * in this one process, one of them took past TIMEOUT_MS on a loaded 2-core machine and was a 504.
 * Their tests are about sizes, not time; the tests of the timeout keep the first node's 1 s.
 */
const LARGE_CALL_TIMEOUT_MS = 30_000;
const SETTINGS = { MODEL_TIMEOUT_MS: String(TIMEOUT_MS), MODEL_STREAM_TIMEOUT_MS: String(STREAM_TIMEOUT_MS), MODEL_MAX_RETRIES: '1', MODEL_RETRY_MAX_WAIT_MS: '50', MODEL_MAX_RESPONSE_BYTES: String(MAX_ANSWER_BYTES) };
const logs = captureLogs('warn');
const ctx = useTestApp(SETTINGS, { logger: logs.logger });
const api = apiOf(ctx);

const PRICING = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '2' };

let fake: FakeModelServer;
let admin: Record<string, string>;
let user: TestUser;
let baseURL: string;
let client: OpenAI;
/** The node for large calls (LARGE_CALL_TIMEOUT_MS) over the same database, and the user's key on it. */
let large: FastifyInstance | undefined;
let largeURL: string;
let largeClient: OpenAI;

/** A client with no retries of its own: what the gateway retries is what the fake's log shows. */
const clientWith = (apiKey: string) => new OpenAI({ apiKey, baseURL, maxRetries: 0 });

async function addModel(body: Record<string, unknown>): Promise<void> {
  const response = await api('POST', '/models', admin, { provider: 'fake', pricing: PRICING, ...body });
  expect(response.statusCode, response.body).toBe(200);
}

beforeAll(async () => {
  fake = await FakeModelServer.start();
  await ctx.app.listen({ host: '127.0.0.1', port: 0 });
  baseURL = `http://127.0.0.1:${(ctx.app.server.address() as AddressInfo).port}/v1`;
  admin = await superuserHeaders(ctx.app);
  const created = await api('POST', '/providers', admin, { name: 'fake', kind: 'openai-compatible', base_url: fake.url, api_key: 'sk-upstream' });
  expect(created.statusCode, created.body).toBe(200);
  await addModel({ id: 'fake-chat', capabilities: ['chat', 'tools'], aliases: ['fake-latest'] });
  await addModel({ id: 'fake-embed', capabilities: ['embedding'] });
  await addModel({ id: 'fake-backup', capabilities: ['chat'] });
  await addModel({ id: 'fake-primary', capabilities: ['chat'], fallbacks: ['fake-backup'] });
  await addModel({ id: 'fake-off', capabilities: ['chat'], enabled: false });
  user = await createUser(ctx.app);
  client = clientWith((await createKey(ctx.app, user)).key);
  // Built after the models above exist: a node reads the model list when it starts, and the large
  // calls use no model a test adds later.
  large = await buildTestApp(ctx.database, { ...SETTINGS, MODEL_TIMEOUT_MS: String(LARGE_CALL_TIMEOUT_MS) }, { logger: logs.logger });
  await large.listen({ host: '127.0.0.1', port: 0 });
  largeURL = `http://127.0.0.1:${(large.server.address() as AddressInfo).port}/v1`;
  largeClient = new OpenAI({ apiKey: client.apiKey, baseURL: largeURL, maxRetries: 0 });
});
afterAll(async () => {
  await large?.close();
  await fake.close();
});
beforeEach(() => {
  fake.reset();
  logs.clear();
});

/** The warn and error lines logged for one request (by its x-request-id). */
const linesOf = (reqId: string | null) => logs.lines().filter((line) => line.reqId === reqId);

/** Waits until `predicate` holds of what has been logged (some lines are written after the client has its answer). */
async function loggedUntil(predicate: (lines: Record<string, unknown>[]) => boolean, timeoutMs = 2_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate(logs.lines())) {
    if (Date.now() > deadline) throw new Error(`not logged within ${timeoutMs} ms: ${JSON.stringify(logs.lines())}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

describe('models', () => {
  it('lists the enabled models whose provider is configured, and retrieves one by id or alias', async () => {
    const ids: string[] = [];
    for await (const model of client.models.list()) ids.push(model.id);
    expect(ids).toEqual(expect.arrayContaining(['fake-chat', 'fake-embed', 'fake-primary']));
    expect(ids).not.toContain('fake-off'); // disabled
    expect(ids).not.toContain('gpt-4.1'); // a built-in whose provider has no key here

    const model = await client.models.retrieve('fake-chat');
    expect(model).toMatchObject({ id: 'fake-chat', object: 'model', owned_by: 'fake' });
    expect(Object.keys(model).sort()).toEqual(['created', 'id', 'object', 'owned_by']);
    expect((await client.models.retrieve('fake-latest')).id).toBe('fake-chat');
  });

  it('answers 404 model_not_found for an unknown, a disabled, an unlisted (provider not configured) and an agent model', async () => {
    for (const id of ['no-such-model', 'fake-off', 'gpt-4.1', 'agent:0f8fad5b-d9cb-469f-a165-70867728950e']) {
      const error = await apiError(client.models.retrieve(id));
      expect(error.status, id).toBe(404);
      expect(error.code).toBe('model_not_found');
      expect(error.type).toBe('invalid_request_error');
    }
  });

  it('retrieves a model whose id has slashes (vLLM and OpenRouter name models so), its id written in the path as it is or escaped', async () => {
    await addModel({ id: 'fake-org/fake-family/fake-8b', capabilities: ['chat'] });
    // The SDK escapes the slashes; other clients (and curl) write the id into the path as it is.
    expect(await client.models.retrieve('fake-org/fake-family/fake-8b')).toMatchObject({ id: 'fake-org/fake-family/fake-8b', object: 'model', owned_by: 'fake' });
    for (const path of ['fake-org/fake-family/fake-8b', 'fake-org/fake-family/fake-8b/', 'fake-org/fake-family/fake-8b?x=a/b', 'fake-org%2Ffake-family/fake-8b']) {
      const plain = await fetch(`${baseURL}/models/${path}`, { headers: { authorization: `Bearer ${client.apiKey}` } });
      expect(plain.status, path).toBe(200);
      expect(await plain.json()).toMatchObject({ id: 'fake-org/fake-family/fake-8b', object: 'model', owned_by: 'fake' });
    }
    for (const id of ['fake-org/no-such-model', `fake-org/${'x'.repeat(300)}`]) {
      const missing = await fetch(`${baseURL}/models/${id}`, { headers: { authorization: `Bearer ${client.apiKey}` } });
      expect(missing.status).toBe(404);
      expect(((await missing.json()) as { error: { code: string } }).error.code).toBe('model_not_found');
    }
    // Under /v1/models as well as anywhere: a key is needed.
    const anonymous = await fetch(`${baseURL}/models/fake-org/fake-family/fake-8b`);
    expect(anonymous.status).toBe(401);
  });
});

describe('chat completions', () => {
  it('answers a completion with usage, passing the sampling parameters upstream', async () => {
    fake.script('fake-chat', { text: 'Four.', usage: { prompt_tokens: 12, completion_tokens: 3, cached_tokens: 2 } });
    const completion = await client.chat.completions.create({
      model: 'fake-chat',
      messages: [
        { role: 'system', content: 'Be brief.' },
        { role: 'user', content: 'What is 2+2?' },
      ],
      max_completion_tokens: 50,
      temperature: 0.2,
      top_p: 0.9,
      frequency_penalty: 0.5,
      presence_penalty: -1,
      seed: 7,
      user: 'end-user-7',
      reasoning_effort: 'low',
      parallel_tool_calls: false,
      stop: ['\n\n'],
    });
    expect(completion).toMatchObject({
      object: 'chat.completion',
      model: 'fake-chat',
      choices: [{ index: 0, message: { role: 'assistant', content: 'Four.' }, finish_reason: 'stop' }],
      usage: { prompt_tokens: 12, completion_tokens: 3, total_tokens: 15, prompt_tokens_details: { cached_tokens: 2 } },
    });
    expect(completion.id).toMatch(/^chatcmpl-/);
    const [sent] = fake.requestsFor('fake-chat');
    expect(sent!.body).toMatchObject({ max_tokens: 50, temperature: 0.2, top_p: 0.9, frequency_penalty: 0.5, presence_penalty: -1, seed: 7, user: 'end-user-7', reasoning_effort: 'low', parallel_tool_calls: false, stop: ['\n\n'] });
    expect(sent!.body.messages).toEqual([
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'What is 2+2?' },
    ]);
    expect(sent!.headers.authorization).toBe('Bearer sk-upstream');
  });

  it('sends upstream no max_tokens when the client sets none and nothing is held by it (billing off, no key budget), as OpenAI lets an answer run; the client\'s own when it does', async () => {
    expect(ctx.app.settings.BILLING_ENABLED).toBe(false);
    const hi = { model: 'fake-chat', messages: [{ role: 'user' as const, content: 'Hi' }] };
    await client.chat.completions.create(hi);
    for await (const _ of await client.chat.completions.create({ ...hi, stream: true }));
    await client.chat.completions.create({ ...hi, max_tokens: 7 });
    expect(fake.requestsFor('fake-chat').map((r) => r.body.max_tokens)).toEqual([undefined, undefined, 7]);
  });

  it('streams OpenAI chunks ending in [DONE], with the usage chunk when asked for', async () => {
    fake.script('fake-chat', { chunks: ['Hel', 'lo', ' there'], usage: { prompt_tokens: 7, completion_tokens: 3 } });
    const stream = await client.chat.completions.create({
      model: 'fake-chat',
      messages: [{ role: 'user', content: 'Hi' }],
      stream: true,
      stream_options: { include_usage: true },
    });
    const chunks: OpenAI.ChatCompletionChunk[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    expect(chunks[0]!.choices[0]!.delta.role).toBe('assistant');
    expect(chunks.map((c) => c.choices[0]?.delta.content ?? '').join('')).toBe('Hello there');
    const finish = chunks.find((c) => c.choices[0]?.finish_reason);
    expect(finish!.choices[0]!.finish_reason).toBe('stop');
    const last = chunks.at(-1)!;
    expect(last.choices).toEqual([]);
    expect(last.usage).toMatchObject({ prompt_tokens: 7, completion_tokens: 3, total_tokens: 10 });
    expect(chunks.slice(0, -1).every((c) => c.usage === null)).toBe(true);
    expect(new Set(chunks.map((c) => c.id)).size).toBe(1);

    // Without include_usage: no usage chunk, no usage field.
    const plain = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true });
    const plainChunks: OpenAI.ChatCompletionChunk[] = [];
    for await (const chunk of plain) plainChunks.push(chunk);
    expect(plainChunks.every((c) => c.choices.length === 1 && c.usage === undefined)).toBe(true);
  });

  it('round-trips a tool call: the call comes back, the tool result goes upstream', async () => {
    const tools: OpenAI.ChatCompletionTool[] = [
      {
        type: 'function',
        function: { name: 'get_weather', description: 'Weather in a city', parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } },
      },
    ];
    fake.script('fake-chat', { toolCalls: [{ id: 'call_1', name: 'get_weather', arguments: '{"city":"Paris"}' }], usage: { prompt_tokens: 20, completion_tokens: 8 } });
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Weather in Paris?' }];
    const first = await client.chat.completions.create({ model: 'fake-chat', messages, tools, tool_choice: 'auto' });
    const choice = first.choices[0]!;
    expect(choice.finish_reason).toBe('tool_calls');
    expect(choice.message.tool_calls).toEqual([{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }]);
    const sentTools = fake.requestsFor('fake-chat')[0]!.body.tools as { function: { name: string; parameters: unknown } }[];
    expect(sentTools[0]!.function).toMatchObject({ name: 'get_weather', parameters: tools[0]!.type === 'function' ? tools[0]!.function.parameters : null });

    fake.script('fake-chat', { text: 'Sunny, 21°C.' });
    const second = await client.chat.completions.create({
      model: 'fake-chat',
      tools,
      messages: [...messages, choice.message, { role: 'tool', tool_call_id: 'call_1', content: '{"sky":"sunny","celsius":21}' }],
    });
    expect(second.choices[0]!.message.content).toBe('Sunny, 21°C.');
    const upstream = fake.requestsFor('fake-chat')[1]!.body.messages as Record<string, unknown>[];
    expect(upstream[1]).toMatchObject({ role: 'assistant', tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }] });
    expect(upstream[2]).toEqual({ role: 'tool', tool_call_id: 'call_1', content: '{"sky":"sunny","celsius":21}' });

    // A tool result that answers no call is the client's mistake.
    const orphan = await apiError(client.chat.completions.create({ model: 'fake-chat', messages: [...messages, { role: 'tool', tool_call_id: 'call_9', content: 'x' }] }));
    expect(orphan.status).toBe(400);
    expect(orphan.param).toBe('messages[1].tool_call_id');
  });

  it("hands a tool call's arguments on as the model wrote them, streamed or not: an integer past 2^53 keeps its digits", async () => {
    const args = '{"order_id": 1234567890123456789, "amount": 10.50}';
    const tools: OpenAI.ChatCompletionTool[] = [{ type: 'function', function: { name: 'refund', parameters: { type: 'object', properties: { order_id: { type: 'integer' }, amount: { type: 'number' } } } } }];
    const request = { model: 'fake-chat', messages: [{ role: 'user' as const, content: 'Refund order 1234567890123456789' }], tools };
    fake.script('fake-chat', { toolCalls: [{ id: 'call_1', name: 'refund', arguments: args }] }, { toolCalls: [{ id: 'call_2', name: 'refund', arguments: args }] });
    const answered = await client.chat.completions.create(request);
    const streamed = await client.chat.completions.stream(request).finalChatCompletion();
    for (const completion of [answered, streamed]) {
      const [call] = completion.choices[0]!.message.tool_calls!;
      // Parsed and written again, it read {"order_id":1234567890123456800,"amount":10.5}: another order.
      expect(call!.type === 'function' && call!.function.arguments).toBe(args);
    }
  });

  it('a model that breaks tool_choice is the provider\'s fault: 502 saying how, streamed or not', async () => {
    const tools = [tool('lookup')];
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Look it up' }];
    fake.script('fake-chat', { text: 'No need.' }, { toolCalls: [{ id: 'call_1', name: 'lookup', arguments: '{"q":"x"}' }] }, { toolCalls: [{ id: 'call_2', name: 'lookup', arguments: '{"q":"y"}' }] });
    const required = await apiError(client.chat.completions.create({ model: 'fake-chat', messages, tools, tool_choice: 'required' }));
    expect(required.status).toBe(502);
    expect(required.error).toMatchObject({ message: 'Model response did not contain a tool call even though tool choice was required.' });
    const none = await apiError(client.chat.completions.create({ model: 'fake-chat', messages, tools, tool_choice: 'none' }));
    expect(none.status).toBe(502);
    expect(none.error).toMatchObject({ message: 'Model response contained a tool call even though tool choice was none.' });
    // Streamed: nothing had reached the client before the tool call, so the answer is the same 502.
    const streamed = await apiError(client.chat.completions.create({ model: 'fake-chat', messages, tools, tool_choice: 'none', stream: true }));
    expect(streamed.status).toBe(502);
    expect(streamed.error).toMatchObject({ message: 'Model response contained a tool call even though tool choice was none.' });
    expect(fake.log.map((r) => r.body.tool_choice)).toEqual(['required', 'none', 'none']);
  });

  const tool = (name: string): OpenAI.ChatCompletionTool => ({ type: 'function', function: { name, parameters: { type: 'object', properties: { q: { type: 'string' } } } } });

  it('keeps a function named __proto__ a tool of its own', async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Look it up' }];
    fake.script('fake-chat', { toolCalls: [{ id: 'call_p', name: '__proto__', arguments: '{"q":"x"}' }] });
    const completion = await client.chat.completions.create({ model: 'fake-chat', messages, tools: [tool('__proto__'), tool('constructor')] });
    const sent = fake.requestsFor('fake-chat')[0]!.body.tools as { function: { name: string } }[];
    expect(sent.map((t) => t.function.name)).toEqual(['__proto__', 'constructor']);
    expect(completion.choices[0]!.message.tool_calls).toEqual([{ id: 'call_p', type: 'function', function: { name: '__proto__', arguments: '{"q":"x"}' } }]);
  });

  it('refuses two functions of one name with 400 naming the param, as it would drop one', async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Look it up' }];
    const twice = await apiError(client.chat.completions.create({ model: 'fake-chat', messages, tools: [tool('lookup'), tool('other'), tool('lookup')] }));
    expect(twice).toMatchObject({ status: 400, type: 'invalid_request_error', param: 'tools[2].function.name' });
    expect(twice.message).toMatch(/lookup/);
    expect(fake.log).toEqual([]);
  });

  it('streams tool calls as tool_calls deltas with an index', async () => {
    fake.script('fake-chat', { toolCalls: [{ id: 'call_a', name: 'lookup', arguments: '{"q":"keel"}' }] });
    const stream = await client.chat.completions.create({
      model: 'fake-chat',
      stream: true,
      messages: [{ role: 'user', content: 'Look it up' }],
      tools: [{ type: 'function', function: { name: 'lookup', parameters: { type: 'object', properties: { q: { type: 'string' } } } } }],
    });
    const calls: OpenAI.ChatCompletionChunk.Choice.Delta.ToolCall[] = [];
    let finish: string | null | undefined;
    for await (const chunk of stream) {
      calls.push(...(chunk.choices[0]?.delta.tool_calls ?? []));
      finish = chunk.choices[0]?.finish_reason ?? finish;
    }
    expect(calls).toEqual([{ index: 0, id: 'call_a', type: 'function', function: { name: 'lookup', arguments: '{"q":"keel"}' } }]);
    expect(finish).toBe('tool_calls');
  });

  it('passes each function\'s strict upstream as the client set it (zodFunction sets true), none when it set none', async () => {
    const parameters = { type: 'object', properties: { q: { type: 'string' } }, required: ['q'], additionalProperties: false };
    const tools: OpenAI.ChatCompletionTool[] = [true, false, undefined].map((strict, i) => ({ type: 'function', function: { name: `f${i}`, parameters, ...(strict === undefined ? {} : { strict }) } }));
    fake.script('fake-chat', { text: 'ok' }, { text: 'ok' });
    await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Look it up' }], tools });
    await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Look it up' }], tools, stream: true });
    for (const request of fake.requestsFor('fake-chat')) {
      expect((request.body.tools as { function: { strict?: boolean } }[]).map((t) => t.function.strict)).toEqual([true, false, undefined]);
    }
  });

  it('passes response_format (json_object and json_schema) upstream and returns the text as it came', async () => {
    fake.script('fake-chat', ...Array<ScriptedReply>(4).fill({ text: '{"answer":4}' }));
    const object = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'JSON please' }], response_format: { type: 'json_object' } });
    expect(JSON.parse(object.choices[0]!.message.content!)).toEqual({ answer: 4 });
    const schema = { type: 'object', properties: { answer: { type: 'number' } }, required: ['answer'], additionalProperties: false };
    // strict as the client says, and as OpenAI takes it, false when it says nothing (a loose schema that strict mode would refuse).
    for (const strict of [true, false, undefined]) {
      await client.chat.completions.create({
        model: 'fake-chat',
        messages: [{ role: 'user', content: 'JSON please' }],
        response_format: { type: 'json_schema', json_schema: { name: 'answer', schema, ...(strict === undefined ? {} : { strict }) } },
      });
    }
    const [first, ...schemed] = fake.requestsFor('fake-chat');
    expect(first!.body.response_format).toEqual({ type: 'json_object' });
    expect(schemed.map((r) => r.body.response_format)).toEqual([true, false, false].map((strict) => ({ type: 'json_schema', json_schema: { name: 'answer', schema, strict } })));
    // Through the SDK (an image leaves the wire), to a provider whose name has a dot (its SDK model reads its options under `dot`).
    expect((await api('POST', '/providers', admin, { name: 'dot.ted', kind: 'openai-compatible', base_url: fake.url, api_key: 'sk-dot' })).statusCode).toBe(200);
    await addModel({ id: 'dotted-chat', provider: 'dot.ted', capabilities: ['chat', 'vision'] });
    fake.script('dotted-chat', { text: '{"answer":4}' });
    const pixel = 'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==';
    await client.chat.completions.create({
      model: 'dotted-chat',
      messages: [{ role: 'user', content: [{ type: 'text', text: 'JSON please' }, { type: 'image_url', image_url: { url: pixel } }] }],
      response_format: { type: 'json_schema', json_schema: { name: 'answer', schema } },
      user: 'end-user-7',
    });
    expect(fake.requestsFor('dotted-chat')[0]!.body).toMatchObject({ user: 'end-user-7', response_format: { json_schema: { strict: false } } });
  });

  it('forwards a message\'s participant `name` (system, user, assistant) over the wire and through the SDK, and refuses one OpenAI would', async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [
      { role: 'system', content: 'Be brief.', name: 'house_rules' },
      { role: 'user', content: 'Hi, I am Ada.', name: 'ada' },
      { role: 'assistant', content: 'Hello Ada.', name: 'keel-bot' },
      { role: 'user', content: 'And I am Bob.', name: 'bob_2' },
    ];
    // The hand-checked body (text only) and Zod's (`tools` sends the body to Zod), both over the wire.
    fake.script('fake-chat', { text: 'ok' }, { text: 'ok' });
    await client.chat.completions.create({ model: 'fake-chat', messages });
    await client.chat.completions.create({ model: 'fake-chat', messages, tools: [{ type: 'function', function: { name: 'noop', parameters: { type: 'object', properties: {} } } }] });
    const sent = [
      { role: 'system', content: 'Be brief.', name: 'house_rules' },
      { role: 'user', content: 'Hi, I am Ada.', name: 'ada' },
      { role: 'assistant', content: 'Hello Ada.', name: 'keel-bot' },
      { role: 'user', content: 'And I am Bob.', name: 'bob_2' },
    ];
    expect(fake.requestsFor('fake-chat').map((r) => r.body.messages)).toEqual([sent, sent]);
    // Through the SDK's openai-compatible model (an image leaves the wire): a one-text message and one of parts.
    await addModel({ id: 'named-vision', capabilities: ['chat', 'vision'] });
    fake.script('named-vision', { text: 'ok' });
    const pixel = 'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==';
    await client.chat.completions.create({
      model: 'named-vision',
      messages: [...messages, { role: 'user', content: [{ type: 'text', text: 'What is this?' }, { type: 'image_url', image_url: { url: pixel } }], name: 'carol' }],
    });
    const throughSdk = fake.requestsFor('named-vision')[0]!.body.messages as Record<string, unknown>[];
    expect(throughSdk.map((m) => m.name)).toEqual(['house_rules', 'ada', 'keel-bot', 'bob_2', 'carol']);
    expect(throughSdk[1]).toEqual(sent[1]);
    expect((throughSdk[4]!.content as Record<string, unknown>[]).every((part) => !('name' in part))).toBe(true);
    // OpenAI's pattern: 1 to 64 letters, digits, _ or -.
    fake.reset();
    for (const name of ['Ada Lovelace', '', 'x'.repeat(257), 'a/b', 'a|b']) {
      for (const extra of [{}, { tools: [{ type: 'function' as const, function: { name: 'noop' } }] }]) {
        const refused = await apiError(client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'system', content: 'Hi' }, { role: 'user', content: 'Hi', name }], ...extra }));
        expect(refused, name).toMatchObject({ status: 400, type: 'invalid_request_error', param: 'messages[1].name' });
      }
    }
    expect(fake.log).toEqual([]);
  });

  it('refuses what it cannot serve with 400 invalid_request_error naming the param', async () => {
    const two = await apiError(client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], n: 2 }));
    expect(two.status).toBe(400);
    expect(two.type).toBe('invalid_request_error');
    expect(two.param).toBe('n');
    const badRole = await apiError(client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'robot', content: 'Hi' } as never] }));
    expect(badRole.status).toBe(400);
    expect(badRole.param).toMatch(/^messages\[0\]/);
    const noMessages = await apiError(client.chat.completions.create({ model: 'fake-chat' } as never));
    expect(noMessages).toMatchObject({ status: 400, param: 'messages', code: 'missing_required_parameter' });
    const embedModel = await apiError(client.chat.completions.create({ model: 'fake-embed', messages: [{ role: 'user', content: 'Hi' }] }));
    expect(embedModel).toMatchObject({ status: 400, code: 'model_not_supported', param: 'model' });
    expect(fake.log).toEqual([]);
  });

  it('says what is wrong with a value of a union and where, not Zod\'s bare "Invalid input": a content part of a type not served, a tool_choice of a shape not taken, a bad part in a list', async () => {
    const refused = (body: Record<string, unknown>) => apiError(client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], ...body } as never));
    const file = await refused({ messages: [{ role: 'user', content: [{ type: 'text', text: 'Read this' }, { type: 'file', file: { file_data: 'data:application/pdf;base64,JVBERi0=', filename: 'a.pdf' } }] }] });
    expect(file).toMatchObject({ status: 400, type: 'invalid_request_error', param: 'messages[0].content[1].type' });
    expect(file.message).toContain("Expected 'text' | 'image_url'");
    const audio = await refused({ messages: [{ role: 'user', content: [{ type: 'input_audio', input_audio: { data: 'AAAA', format: 'wav' } }] }] });
    expect(audio).toMatchObject({ status: 400, param: 'messages[0].content[0].type' });
    const allowed = await refused({ tools: [{ type: 'function', function: { name: 'f' } }], tool_choice: { type: 'allowed_tools', allowed_tools: { mode: 'auto', tools: [] } } });
    expect(allowed).toMatchObject({ status: 400, param: 'tool_choice.type' });
    expect(allowed.message).toContain('expected "function"');
    // A text part without its text: the field that is missing.
    const textless = await refused({ messages: [{ role: 'system', content: [{ type: 'text' }] }] });
    expect(textless).toMatchObject({ status: 400, param: 'messages[0].content[0].text', code: 'missing_required_parameter' });
    // A value no option takes as a whole keeps the union's own word, at the field.
    const number = await refused({ messages: [{ role: 'user', content: 5 }] });
    expect(number).toMatchObject({ status: 400, param: 'messages[0].content' });
    expect(number.message).toContain('expected string or array');
    for (const error of [file, audio, allowed, textless, number]) expect(error.message).not.toMatch(/: Invalid input$/);
    expect(fake.log).toEqual([]);
  });

  it('takes null for every optional field, as clients that echo an earlier answer (tool_calls: null) send it', async () => {
    fake.script('fake-chat', { text: 'ok' });
    const body = {
      model: 'fake-chat',
      messages: [
        { role: 'system', content: 'Be brief.', name: null },
        { role: 'user', content: [{ type: 'image_url', image_url: { url: 'data:image/png;base64,iVBORw0KGgo=', detail: null } }, { type: 'text', text: 'Hi' }], name: null },
        { role: 'assistant', content: 'Hello', tool_calls: null, refusal: null, name: null },
        { role: 'user', content: 'Again' },
      ],
      tools: null,
      tool_choice: null,
      parallel_tool_calls: null,
      response_format: null,
    };
    const answer = await client.chat.completions.create(body as never);
    expect(answer.choices[0]?.message.content).toBe('ok');
    fake.script('fake-chat', { text: 'ok' });
    const described = { type: 'function', function: { name: 'weather', description: null, parameters: null } };
    await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], tools: [described] } as never);
    expect(fake.requestsFor('fake-chat')[1]?.body).toMatchObject({ tools: [{ type: 'function', function: { name: 'weather', parameters: { type: 'object', properties: {} } } }] });
  });

  it('takes null for the optional fields of stream_options and of an embeddings request, as for chat\'s others', async () => {
    fake.script('fake-chat', { text: 'ok' });
    const streamed = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true, stream_options: { include_usage: null } } as never);
    const chunks: OpenAI.ChatCompletionChunk[] = [];
    for await (const chunk of streamed as unknown as AsyncIterable<OpenAI.ChatCompletionChunk>) chunks.push(chunk);
    expect(chunks.map((c) => c.choices[0]?.delta.content ?? '').join('')).toBe('ok');
    // null asks for no usage chunk, as false does
    expect(chunks.every((c) => c.choices.length === 1 && !('usage' in c))).toBe(true);

    // The SDK asks for base64 in place of a null format (and decodes it); the other nulls go as sent.
    const viaSdk = await client.embeddings.create({ model: 'fake-embed', input: 'alpha', dimensions: null, user: null } as never);
    viaSdk.data[0]!.embedding.forEach((value, d) => expect(value).toBeCloseTo(fakeEmbedding('alpha')[d]!, 6));
    // A null format is no format, floats, as OpenAI answers it.
    const response = await fetch(`${baseURL}/embeddings`, {
      method: 'POST',
      headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'fake-embed', input: 'alpha', encoding_format: null, dimensions: null, user: null }),
    });
    expect(response.status).toBe(200);
    expect(Float32Array.from(((await response.json()) as { data: { embedding: number[] }[] }).data[0]!.embedding)).toEqual(Float32Array.from(fakeEmbedding('alpha')));
    for (const sent of fake.requestsFor('fake-embed')) {
      expect(sent.body).not.toHaveProperty('dimensions');
      expect(sent.body).not.toHaveProperty('user');
    }
  });

  it('refuses stream_options without stream: true with 400 at stream_options, as OpenAI does (nothing is called); null options are none', async () => {
    const messages = [{ role: 'user' as const, content: 'Hi' }];
    const notStreamed = [{ stream_options: { include_usage: true } }, { stream: false, stream_options: { include_usage: true } }, { stream: null, stream_options: {} }];
    for (const fields of notStreamed) {
      const refused = await apiError(client.chat.completions.create({ model: 'fake-chat', messages, ...fields } as never));
      expect(refused.status, JSON.stringify(fields)).toBe(400);
      expect(refused.error, JSON.stringify(fields)).toEqual({
        message: 'Invalid value for stream_options: The \'stream_options\' parameter is only allowed when \'stream\' is enabled.',
        type: 'invalid_request_error',
        param: 'stream_options',
        code: null,
      });
    }
    // An agent model's too: the body is refused before either path.
    const agentModel = `agent:${(await createAgent(ctx.app, user.headers, { name: 'streamless', model: 'fake-chat' })).id}`;
    expect(await apiError(client.chat.completions.create({ model: agentModel, messages, stream_options: { include_usage: true } } as never))).toMatchObject({ status: 400, param: 'stream_options' });
    expect(fake.log).toEqual([]);
    fake.script('fake-chat', { text: 'ok' });
    const answer = await client.chat.completions.create({ model: 'fake-chat', messages, stream: false, stream_options: null });
    expect(answer.choices[0]?.message.content).toBe('ok');
  });

  it('refuses a tool_choice that asks for a call no tool can answer, and metadata past 16 pairs, with 400 naming the param', async () => {
    const messages = [{ role: 'user' as const, content: 'Hi' }];
    const weather = { type: 'function' as const, function: { name: 'weather', parameters: { type: 'object', properties: {} } } };
    const required = await apiError(client.chat.completions.create({ model: 'fake-chat', messages, tool_choice: 'required' }));
    expect(required).toMatchObject({ status: 400, type: 'invalid_request_error', param: 'tool_choice' });
    const named = await apiError(client.chat.completions.create({ model: 'fake-chat', messages, tools: [weather], tool_choice: { type: 'function', function: { name: 'news' } } }));
    expect(named).toMatchObject({ status: 400, param: 'tool_choice' });
    expect(named.message).toContain('"news"');
    const noTools = await apiError(client.chat.completions.create({ model: 'fake-chat', messages, tool_choice: { type: 'function', function: { name: 'weather' } } }));
    expect(noTools).toMatchObject({ status: 400, param: 'tool_choice' });
    const metadata = Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, 'v']));
    expect(await apiError(client.chat.completions.create({ model: 'fake-chat', messages, metadata }))).toMatchObject({ status: 400, param: 'metadata' });
    expect(fake.log).toEqual([]);
    // What names a tool there is, `none` and `auto` without tools, and 16 pairs go on.
    fake.script('fake-chat', { toolCalls: [{ id: 'call_1', name: 'weather', arguments: '{}' }] }, { text: 'ok' }, { text: 'ok' });
    await client.chat.completions.create({ model: 'fake-chat', messages, tools: [weather], tool_choice: { type: 'function', function: { name: 'weather' } } });
    await client.chat.completions.create({ model: 'fake-chat', messages, tool_choice: 'none' });
    await client.chat.completions.create({ model: 'fake-chat', messages, tool_choice: 'auto', metadata: Object.fromEntries(Object.entries(metadata).slice(0, 16)) });
    expect(fake.requestsFor('fake-chat')).toHaveLength(3);
  });

  it('refuses a request past 2,048 messages, 128 tools or 8,192 content parts and tool calls with 400 naming the limit and the param, before calling upstream; one at them goes on', async () => {
    const user = { role: 'user' as const, content: 'Hi' };
    const text = { type: 'text' as const, text: 'x' };
    const tool = (i: number) => ({ type: 'function' as const, function: { name: `f${i}` } });
    const call = (i: number) => ({ id: `call_${i}`, type: 'function' as const, function: { name: 'f0', arguments: '{}' } });
    /** A tool whose parameters hold 2 × properties + 3 values (an object, its type and properties; each property an object and its type). */
    const schemaTool = (i: number, properties: number) => ({
      type: 'function' as const,
      function: { name: `s${i}`, parameters: { type: 'object', properties: Object.fromEntries(Array.from({ length: properties }, (_, p) => [`p${p}`, { type: 'string' }])) } },
    });
    const refusals: [OpenAI.ChatCompletionCreateParamsNonStreaming, string, string][] = [
      [{ model: 'fake-chat', messages: Array.from({ length: 2049 }, () => user) }, 'messages', 'At most 2048 messages'],
      // Counted before anything else reads the body: the first message's role is no role at all.
      [{ model: 'fake-chat', messages: [{ role: 'robot' } as never, ...Array.from({ length: 2049 }, () => user)] }, 'messages', 'At most 2048 messages'],
      [{ model: 'fake-chat', messages: [user], tools: Array.from({ length: 129 }, (_, i) => tool(i)) }, 'tools', 'At most 128 tools'],
      [{ model: 'fake-chat', messages: [{ role: 'user', content: Array.from({ length: 8193 }, () => text) }] }, 'messages[0].content', 'At most 8192 content parts and tool calls'],
      // All messages together: the assistant's calls take the count past it.
      [{ model: 'fake-chat', tools: [tool(0)], messages: [{ role: 'user', content: Array.from({ length: 8000 }, () => text) }, { role: 'assistant', content: null, tool_calls: Array.from({ length: 193 }, (_, i) => call(i)) }] }, 'messages[1].tool_calls', 'At most 8192'],
      [{ model: 'fake-chat', messages: [user], prediction: { type: 'content', content: Array.from({ length: 8193 }, () => text) } }, 'prediction.content', 'At most 8192'],
      // No parts is no message: OpenAI refuses it too.
      [{ model: 'fake-chat', messages: [{ role: 'user', content: [] }] }, 'messages[0].content', ''],
      // OpenAI's own bounds: 300 token biases, 16 metadata pairs.
      [{ model: 'fake-chat', messages: [user], logit_bias: Object.fromEntries(Array.from({ length: 301 }, (_, i) => [String(i), 1])) }, 'logit_bias', 'At most 300 tokens'],
      [{ model: 'fake-chat', messages: [user], metadata: Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, 'v'])) }, 'metadata', 'At most 16 pairs'],
      // The tools' and response format's schemas, 100,000 values in all: the second tool's takes the count past it.
      [{ model: 'fake-chat', messages: [user], tools: [schemaTool(0, 25_000), schemaTool(1, 25_000)] }, 'tools[1].function.parameters', 'At most 100000 values in the tools\' parameters and the response format\'s schema'],
    ];
    // On the large calls' node (LARGE_CALL_TIMEOUT_MS): the calls at the bounds below are thousands of messages and parts.
    for (const [body, param, words] of refusals) {
      const refused = await apiError(largeClient.chat.completions.create(body));
      expect(refused, param).toMatchObject({ status: 400, type: 'invalid_request_error', param });
      expect(refused.message).toContain(words);
    }
    expect(fake.log).toEqual([]);
    // At the bounds: each goes upstream whole.
    fake.script('fake-chat', { text: 'ok' }, { text: 'ok' }, { text: 'ok' });
    await largeClient.chat.completions.create({ model: 'fake-chat', messages: Array.from({ length: 2048 }, () => user) });
    await largeClient.chat.completions.create({ model: 'fake-chat', messages: [user], tools: Array.from({ length: 128 }, (_, i) => tool(i)) });
    await largeClient.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: Array.from({ length: 8192 }, () => text) }] });
    const [messages, tools, parts] = fake.requestsFor('fake-chat').map((r) => r.body);
    expect((messages!.messages as unknown[]).length).toBe(2048);
    expect((tools!.tools as unknown[]).length).toBe(128);
    expect(((parts!.messages as { content: unknown[] }[])[0]!.content).length).toBe(8192);
    // 300 biases, 16 pairs and schemas of 100,000 values in all go on.
    fake.reset();
    const biases = Object.fromEntries(Array.from({ length: 300 }, (_, i) => [String(i), 1]));
    await largeClient.chat.completions.create({ model: 'fake-chat', messages: [user], logit_bias: biases, metadata: Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`k${i}`, 'v'])), tools: [schemaTool(0, 24_998), schemaTool(1, 24_999)] });
    expect(fake.log[0]!.body).toMatchObject({ logit_bias: biases });
    expect((fake.log[0]!.body.tools as unknown[]).length).toBe(2);
  });

  it('refuses a body past 64 KiB that nests deeper than 72 levels or holds more than 250,000 values with 400 naming the bound and the field, before parsing it; large bodies of real shape go on', async () => {
    const nested = (depth: number) => '['.repeat(depth) + ']'.repeat(depth);
    const messages = '"messages":[{"role":"user","content":"Hi"}]';
    // On the large calls' node (LARGE_CALL_TIMEOUT_MS): the last request carries a 1 MB image.
    const send = (body: string) => fetch(`${largeURL}/chat/completions`, { method: 'POST', headers: { authorization: `Bearer ${largeClient.apiKey}`, 'content-type': 'application/json' }, body });
    const deep = nested(100_000);
    const refusals: [body: string, param: string, words: string][] = [
      [`{"model":"fake-chat",${messages},"metadata":{"a":${deep}}}`, 'metadata.a[0][0]', 'nests deeper than 72 levels'],
      [`{"model":"fake-chat",${messages},"tools":[{"type":"function","function":{"name":"f","parameters":{"a":${deep}}}}]}`, 'tools[0].function.parameters', 'nests deeper than 72 levels'],
      [`{"model":"fake-chat",${messages},"response_format":{"type":"json_schema","json_schema":{"name":"r","schema":{"a":${deep}}}}}`, 'response_format.json_schema.schema', 'nests deeper than 72 levels'],
      // A field the gateway ignores is parsed all the same.
      [`{"model":"fake-chat",${messages},"extra":${deep}}`, 'extra[0][0][0]', 'nests deeper than 72 levels'],
      [`{"model":"fake-chat","messages":[{"role":"user","content":${deep}}]}`, 'messages[0].content[0]', 'nests deeper than 72 levels'],
      [`{"model":"fake-chat",${messages},"extra":[${'[],'.repeat(300_000)}[]]}`, 'extra', 'more than 250000 JSON values'],
      [`{"model":"fake-chat",${messages},"logit_bias":{${Array.from({ length: 300_000 }, (_, i) => `"${i}":1`).join(',')}}}`, 'logit_bias', 'more than 250000 JSON values'],
    ];
    for (const [body, param, words] of refusals) {
      const response = await send(body);
      expect(response.status, param).toBe(400);
      const { error } = (await response.json()) as { error: { message: string; param: string; type: string } };
      expect(error, param).toMatchObject({ type: 'invalid_request_error', param });
      expect(error.message, param).toContain(words);
    }
    // Within 64 KiB the body is parsed as it is: the schema's own bound (64 levels) names a schema nested too deeply.
    const small = await send(`{"model":"fake-chat",${messages},"tools":[{"type":"function","function":{"name":"f","parameters":{"a":${nested(1000)}}}}]}`);
    expect(await small.json()).toMatchObject({ error: { param: 'tools[0].function.parameters', message: expect.stringContaining('Nested deeper than 64 levels') as string } });
    expect(fake.log).toEqual([]);
    // 2,048 messages of text beside a 1 MB image: past 64 KiB, of the shape real requests have.
    const image = `data:image/png;base64,${'A'.repeat(1024 * 1024)}`;
    const big = await send(JSON.stringify({ model: 'fake-chat', messages: [...Array.from({ length: 2047 }, () => ({ role: 'user', content: 'Hi, "you", [there]: {x}' })), { role: 'user', content: [{ type: 'image_url', image_url: { url: image } }] }] }));
    expect(big.status, await big.clone().text()).toBe(200);
    expect(fake.log).toHaveLength(1);
  });

  it('joins a system, developer or tool message\'s text parts a line apart, over the wire and through the SDK (a user message\'s go on as parts)', async () => {
    const parts = (...texts: string[]) => texts.map((text) => ({ type: 'text' as const, text }));
    const messages: OpenAI.ChatCompletionMessageParam[] = [
      { role: 'system', content: parts('You are helpful.', 'Answer briefly.') },
      { role: 'developer', content: parts('Use metric units.', 'No emoji.') },
      { role: 'user', content: 'Weather?' },
      { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'weather', arguments: '{}' } }] },
      { role: 'tool', tool_call_id: 'call_1', content: parts('12 °C', 'rain') },
    ];
    const joined = ['You are helpful.\nAnswer briefly.', 'Use metric units.\nNo emoji.', '12 °C\nrain'];
    const textsOf = (sent: Record<string, unknown>) => (sent.messages as { role: string; content: unknown }[]).filter((m) => m.role !== 'user' && m.role !== 'assistant').map((m) => m.content);
    const tools = [{ type: 'function' as const, function: { name: 'weather' } }];
    // Over the wire (openai-compatible, text only), and through the SDK's model (an image leaves the wire).
    fake.script('fake-chat', { text: 'ok' });
    await client.chat.completions.create({ model: 'fake-chat', messages, tools });
    expect(textsOf(fake.requestsFor('fake-chat')[0]!.body)).toEqual(joined);
    await addModel({ id: 'parts-vision', capabilities: ['chat', 'vision', 'tools'] });
    fake.script('parts-vision', { text: 'ok' });
    const pixel = 'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==';
    const withImage: OpenAI.ChatCompletionMessageParam[] = [...messages, { role: 'user', content: [...parts('And ', 'this?'), { type: 'image_url', image_url: { url: pixel } }] }];
    await client.chat.completions.create({ model: 'parts-vision', messages: withImage, tools });
    const throughSdk = fake.requestsFor('parts-vision')[0]!.body;
    expect(textsOf(throughSdk)).toEqual(joined);
    const lastUser = (throughSdk.messages as { content: { type: string; text?: string }[] }[]).at(-1)!;
    expect(lastUser.content.filter((part) => part.type === 'text').map((part) => part.text)).toEqual(['And ', 'this?']);
  });

  it('refuses free-form JSON nested deeper than 64 levels with 400 naming the param, however deep (never a 500 the SDK would retry)', async () => {
    /** JSON text of `{"a":{"a":…1…}}`, `levels` objects deep (a text: the SDK's own JSON.stringify would overflow on the deepest). */
    const nested = (levels: number) => `${'{"a":'.repeat(levels - 1)}{}${'}'.repeat(levels - 1)}`;
    const post = (body: string) =>
      fetch(`${baseURL}/chat/completions`, { method: 'POST', headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' }, body });
    const hi = '"model":"fake-chat","messages":[{"role":"user","content":"Hi"}]';
    const bodies = (levels: number): [string, string][] => [
      [`{${hi},"tools":[{"type":"function","function":{"name":"f","parameters":${nested(levels)}}}]}`, 'tools[0].function.parameters'],
      [`{${hi},"response_format":{"type":"json_schema","json_schema":{"name":"r","schema":${nested(levels)}}}}`, 'response_format.json_schema.schema'],
      [
        `{"model":"fake-chat","messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":${JSON.stringify(nested(levels))}}}]},{"role":"tool","tool_call_id":"c1","content":"ok"}]}`,
        'messages[1].tool_calls[0].function.arguments',
      ],
    ];
    for (const levels of [65, 20_000]) {
      for (const [body, param] of bodies(levels)) {
        const response = await post(body);
        const answer = (await response.json()) as { error: { type: string; param: string | null; message: string } };
        expect(response.status, `${param} ${levels}: ${answer.error.message}`).toBe(400);
        expect(answer.error).toMatchObject({ type: 'invalid_request_error', param });
        expect(answer.error.message).toMatch(/deeper than 64 levels/);
      }
    }
    expect(fake.log).toEqual([]);
    // 64 levels go through.
    for (const [body, param] of bodies(64)) expect((await post(body)).status, param).toBe(200);
    expect(fake.log).toHaveLength(3);
  });

  it('answers malformed JSON with 400 in OpenAI shape (raw HTTP)', async () => {
    const response = await fetch(`${baseURL}/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' },
      body: '{"model":',
    });
    expect(response.status).toBe(400);
    expect(await response.json()).toEqual({ error: { message: 'We could not parse the JSON body of your request.', type: 'invalid_request_error', param: null, code: null } });
  });

  it('says that a body is missing, or is JSON but no object, rather than "Invalid value for body: Field required" (raw HTTP)', async () => {
    const post = async (path: string, body: string) => {
      const response = await fetch(`${baseURL}${path}`, { method: 'POST', headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' }, body });
      expect(response.status, body).toBe(400);
      return ((await response.json()) as { error: unknown }).error;
    };
    for (const path of ['/chat/completions', '/embeddings']) {
      for (const body of ['', 'null']) {
        expect(await post(path, body), `${path} ${body}`).toEqual({ message: 'The request has no body: send a JSON object with the request\'s fields (`model`, ...).', type: 'invalid_request_error', param: null, code: 'missing_required_parameter' });
      }
      expect(await post(path, '[]')).toMatchObject({ message: 'The request body must be a JSON object with the request\'s fields, not an array.', param: null });
      expect(await post(path, '"hi"')).toMatchObject({ message: 'The request body must be a JSON object with the request\'s fields, not a string.', param: null });
    }
    expect(fake.log).toEqual([]);
  });
});

describe('embeddings', () => {
  it('answers float and base64 embeddings (the SDK asks for base64 and decodes it)', async () => {
    const viaSdk = await client.embeddings.create({ model: 'fake-embed', input: ['alpha', 'beta'] });
    expect(viaSdk.object).toBe('list');
    expect(viaSdk.model).toBe('fake-embed');
    expect(viaSdk.data.map((d) => d.index)).toEqual([0, 1]);
    for (const [i, text] of ['alpha', 'beta'].entries()) {
      expect(viaSdk.data[i]!.embedding).toHaveLength(EMBEDDING_DIMENSIONS);
      viaSdk.data[i]!.embedding.forEach((value, d) => expect(value).toBeCloseTo(fakeEmbedding(text)[d]!, 6));
    }
    expect(fake.requestsFor('fake-embed')[0]!.body.input).toEqual(['alpha', 'beta']);
    expect(viaSdk.usage.prompt_tokens).toBeGreaterThan(0);

    const floats = await client.embeddings.create({ model: 'fake-embed', input: 'alpha', encoding_format: 'float' });
    expect(Float32Array.from(floats.data[0]!.embedding)).toEqual(Float32Array.from(fakeEmbedding('alpha')));
  });

  it('writes float embeddings as float32 values in the shortest decimal that reads back to each (as OpenAI does), not as 17-digit doubles', async () => {
    // Two unit vectors of 1536 dimensions as a model's (a fixed pseudo-random sequence), and values at float32's edges.
    let seed = 7;
    const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) * 2 - 1;
    const vectors = [0, 1].map(() => {
      const vector = Float32Array.from({ length: 1536 }, random);
      const norm = Math.hypot(...vector);
      return vector.map((v) => v / norm);
    });
    vectors[1]!.set([0, 1, -1, 0.1, 1e-30, -3.4e38, 1.17549435e-38, 1e-45, 123456789, 16777216, 2.5e-7], 0);
    const upstream = JSON.stringify({ object: 'list', data: vectors.map((v, index) => ({ object: 'embedding', index, embedding: Array.from(v) })), model: 'fake-embed', usage: { prompt_tokens: 2, total_tokens: 2 } });
    fake.script('fake-embed', { rawBody: upstream });
    const response = await fetch(`${baseURL}/embeddings`, {
      method: 'POST',
      headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'fake-embed', input: ['a', 'b'], encoding_format: 'float' }),
    });
    expect(response.status).toBe(200);
    const text = await response.text();
    const answer = JSON.parse(text) as { data: { embedding: number[] }[] };
    answer.data.forEach(({ embedding }, i) => expect(Float32Array.from(embedding)).toEqual(vectors[i]));
    // Each value as written: the fewest significant digits that read back to the same float32.
    const shortest = (v: number) => {
      for (let digits = 1; ; digits++) if (Math.fround(Number(v.toPrecision(digits))) === v) return JSON.stringify(Number(v.toPrecision(digits)));
    };
    const written = [...text.matchAll(/"embedding":\[([^\]]*)\]/g)].map((m) => m[1]!.split(','));
    written.forEach((values, i) => expect(values).toEqual(Array.from(vectors[i]!, shortest)));
    // As 17-digit doubles the answer was ~1.7 times as long.
    expect(text.length).toBeLessThan(upstream.length * 0.65);
  });

  it('refuses an input it cannot take with a message that says what it takes', async () => {
    const tooMany = await apiError(client.embeddings.create({ model: 'fake-embed', input: Array.from({ length: 2049 }, () => 'a') }));
    expect(tooMany).toMatchObject({ status: 400, param: 'input' });
    expect(tooMany.message).toContain('input must be a text or a list of 1 to 2048 texts, none of them empty');
    for (const input of [[], '', ['a', '']]) {
      const error = await apiError(client.embeddings.create({ model: 'fake-embed', input }));
      expect(error.status, JSON.stringify(input)).toBe(400);
      expect(error.message, JSON.stringify(input)).toContain('Too small');
    }
    // Token ids (LangChain's OpenAIEmbeddings sends them unless told not to): what to send instead is said.
    for (const input of [[15339, 1917], [[15339, 1917]]]) {
      const error = await apiError(client.embeddings.create({ model: 'fake-embed', input }));
      expect(error, JSON.stringify(input)).toMatchObject({ status: 400, param: 'input', type: 'invalid_request_error' });
      expect(error.message).toContain('token ids are not taken: send the text');
    }
    expect(fake.requestsFor('fake-embed')).toHaveLength(0);
  });

  it('answers a compressed body with 415 in OpenAI\'s shape', async () => {
    const response = await fetch(`${baseURL}/embeddings`, {
      method: 'POST',
      headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json', 'content-encoding': 'gzip' },
      body: gzipSync(JSON.stringify({ model: 'fake-embed', input: 'alpha' })),
    });
    expect(response.status).toBe(415);
    expect(await response.json()).toEqual({ error: { message: 'Content-Encoding gzip is not supported: send the body uncompressed', type: 'invalid_request_error', param: null, code: null } });
    // Labelled gzip, sent plain: the same answer, and no model called (it was read as JSON and answered).
    const labelled = await fetch(`${baseURL}/embeddings`, {
      method: 'POST',
      headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json', 'content-encoding': 'gzip' },
      body: JSON.stringify({ model: 'fake-embed', input: 'labelled gzip' }),
    });
    expect(labelled.status).toBe(415);
    expect(await labelled.json()).toEqual({ error: { message: 'Content-Encoding gzip is not supported: send the body uncompressed', type: 'invalid_request_error', param: null, code: null } });
    expect(fake.requestsFor('fake-embed').filter((r) => JSON.stringify(r).includes('labelled gzip'))).toEqual([]);
  });

  it('answers a large batch in pieces that make the same JSON, in either format (the SDK reads it whole)', async () => {
    // 3 vectors of 30,000 dimensions: past the size Keel writes in one piece.
    const size = 30_000;
    const vectors = [0, 1, 2].map((i) => Float32Array.from({ length: size }, (_, d) => Math.fround(Math.sin(i * size + d) / 10)));
    const answer = () => ({
      rawBody: JSON.stringify({
        object: 'list',
        data: vectors.map((vector, index) => ({ object: 'embedding', index, embedding: Buffer.from(vector.buffer).toString('base64') })),
        usage: { prompt_tokens: 3, total_tokens: 3 },
      }),
    });
    fake.script('fake-embed', answer(), answer());
    const input = ['a', 'b', 'c'];
    // On the large calls' node (LARGE_CALL_TIMEOUT_MS).
    const viaSdk = await largeClient.embeddings.create({ model: 'fake-embed', input });
    expect(viaSdk.data.map((d) => d.embedding)).toEqual(vectors.map((vector) => Array.from(vector)));
    expect(viaSdk).toMatchObject({ object: 'list', model: 'fake-embed', usage: { prompt_tokens: 3, total_tokens: 3 } });
    const response = await fetch(`${largeURL}/embeddings`, {
      method: 'POST',
      headers: { authorization: `Bearer ${largeClient.apiKey}`, 'content-type': 'application/json' }, body: JSON.stringify({ model: 'fake-embed', input, encoding_format: 'float' }),
    });
    expect(response.status).toBe(200);
    expect(response.headers.get('transfer-encoding')).toBe('chunked'); // written in pieces
    const floats = (await response.json()) as { data: { embedding: number[] }[] };
    expect({ ...floats, data: floats.data.map((d) => ({ ...d, embedding: Float32Array.from(d.embedding) })) }).toEqual({
      object: 'list',
      data: vectors.map((vector, index) => ({ object: 'embedding', index, embedding: vector })),
      model: 'fake-embed',
      usage: { prompt_tokens: 3, total_tokens: 3 },
    });
  });

  it('asks the provider for shorter vectors (dimensions) and passes the user on', async () => {
    const short = await client.embeddings.create({ model: 'fake-embed', input: ['alpha', 'beta'], dimensions: 4, user: 'end-user-7' });
    expect(short.data.map((d) => d.embedding.length)).toEqual([4, 4]);
    short.data[0]!.embedding.forEach((value, d) => expect(value).toBeCloseTo(fakeEmbedding('alpha')[d]!, 6));
    expect(fake.requestsFor('fake-embed')[0]!.body).toMatchObject({ dimensions: 4, user: 'end-user-7' });
    // Without them, nothing of the kind goes upstream.
    await client.embeddings.create({ model: 'fake-embed', input: 'alpha' });
    expect(fake.requestsFor('fake-embed')[1]!.body).not.toHaveProperty('dimensions');
    expect(fake.requestsFor('fake-embed')[1]!.body).not.toHaveProperty('user');
  });

  it('refuses an answer of another size than the dimensions asked for, once, with a 502 that says so', async () => {
    const error = await apiError(client.embeddings.create({ model: 'fake-embed', input: 'a', dimensions: EMBEDDING_DIMENSIONS * 2 }));
    expect(error.status).toBe(502);
    expect(error.message).toContain(`vectors of ${EMBEDDING_DIMENSIONS} dimensions where ${EMBEDDING_DIMENSIONS * 2} were asked for`);
    expect(error.headers?.get('x-should-retry')).toBe('false');
    expect(fake.requestsFor('fake-embed')).toHaveLength(1);
  });

  it('refuses bad dimensions and a chat model', async () => {
    for (const dimensions of [0, -1, 1.5]) {
      expect(await apiError(client.embeddings.create({ model: 'fake-embed', input: 'a', dimensions }))).toMatchObject({ status: 400, param: 'dimensions' });
    }
    expect(await apiError(client.embeddings.create({ model: 'fake-chat', input: 'a' }))).toMatchObject({ status: 400, code: 'model_not_supported' });
    // An empty text has no embedding (OpenAI refuses it too): nothing is sent to embed.
    for (const input of ['', ['alpha', '']]) {
      const error = await apiError(client.embeddings.create({ model: 'fake-embed', input }));
      expect(error.status).toBe(400);
      expect(error.param).toMatch(/^input/);
    }
    expect(fake.requestsFor('fake-embed')).toHaveLength(0);
  });
});

describe('authentication and errors', () => {
  it('answers a body that is not sent as JSON with 415 unsupported_content_type, naming the header (as OpenAI does), and calls no model', async () => {
    const body = JSON.stringify({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }] });
    const cases: [contentType: string | undefined, says: string][] = [
      ['text/plain', 'you specified the header \'Content-Type: text/plain\''],
      ['text/plain; charset=utf-8', 'you specified the header \'Content-Type: text/plain; charset=utf-8\''],
      // curl -d without -H: the body read as a form made "model: missing".
      ['application/x-www-form-urlencoded', 'you specified the header \'Content-Type: application/x-www-form-urlencoded\''],
      [undefined, 'you sent no Content-Type header'],
    ];
    for (const [contentType, says] of cases) {
      const response = await fetch(`${baseURL}/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${client.apiKey}`, ...(contentType ? { 'content-type': contentType } : {}) },
        body: contentType ? body : new Blob([body]),
      });
      expect(response.status, contentType).toBe(415);
      const answer = (await response.json()) as { error: { message: string } };
      expect(answer, contentType).toEqual({ error: { message: expect.stringContaining('only accepts \'application/json\' requests') as string, type: 'invalid_request_error', param: null, code: 'unsupported_content_type' } });
      expect(answer.error.message, contentType).toContain(says);
    }
    expect(fake.log).toHaveLength(0);
  });

  it('takes the key from X-API-Key beside an empty Authorization header (clients that always send one)', async () => {
    const response = await fetch(`${baseURL}/chat/completions`, {
      method: 'POST',
      headers: { authorization: '', 'x-api-key': String(client.apiKey), 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }] }),
    });
    expect(response.status, await response.clone().text()).toBe(200);
    expect(((await response.json()) as { object: string }).object).toBe('chat.completion');
  });

  it('answers a bad or missing key with 401 invalid_api_key', async () => {
    for (const key of ['keel_not-a-real-key', 'nonsense']) {
      const error = await apiError(clientWith(key).models.list());
      expect(error.status).toBe(401);
      expect(error).toBeInstanceOf(OpenAI.AuthenticationError);
      expect(error.error).toEqual({ message: 'Incorrect API key provided.', type: 'invalid_request_error', param: null, code: 'invalid_api_key' });
    }
    const bare = await fetch(`${baseURL}/models`);
    expect(bare.status).toBe(401);
    expect(bare.headers.get('www-authenticate')).toBe('Bearer');
    expect(((await bare.json()) as { error: { code: string } }).error.code).toBe('invalid_api_key');
  });

  it('takes an access token as well as an API key', async () => {
    const completion = await clientWith(user.token).chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }] });
    expect(completion.choices[0]!.message.content).toBe('Hello from the fake model.');
  });

  it('refuses an access token in X-API-Key (API keys only there) with the 401 a wrong key gets, and calls no model', async () => {
    const sent = fake.log.length;
    for (const credential of [user.token, 'keel_not-a-real-key']) {
      const response = await fetch(`${baseURL}/chat/completions`, {
        method: 'POST',
        headers: { 'x-api-key': credential, 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }] }),
      });
      expect(response.status).toBe(401);
      expect(response.headers.get('www-authenticate')).toBe('Bearer');
      expect(await response.json()).toEqual({ error: { message: 'Incorrect API key provided.', type: 'invalid_request_error', param: null, code: 'invalid_api_key' } });
    }
    expect(fake.log).toHaveLength(sent);
  });

  it('answers an unknown model with 404 model_not_found before calling upstream', async () => {
    const error = await apiError(client.chat.completions.create({ model: 'gpt-nonexistent', messages: [{ role: 'user', content: 'Hi' }] }));
    expect(error).toBeInstanceOf(OpenAI.NotFoundError);
    expect(error.error).toEqual({ message: 'The model `gpt-nonexistent` does not exist or you do not have access to it.', type: 'invalid_request_error', param: null, code: 'model_not_found' });
    const agent = await apiError(client.chat.completions.create({ model: 'agent:1234', messages: [{ role: 'user', content: 'Hi' }] }));
    expect(agent).toMatchObject({ status: 404, code: 'model_not_found' });
    expect(fake.log).toEqual([]);
  });

  it('answers a key past its max_budget with 402 insufficient_quota and a key past its rpm with 429, before calling upstream', async () => {
    const hi = { model: 'fake-chat', messages: [{ role: 'user' as const, content: 'Hi' }] };
    const capped = clientWith((await createKey(ctx.app, user, { name: 'capped', max_budget: '0.000001' })).key);
    const broke = await apiError(capped.chat.completions.create(hi));
    expect(broke.status).toBe(402);
    expect(broke.error).toMatchObject({ type: 'insufficient_quota', code: 'insufficient_quota' });
    expect(broke.message).toMatch(/max_budget 0\.000001/);
    expect(fake.log).toEqual([]);

    const limited = clientWith((await createKey(ctx.app, user, { name: 'limited', rpm: 1 })).key);
    await limited.chat.completions.create(hi);
    const throttled = await apiError(limited.chat.completions.create(hi));
    expect(throttled).toBeInstanceOf(OpenAI.RateLimitError);
    expect(throttled.error).toMatchObject({ code: 'rate_limit_exceeded' });
    expect(throttled.message).toMatch(/rpm 1/);
    expect(Number(throttled.headers?.get('retry-after'))).toBeGreaterThan(0);
    expect(fake.log).toHaveLength(1);
  });

  it('meters every call: a usage record priced from the catalog, in the caller\'s billing summary', async () => {
    const metered = await createUser(ctx.app);
    const meteredClient = clientWith((await createKey(ctx.app, metered)).key);
    fake.script('fake-chat', { text: 'Ok.', usage: { prompt_tokens: 1000, completion_tokens: 500 } });
    await meteredClient.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }] });
    await ctx.app.meter.idle();
    const summary = await api('GET', '/billing/summary?group_by=model', metered.headers);
    expect(summary.statusCode, summary.body).toBe(200);
    // 1,000 input tokens at 1 per million + 500 output tokens at 2 per million = 0.002.
    expect(JSON.stringify(summary.json())).toMatch(/"model":"fake-chat"/);
    expect(JSON.stringify(summary.json())).toMatch(/"cost":"0\.002"/);
  });

  it('answers an unknown URL and a wrong method under /v1 with OpenAI\'s error object (404 unknown_url, 405 with Allow)', async () => {
    const headers = { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' };
    const unknown = await fetch(`${baseURL}/completions?stream=false`, { method: 'POST', headers, body: '{"model":"fake-chat","prompt":"Hi"}' });
    expect(unknown.status).toBe(404);
    expect(await unknown.json()).toEqual({ error: { message: 'Unknown request URL: POST /v1/completions', type: 'invalid_request_error', param: null, code: 'unknown_url' } });
    const wrong = await fetch(`${baseURL}/chat/completions`, { headers });
    expect(wrong.status).toBe(405);
    expect(wrong.headers.get('allow')).toBe('POST');
    expect(await wrong.json()).toEqual({ error: { message: 'Invalid method for URL: GET /v1/chat/completions (it takes POST)', type: 'invalid_request_error', param: null, code: 'method_not_allowed' } });
    // The SDK reads them as its own errors.
    const viaSdk = await apiError(client.post('/completions', { body: { model: 'fake-chat', prompt: 'Hi' } }));
    expect(viaSdk).toBeInstanceOf(OpenAI.NotFoundError);
    expect(viaSdk.code).toBe('unknown_url');
    // URLs the router cannot read: a model id past any model's length is a model that does not exist; a bad escape a 400.
    const long = await apiError(client.models.retrieve('m'.repeat(300)));
    expect(long).toMatchObject({ status: 404, type: 'invalid_request_error', code: 'model_not_found' });
    const unreadable = await fetch(`${baseURL}/models/%ZZ`, { headers });
    expect(unreadable.status).toBe(400);
    expect(await unreadable.json()).toEqual({ error: { message: 'Invalid URL', type: 'invalid_request_error', param: null, code: null } });
    // Without a key, the key is what is wrong first (as for every /v1 URL).
    const anonymous = await fetch(`${baseURL}/completions`, { method: 'POST' });
    expect(anonymous.status).toBe(401);
    expect(((await anonymous.json()) as { error: { code: string } }).error.code).toBe('invalid_api_key');
    expect(fake.log).toEqual([]);
  });

  it('keeps {detail} outside /v1', async () => {
    const response = await fetch(baseURL.replace(/\/v1$/, '/api/v1/models'));
    expect(response.status).toBe(401);
    expect(await response.json()).toEqual({ detail: 'Not authenticated' });
    const unknown = await fetch(baseURL.replace(/\/v1$/, '/api/v1/completions'), { method: 'POST' });
    expect(unknown.status).toBe(404);
    expect(await unknown.json()).toEqual({ detail: 'Not Found' });
    const wrong = await fetch(baseURL.replace(/\/v1$/, '/api/v1/models'), { method: 'DELETE' });
    expect(wrong.status).toBe(405);
    expect(await wrong.json()).toEqual({ detail: 'Method Not Allowed' });
  });
});

describe('the call path behind /v1', () => {
  it('retries an upstream 429 (honouring retry-after) and answers', async () => {
    fake.script('fake-chat', { status: 429, headers: { 'retry-after': '0' } });
    const completion = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }] });
    expect(completion.choices[0]!.message.content).toBe('Hello from the fake model.');
    expect(fake.requestsFor('fake-chat').map((r) => r.reply)).toEqual([429, 200]);
  });

  it("retries an embeddings 200 whose connection drops after its headers, over the wire and through the SDK (Google's): the client gets the next answer, the cut-off try charged its inputs' estimate", async () => {
    expect((await api('POST', '/providers', admin, { name: 'gem', kind: 'google', base_url: fake.url, api_key: 'sk-gem' })).statusCode).toBe(200);
    await addModel({ id: 'gem-embed', provider: 'gem', capabilities: ['embedding'] });
    const owner = await createUser(ctx.app);
    const own = clientWith((await createKey(ctx.app, owner)).key);
    const input = ['alpha', 'beta'];
    for (const model of ['fake-embed', 'gem-embed']) {
      fake.reset();
      fake.script(model, { drop: { afterChunks: 0 } });
      const answer = await own.embeddings.create({ model, input, encoding_format: 'float' });
      expect(answer.data.map((d) => Float32Array.from(d.embedding)), model).toEqual(input.map((text) => Float32Array.from(fakeEmbedding(text))));
      expect(fake.log.map((r) => r.reply), model).toEqual(['drop', 200]);
    }
    await ctx.app.meter.idle();
    const rows = await ctx.app.db
      .select({ model: usageRecords.model, status: usageRecords.status, estimated: usageRecords.estimated, attempts: usageRecords.attempts, input: usageRecords.input_tokens })
      .from(usageRecords)
      .where(eq(usageRecords.owner_id, owner.user.id));
    const byModel = (model: string) => rows.find((r) => r.model === model);
    // Google's answer reports no usage: its inputs' estimate, twice (the dropped try's and its own).
    const estimate = byModel('gem-embed')!.input / 2;
    expect(estimate).toBeGreaterThan(0);
    // The wire's answer reports 3 tokens (the fake's: ceil(5/4) + ceil(4/4)), the dropped try adds its estimate.
    expect([byModel('fake-embed'), byModel('gem-embed')]).toEqual([
      { model: 'fake-embed', status: 'success', estimated: true, attempts: 2, input: 3 + estimate },
      { model: 'gem-embed', status: 'success', estimated: true, attempts: 2, input: 2 * estimate },
    ]);
  });

  it('times out a hung upstream after MODEL_TIMEOUT_MS: 504 timeout, its request aborted, not tried again (the client waits; a run would retry)', async () => {
    fake.script('fake-backup', { hang: true }, { text: 'too late' });
    const started = Date.now();
    const error = await apiError(client.chat.completions.create({ model: 'fake-backup', messages: [{ role: 'user', content: 'Hi' }] }));
    expect(error.status).toBe(504);
    expect(error.code).toBe('timeout');
    expect(Date.now() - started).toBeGreaterThanOrEqual(TIMEOUT_MS - 100);
    expect(Date.now() - started).toBeLessThan(2 * TIMEOUT_MS);
    await fake.waitFor((log) => log.length === 1 && log[0]!.aborted);
    fake.reset();
  });

  it('aborts the upstream request when the client disconnects mid-stream, and logs it as a warning, not an error', async () => {
    fake.script('fake-chat', { chunks: Array.from({ length: 40 }, (_, i) => `w${i} `), chunkDelayMs: 50 });
    const { data: stream, response } = await client.chat.completions
      .create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Tell me a long story' }], stream: true })
      .withResponse();
    const reqId = response.headers.get('x-request-id');
    let seen = 0;
    for await (const chunk of stream) {
      if (chunk.choices[0]?.delta.content) seen += 1;
      if (seen === 2) break; // leaving the loop aborts the HTTP request
    }
    await fake.waitFor((log) => log[0]?.aborted === true);
    const [upstream] = fake.log;
    expect(upstream!.completed).toBe(false);
    expect(upstream!.chunksSent).toBeLessThan(40);
    // A client going away is no fault of the server's: a warning an error alert does not count.
    await loggedUntil(() => linesOf(reqId).length > 0);
    await new Promise((resolve) => setTimeout(resolve, 100)); // and nothing more comes
    expect(linesOf(reqId)).toEqual([expect.objectContaining({ level: LEVEL.warn, model: 'fake-chat', status: 499, err: expect.objectContaining({ type: 'ModelCallAbortedError' }) as unknown })]);
  });

  it('aborts the upstream request when the client disconnects before a non-stream answer', async () => {
    // The answer would come at 900 ms, inside the attempt's timeout (1 s, whose abort would be followed
    // by a retry): only the client's going away can abort it this early.
    fake.script('fake-chat', { text: 'Too late.', chunkDelayMs: 900 });
    const client = new AbortController();
    const call = clientWith((await createKey(ctx.app, user)).key).chat.completions.create(
      { model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }] },
      { signal: client.signal },
    );
    const settled = call.then(
      () => 'answered',
      () => 'aborted',
    );
    await fake.waitFor((log) => log.length === 1);
    client.abort();
    expect(await settled).toBe('aborted');
    await fake.waitFor((log) => log[0]?.aborted === true, 700);
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(fake.log.map((r) => [r.aborted, r.completed])).toEqual([[true, false]]); // and no retry
  });

  it('answers from the fallback model when the first keeps failing', async () => {
    fake.script('fake-primary', { status: 500 }, { status: 500 });
    const completion = await client.chat.completions.create({ model: 'fake-primary', messages: [{ role: 'user', content: 'Hi' }] });
    expect(completion.model).toBe('fake-backup');
    expect(fake.log.map((r) => [r.model, r.reply])).toEqual([
      ['fake-primary', 500],
      ['fake-primary', 500],
      ['fake-backup', 200],
    ]);
  });

  it('names the model that answered in every chunk of a stream, as the non-streamed answer does (a fallback, an alias)', async () => {
    fake.script('fake-primary', { status: 500 }, { status: 500 });
    fake.script('fake-backup', { chunks: ['Hel', 'lo'] });
    const fellBack = await client.chat.completions.create({ model: 'fake-primary', messages: [{ role: 'user', content: 'Hi' }], stream: true, stream_options: { include_usage: true } });
    const models: string[] = [];
    for await (const chunk of fellBack) models.push(chunk.model);
    expect(models.length).toBeGreaterThan(3);
    expect(new Set(models)).toEqual(new Set(['fake-backup']));
    const aliased = await client.chat.completions.create({ model: 'fake-latest', messages: [{ role: 'user', content: 'Hi' }], stream: true });
    const aliasModels = new Set<string>();
    for await (const chunk of aliased) aliasModels.add(chunk.model);
    expect(aliasModels).toEqual(new Set(['fake-chat']));
  });

  it('maps an upstream 400 to the client\'s 400 and a failing upstream to 502 (the SDK would retry a 5xx)', async () => {
    fake.script('fake-chat', { status: 400, body: { error: { message: 'context too long', type: 'invalid_request_error' } } });
    const refused = await apiError(client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }] }));
    expect(refused).toMatchObject({ status: 400, code: 'upstream_rejected', param: null });
    expect(refused.message).toContain('context too long');
    // The provider's code and param come through (clients trim their history on context_length_exceeded), streamed or not.
    for (const stream of [false, true]) {
      fake.script('fake-chat', { status: 400, body: { error: { message: 'Too many tokens', type: 'invalid_request_error', param: 'messages', code: 'context_length_exceeded' } } });
      const tooLong = await apiError(client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream }));
      expect(tooLong).toMatchObject({ status: 400, type: 'invalid_request_error', code: 'context_length_exceeded', param: 'messages' });
    }
    // Not an identifier: not passed on.
    fake.script('fake-chat', { status: 400, body: { error: { message: 'Bad', code: 'two words', param: { a: 1 } } } });
    expect(await apiError(client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }] }))).toMatchObject({ code: 'upstream_rejected', param: null });
    fake.script('fake-backup', { status: 503 }, { status: 503 });
    const failed = await apiError(client.chat.completions.create({ model: 'fake-backup', messages: [{ role: 'user', content: 'Hi' }] }));
    expect(failed).toMatchObject({ status: 502, type: 'server_error', code: 'upstream_error' });
  });

  it('refuses an image it may not or cannot fetch with 400 invalid_image_url, unretried, without calling the model; a data URL goes on', async () => {
    const ask = (url: string) =>
      client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: [{ type: 'text', text: 'What is this?' }, { type: 'image_url', image_url: { url } }] }] });
    // Addresses of this host and its network: the SDK's download refuses them (no request leaves).
    for (const url of [`${fake.url}/image.png`, 'http://localhost/image.png', 'http://169.254.169.254/latest/meta-data/']) {
      const refused = await apiError(ask(url));
      expect(refused, url).toMatchObject({ status: 400, type: 'invalid_request_error', code: 'invalid_image_url' });
      expect(refused.message, url).toMatch(/is not allowed/);
    }
    // Not an image in base64 (another type, text, bad characters or length): the client's 400, not an error of the SDK's (500).
    for (const url of ['not a url', 'file:///etc/passwd', 'data:text/plain,hello', 'data:,,,;;;', 'data:;base64,AAAA', 'data:image/png;base64,!!!notbase64', 'data:image/png;base64,AAAAA', 'data:image/png,rawbytes']) {
      const invalid = await apiError(ask(url));
      expect(invalid, url).toMatchObject({ status: 400, param: 'messages[0].content[1].image_url.url' });
      expect(invalid.message).toMatch(/Expected an http\(s\) URL or a data URL/);
    }
    expect(fake.log).toEqual([]);
    fake.script('fake-chat', { text: 'A pixel.' });
    const pixel = 'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==';
    expect((await ask(pixel)).choices[0]!.message.content).toBe('A pixel.');
    const sent = (fake.log[0]!.body.messages as { content: unknown }[])[0]!.content;
    expect(sent).toEqual([{ type: 'text', text: 'What is this?' }, { type: 'image_url', image_url: { url: pixel } }]);
  });

  it('refuses a prompt naming more images by URL than one call fetches (MODEL_MAX_DOWNLOADS) with 400 invalid_image_url, before fetching any', async () => {
    // Public names (.example never resolves): fetched, each would fail on its own, with another message.
    const images = Array.from({ length: 51 }, (_, i) => ({ type: 'image_url' as const, image_url: { url: `https://images.example/${i}.png` } }));
    const refused = await apiError(client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: [{ type: 'text', text: 'Compare these' }, ...images] }] }));
    expect(refused).toMatchObject({ status: 400, type: 'invalid_request_error', code: 'invalid_image_url' });
    expect(refused.message).toMatch(/names 51 images or files by URL for Keel to fetch for this model; at most 50 \(MODEL_MAX_DOWNLOADS\)/);
    expect(fake.log).toEqual([]);
  });

  it('passes an image\'s detail on to an openai provider (low costs a fraction of the tokens), and none when the client set none', async () => {
    expect((await api('POST', '/providers', admin, { name: 'oa', kind: 'openai', base_url: fake.url, api_key: 'sk-oa' })).statusCode).toBe(200);
    await addModel({ id: 'oa-vision', provider: 'oa', capabilities: ['chat', 'vision'] });
    fake.script('oa-vision', { text: 'A pixel.' }, { text: 'A pixel.' });
    const pixel = 'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==';
    for (const detail of ['low', undefined] as const) {
      const image = { url: pixel, ...(detail && { detail }) };
      await client.chat.completions.create({ model: 'oa-vision', messages: [{ role: 'user', content: [{ type: 'text', text: 'What is this?' }, { type: 'image_url', image_url: image }] }] });
    }
    const sent = fake.requestsFor('oa-vision').map((r) => (r.body.messages as { content: { image_url?: unknown }[] }[])[0]!.content[1]!.image_url);
    expect(sent).toEqual([{ url: pixel, detail: 'low' }, { url: pixel }]);
  });

  it('tells the client not to retry what the gateway retried already (x-should-retry: false), so its own retries do not multiply the calls', async () => {
    const retrying = new OpenAI({ apiKey: (await createKey(ctx.app, user)).key, baseURL, maxRetries: 2 }); // the client's default
    const hi = { model: 'fake-backup', messages: [{ role: 'user' as const, content: 'Hi' }] };
    fake.script('fake-backup', ...Array<ScriptedReply>(6).fill({ status: 503 }));
    const failed = await retrying.chat.completions.create(hi).withResponse().catch((e: unknown) => e as InstanceType<typeof OpenAI.APIError>);
    expect(failed).toMatchObject({ status: 502, code: 'upstream_error' });
    expect((failed as InstanceType<typeof OpenAI.APIError>).headers?.get('x-should-retry')).toBe('false');
    expect(fake.log).toHaveLength(2); // the gateway's own attempts (MODEL_MAX_RETRIES=1), not 3 × 2
    // A model that breaks the tool choice: charged once, not once per retry of the client.
    fake.reset();
    fake.script('fake-chat', ...Array<ScriptedReply>(3).fill({ text: 'No tools.' }));
    const tools = [{ type: 'function' as const, function: { name: 'lookup', parameters: { type: 'object', properties: {} } } }];
    const broken = await apiError(retrying.chat.completions.create({ ...hi, model: 'fake-chat', tools, tool_choice: 'required' }));
    expect(broken.status).toBe(502);
    expect(fake.log).toHaveLength(1);
    // A rate limit the gateway could not wait out is the client's to back off from, by its retry-after.
    fake.reset();
    fake.script('fake-backup', ...Array<ScriptedReply>(2).fill({ status: 429, headers: { 'retry-after': '0' } }), { text: 'At last.' });
    expect((await retrying.chat.completions.create(hi)).choices[0]!.message.content).toBe('At last.');
    expect(fake.log).toHaveLength(3);
  });

  it('tells the client of a provider\'s failure without its words or address, which go to the usage record', async () => {
    const owner = await createUser(ctx.app);
    const own = clientWith((await createKey(ctx.app, owner)).key);
    const hi = { model: 'fake-chat', messages: [{ role: 'user' as const, content: 'Hi' }] };
    // The operator's provider key is wrong: the provider's message shows a fragment of it.
    const words = 'Incorrect API key provided: sk-secr*************1234.';
    fake.script('fake-chat', { status: 401, body: { error: { message: words, type: 'invalid_request_error', code: 'invalid_api_key' } } });
    const rejected = await apiError(own.chat.completions.create(hi));
    expect(rejected.error).toEqual({ message: 'The model provider refused the request (status 401)', type: 'server_error', param: null, code: 'upstream_error' });
    // A provider nothing listens for: neither its address nor the socket error reach the client, streamed or not.
    expect((await api('POST', '/providers', admin, { name: 'refused', kind: 'openai-compatible', base_url: 'http://127.0.0.1:1/v1', api_key: 'sk-refused' })).statusCode).toBe(200);
    await addModel({ id: 'refused-chat', provider: 'refused', capabilities: ['chat'] });
    for (const stream of [false, true]) {
      const unreachable = await apiError(own.chat.completions.create({ ...hi, model: 'refused-chat', stream }));
      expect(unreachable.status).toBe(502);
      expect(unreachable.error).toEqual({ message: 'The model provider could not be reached', type: 'server_error', param: null, code: 'upstream_error' });
    }
    // The operator reads the whole story in the usage records.
    await ctx.app.meter.idle();
    const rows = await ctx.app.db.select({ model: usageRecords.model, error: usageRecords.error }).from(usageRecords).where(eq(usageRecords.owner_id, owner.user.id));
    expect(rows.filter((r) => r.model === 'fake-chat').map((r) => r.error)).toEqual([expect.stringContaining(words)]);
    expect(rows.filter((r) => r.model === 'refused-chat').map((r) => r.error)).toEqual([expect.stringMatching(/ECONNREFUSED 127\.0\.0\.1:1/), expect.stringMatching(/ECONNREFUSED 127\.0\.0\.1:1/)]);
  });

  it('answers a provider still rate limiting after the retries with 429 and its Retry-After (the SDK backs off as told)', async () => {
    const hi = { model: 'fake-backup', messages: [{ role: 'user' as const, content: 'Hi' }] };
    fake.script('fake-backup', { status: 429, headers: { 'retry-after': '0' } }, { status: 429, headers: { 'retry-after': '7' } });
    const limited = await apiError(client.chat.completions.create(hi));
    expect(limited).toBeInstanceOf(OpenAI.RateLimitError);
    expect(limited.error).toEqual({ message: 'The model provider refused the request (status 429)', type: 'requests', param: null, code: 'rate_limit_exceeded' });
    expect(limited.headers?.get('retry-after')).toBe('7');
    expect(fake.requestsFor('fake-backup').map((r) => r.reply)).toEqual([429, 429]);
    // A wait longer than the gateway waits between tries (MODEL_RETRY_MAX_WAIT_MS) is passed on at
    // once, untried again: a 429 as it is, a 5xx as a 503 the client may retry after it.
    for (const status of [429, 503, 500]) {
      fake.reset();
      fake.script('fake-backup', { status, headers: { 'retry-after': '30' } }, { text: 'too soon' });
      const asked = await apiError(client.chat.completions.create(hi));
      expect([asked.status, asked.headers?.get('retry-after'), asked.headers?.get('x-should-retry')]).toEqual([status === 429 ? 429 : 503, '30', null]);
      expect(fake.log).toHaveLength(1);
    }
    // A provider's absurd wait (a broken or hostile upstream) is passed on as a Retry-After in
    // seconds (digits, not `1e+300`), at most a day.
    for (const [said, told] of [['1e300', '86400'], ['99999999999', '86400'], ['1.5', '2']] as const) {
      fake.reset();
      fake.script('fake-backup', { status: 429, headers: { 'retry-after': said } }, { status: 429, headers: { 'retry-after': said } }, { text: 'too soon' });
      const asked = await apiError(client.chat.completions.create(hi));
      expect([asked.status, asked.headers?.get('retry-after')], said).toEqual([429, told]);
    }
    fake.reset();
    // Without a retry-after upstream, none is made up.
    fake.script('fake-backup', { status: 429 }, { status: 429 });
    const bare = await apiError(client.chat.completions.create({ ...hi, stream: true }));
    expect(bare.status).toBe(429);
    expect(bare.headers?.get('retry-after')).toBeNull();
  });

  it('answers an upstream 200 that is no chat completion with 502 upstream_error, and ends a stream at such a chunk with its error event', async () => {
    fake.script('fake-chat', { rawBody: '<html>Bad gateway</html>' });
    const failed = await apiError(client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }] }));
    expect(failed).toMatchObject({ status: 502, type: 'server_error', code: 'upstream_error' });
    expect(fake.log).toHaveLength(1); // not retried

    fake.reset();
    const chunk = { id: 'x', object: 'chat.completion.chunk', created: 1, model: 'fake-chat', choices: [{ index: 0, delta: { content: 'Hi' }, finish_reason: null }] };
    fake.script('fake-chat', { rawBody: `data: ${JSON.stringify(chunk)}\n\ndata: <html>Bad gateway</html>\n\n` });
    const stream = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true });
    const texts: string[] = [];
    const error = await apiError(
      (async () => {
        for await (const part of stream) texts.push(part.choices[0]?.delta.content ?? '');
      })(),
    );
    expect(error.error).toMatchObject({ type: 'server_error', code: 'upstream_error' });
    expect(texts.join('')).toBe('Hi');
  });

  it('answers an upstream answer past MODEL_MAX_RESPONSE_BYTES (tools and embeddings: the AI SDK\'s path) with 502 naming the limit, closes its request, records the call as an error', async () => {
    const owner = await createUser(ctx.app);
    const own = clientWith((await createKey(ctx.app, owner)).key);
    const limit = ctx.app.settings.MODEL_MAX_RESPONSE_BYTES;
    const message = `The model's answer exceeded ${limit} bytes`;
    // 64 times the limit in whitespace: JSON the SDK would have read whole and parsed.
    const padBytes = 64 * limit;
    fake.script('fake-chat', { text: 'Hi', padBytes });
    // What the upstream saw, printed should the call not fail (a retry would show here).
    const upstreamSaw = () => fake.log.map(({ model, path, reply, aborted, completed, bodyBytesSent }) => ({ model, path, reply, aborted, completed, bodyBytesSent }));
    const chat = await apiError(own.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], tools: [{ type: 'function', function: { name: 'lookup', parameters: { type: 'object', properties: {} } } }] }), upstreamSaw);
    expect(chat.status).toBe(502);
    expect(chat.error).toEqual({ message, type: 'server_error', param: null, code: 'upstream_error' });
    fake.script('fake-embed', { padBytes });
    const embed = await apiError(own.embeddings.create({ model: 'fake-embed', input: 'alpha' }), upstreamSaw);
    expect(embed.status).toBe(502);
    expect(embed.error).toEqual({ message, type: 'server_error', param: null, code: 'upstream_error' });
    await fake.waitFor((log) => log.length === 2 && log.every((r) => r.aborted));
    // What was read, and at most what the sockets' buffers hold beyond it (a few MiB on loopback).
    expect(fake.log.map((r) => r.bodyBytesSent < padBytes / 2)).toEqual([true, true]);
    await ctx.app.meter.idle();
    const rows = await ctx.app.db.select({ model: usageRecords.model, status: usageRecords.status, error: usageRecords.error }).from(usageRecords).where(eq(usageRecords.owner_id, owner.user.id));
    expect(rows.sort((a, b) => a.model.localeCompare(b.model))).toEqual([
      { model: 'fake-chat', status: 'error', error: message },
      { model: 'fake-embed', status: 'error', error: message },
    ]);
  });

  it('says length, not tool_calls, for tool calls cut off by max_tokens, streamed or not, as OpenAI does (the SDK\'s parse() raises on it)', async () => {
    const call = { id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Pa' } };
    const completion = { id: 'x', object: 'chat.completion', created: 1, model: 'fake-chat', choices: [{ index: 0, message: { role: 'assistant', content: null, tool_calls: [call] }, finish_reason: 'length' }] };
    const chunks = [
      { choices: [{ index: 0, delta: { tool_calls: [{ index: 0, ...call }] }, finish_reason: null }] },
      { choices: [{ index: 0, delta: {}, finish_reason: 'length' }] },
    ];
    const sse = `${chunks.map((c) => `data: ${JSON.stringify({ id: 'x', object: 'chat.completion.chunk', created: 1, model: 'fake-chat', ...c })}\n\n`).join('')}data: [DONE]\n\n`;
    fake.script('fake-chat', { rawBody: JSON.stringify(completion) }, { rawBody: sse }, { rawBody: JSON.stringify(completion) });
    const tools: OpenAI.ChatCompletionTool[] = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } } }];
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Weather in Paris?' }];
    const plain = await client.chat.completions.create({ model: 'fake-chat', messages, tools, max_tokens: 5 });
    expect(plain.choices[0]).toMatchObject({ finish_reason: 'length', message: { tool_calls: [call] } });
    const streamed = await client.chat.completions.stream({ model: 'fake-chat', messages, tools, max_tokens: 5 }).finalChatCompletion();
    expect(streamed.choices[0]).toMatchObject({ finish_reason: 'length', message: { tool_calls: [call] } });
    const { LengthFinishReasonError } = await import('openai/core/error');
    const strictTools: OpenAI.ChatCompletionTool[] = [{ type: 'function', function: { name: 'get_weather', strict: true, parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'], additionalProperties: false } } }];
    await expect(client.chat.completions.parse({ model: 'fake-chat', messages, tools: strictTools, max_tokens: 5 })).rejects.toBeInstanceOf(LengthFinishReasonError);
  });

  it('says stop, not tool_calls, for an answer without tool calls whose provider said tool_calls (a tool call its server could not parse)', async () => {
    const completion = { id: 'x', object: 'chat.completion', created: 1, model: 'fake-chat', choices: [{ index: 0, message: { role: 'assistant', content: '<tool_call>{"name": "get_weather"' }, finish_reason: 'tool_calls' }] };
    const chunks = [
      { choices: [{ index: 0, delta: { content: '<tool_call>{"name": "get_weather"' }, finish_reason: null }] },
      { choices: [{ index: 0, delta: {}, finish_reason: 'tool_calls' }] },
    ];
    const sse = `${chunks.map((c) => `data: ${JSON.stringify({ id: 'x', object: 'chat.completion.chunk', created: 1, model: 'fake-chat', ...c })}\n\n`).join('')}data: [DONE]\n\n`;
    fake.script('fake-chat', { rawBody: JSON.stringify(completion) }, { rawBody: sse });
    const tools: OpenAI.ChatCompletionTool[] = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } } }];
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Weather in Paris?' }];
    const plain = await client.chat.completions.create({ model: 'fake-chat', messages, tools });
    expect(plain.choices[0]).toMatchObject({ finish_reason: 'stop', message: { content: completion.choices[0]!.message.content } });
    expect(plain.choices[0]!.message.tool_calls).toBeUndefined();
    const streamed = await client.chat.completions.stream({ model: 'fake-chat', messages, tools }).finalChatCompletion();
    expect(streamed.choices[0]).toMatchObject({ finish_reason: 'stop' });
  });

  it('answers a model\'s reasoning as reasoning_content, streamed or not (as the servers that reason write it)', async () => {
    fake.script('fake-chat', { text: 'Four.', reasoning: 'Two and two.' }, { text: 'Four.', reasoning: 'Two and two.' });
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'What is 2+2?' }];
    const plain = await client.chat.completions.create({ model: 'fake-chat', messages });
    expect(plain.choices[0]!.message).toMatchObject({ content: 'Four.', reasoning_content: 'Two and two.' });
    let reasoning = '';
    for await (const chunk of await client.chat.completions.create({ model: 'fake-chat', messages, stream: true })) {
      reasoning += (chunk.choices[0]?.delta as { reasoning_content?: string } | undefined)?.reasoning_content ?? '';
    }
    expect(reasoning).toBe('Two and two.');
  });

  it('a stream the upstream cut off (no finish_reason, no [DONE]) ends with an error event, not finish_reason stop', async () => {
    const chunk = { id: 'x', object: 'chat.completion.chunk', created: 1, model: 'fake-chat', choices: [{ index: 0, delta: { content: 'The answer is' }, finish_reason: null }] };
    fake.script('fake-chat', { rawBody: `data: ${JSON.stringify(chunk)}\n\n` });
    const stream = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true });
    const finishes: (string | null | undefined)[] = [];
    const error = await apiError(
      (async () => {
        for await (const part of stream) finishes.push(part.choices[0]?.finish_reason);
      })(),
    );
    expect(error.error).toMatchObject({ type: 'server_error', code: 'upstream_error' });
    expect(finishes).not.toContain('stop');
  });

  it('ends a stream at the upstream\'s [DONE] though the upstream keeps its connection open', async () => {
    fake.script('fake-chat', { text: 'Hello there', holdOpen: true });
    const started = Date.now();
    const stream = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true });
    const parts = [];
    for await (const part of stream) parts.push(part);
    expect(Date.now() - started).toBeLessThan(TIMEOUT_MS);
    expect(parts.map((p) => p.choices[0]?.delta.content ?? '').join('')).toBe('Hello there');
    expect(parts.at(-1)!.choices[0]!.finish_reason).toBe('stop');
    await fake.waitFor((log) => log[0]?.aborted === true, 1_000);
  });

  it('ends a stream past MODEL_STREAM_TIMEOUT_MS with a timeout error event, and closes the upstream request', async () => {
    // A chunk every 100 ms for 20 s: each inside the chunk timeout (1 s).
    fake.script('fake-chat', { chunks: Array.from({ length: 200 }, () => 'x '), chunkDelayMs: 100 });
    const stream = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true });
    const started = Date.now();
    let texts = 0;
    const error = await apiError(
      (async () => {
        for await (const part of stream) {
          if (part.choices[0]?.delta.content) texts += 1;
          if (Date.now() - started > 3 * STREAM_TIMEOUT_MS) break;
        }
      })(),
    );
    expect(error.error).toMatchObject({ type: 'server_error', code: 'timeout' });
    expect(Date.now() - started).toBeLessThan(STREAM_TIMEOUT_MS + TIMEOUT_MS);
    expect(texts).toBeGreaterThan(5);
    await fake.waitFor((log) => log[0]?.aborted === true);
  });

  it('answers a stream whose upstream keeps it alive with SSE comments past the chunk timeout while its model thinks, without trying it again', async () => {
    // Comments for 1.3 × MODEL_TIMEOUT_MS, inside MODEL_STREAM_TIMEOUT_MS; a retry would answer at once.
    fake.script('fake-chat', { text: 'Thought it through.', comments: { everyMs: 100, forMs: 1_300 } }, { text: 'Tried again.' });
    const stream = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Think' }], stream: true });
    let text = '';
    for await (const part of stream) text += part.choices[0]?.delta.content ?? '';
    expect(text).toBe('Thought it through.');
    expect(fake.log.map((r) => [r.reply, r.completed])).toEqual([[200, true]]);
    expect(fake.log[0]!.commentsSent).toBeGreaterThan(5);
  });

  it('ends a stream that fails after its first chunk with an error event the SDK raises', async () => {
    // The delay lets the first chunk reach the client before the drop (after that, no retry).
    fake.script('fake-chat', { chunks: ['a ', 'b ', 'c '], chunkDelayMs: 30, drop: { afterChunks: 2 } });
    const stream = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true });
    const texts: string[] = [];
    const error = await (async () => {
      for await (const chunk of stream) texts.push(chunk.choices[0]?.delta.content ?? '');
    })().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(OpenAI.APIError);
    expect((error as InstanceType<typeof OpenAI.APIError>).error).toMatchObject({ type: 'server_error', code: 'upstream_error' });
    expect(texts.join('')).toMatch(/^a (b )?$/);
    expect(fake.log.map((r) => r.reply)).toEqual(['drop']);
  });

  it('logs a stream that fails after its first chunk once, as an error with the request id, the model and the error, never the prompt', async () => {
    const prompt = 'my-private-prompt-text';
    fake.script('fake-chat', { chunks: ['a ', 'b ', 'c '], chunkDelayMs: 30, drop: { afterChunks: 2 } });
    const { data: stream, response } = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: prompt }], stream: true }).withResponse();
    const reqId = response.headers.get('x-request-id');
    expect(reqId).toBeTruthy();
    await apiError(
      (async () => {
        for await (const _ of stream);
      })(),
    );
    const lines = linesOf(reqId);
    expect(lines).toEqual([
      expect.objectContaining({
        level: LEVEL.error,
        model: 'fake-chat',
        status: 502,
        err: expect.objectContaining({ type: 'UpstreamError', message: expect.stringMatching(/^Upstream connection error/) as unknown }) as unknown,
      }),
    ]);
    expect(JSON.stringify(logs.lines())).not.toContain(prompt);
    expect(JSON.stringify(logs.lines())).not.toContain('sk-upstream');
  });
});

describe('refusals (structured outputs)', () => {
  const NO = "I'm sorry, I can't help with that request.";
  const format = zodResponseFormat(z.object({ city: z.string(), celsius: z.number() }), 'weather');
  const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'The weather in Paris?' }];
  /** `fake-chat` goes over the wire (openai-compatible); `oa-chat`, an `openai` provider's, through the AI SDK's openai model. */
  const MODELS = ['fake-chat', 'oa-chat'];

  beforeAll(async () => {
    const created = await api('POST', '/providers', admin, { name: 'oa-refusing', kind: 'openai', base_url: fake.url, api_key: 'sk-oa-refusing' });
    expect(created.statusCode, created.body).toBe(200);
    await addModel({ id: 'oa-chat', provider: 'oa-refusing', capabilities: ['chat'] });
  });

  it('answers a refusal as OpenAI does (content null, refusal, finish_reason stop): parse() hands it back, on the wire and through the SDK', async () => {
    for (const model of MODELS) {
      fake.script(model, { refusal: NO, usage: { prompt_tokens: 20, completion_tokens: 9 } });
      const completion = await client.chat.completions.parse({ model, messages, response_format: format });
      expect(completion.choices[0], model).toMatchObject({ finish_reason: 'stop', message: { role: 'assistant', content: null, refusal: NO, parsed: null } });
      expect(completion.usage, model).toMatchObject({ prompt_tokens: 20, completion_tokens: 9 });
    }
    // An answer, of course, is still parsed.
    fake.script('fake-chat', { text: '{"city":"Paris","celsius":21}' });
    const parsed = await client.chat.completions.parse({ model: 'fake-chat', messages, response_format: format });
    expect(parsed.choices[0]!.message).toMatchObject({ refusal: null, parsed: { city: 'Paris', celsius: 21 } });
  });

  it('streams a refusal as refusal deltas: the stream helper hands it back, on the wire and through the SDK', async () => {
    for (const model of MODELS) {
      fake.script(model, { refusal: NO });
      const stream = client.chat.completions.stream({ model, messages, response_format: format, stream_options: { include_usage: true } });
      const pieces: string[] = [];
      stream.on('refusal.delta', ({ delta }) => pieces.push(delta));
      const final = await stream.finalChatCompletion();
      expect(pieces.length, model).toBeGreaterThan(1);
      expect(pieces.join(''), model).toBe(NO);
      expect(final.choices[0], model).toMatchObject({ finish_reason: 'stop', message: { refusal: NO, parsed: null } });
      expect(final.choices[0]!.message.content || null, model).toBeNull();
    }
  });

  it('sends a refusal the client sends back upstream as the assistant\'s text', async () => {
    fake.script('fake-chat', { text: 'Fine.' });
    await client.chat.completions.create({ model: 'fake-chat', messages: [...messages, { role: 'assistant', content: null, refusal: NO }, { role: 'user', content: 'Why?' }] });
    expect((fake.requestsFor('fake-chat')[0]!.body.messages as unknown[])[1]).toEqual({ role: 'assistant', content: NO });
  });
});

describe('log probabilities, logit_bias and the other fields of OpenAI\'s request', () => {
  const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Hi' }];
  it('serves a request as apps send it (streamed parallel tool calls, usage, seed, stop list, max_completion_tokens, user, metadata, store) through the stream helper', async () => {
    fake.script('fake-chat', {
      toolCalls: [
        { id: 'call_a', name: 'weather', arguments: '{"city":"Paris"}' },
        { id: 'call_b', name: 'weather', arguments: '{"city":"Oslo"}' },
      ],
      usage: { prompt_tokens: 30, completion_tokens: 12 },
    });
    const tools: OpenAI.ChatCompletionTool[] = [{ type: 'function', function: { name: 'weather', parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } }];
    const final = await client.chat.completions
      .stream({
        model: 'fake-chat',
        messages: [{ role: 'user', content: 'Weather in Paris and Oslo?' }],
        tools,
        parallel_tool_calls: true,
        stream_options: { include_usage: true },
        seed: 42,
        stop: ['\nUser:', '###'],
        max_completion_tokens: 64,
        user: 'end-user-9',
        metadata: { app: 'probe' },
        store: true,
      })
      .finalChatCompletion();
    expect(final.choices[0]!.finish_reason).toBe('tool_calls');
    expect(final.choices[0]!.message.tool_calls!.map((call) => call.type === 'function' && [call.id, call.function.name, call.function.arguments])).toEqual([
      ['call_a', 'weather', '{"city":"Paris"}'],
      ['call_b', 'weather', '{"city":"Oslo"}'],
    ]);
    expect(final.usage).toMatchObject({ prompt_tokens: 30, completion_tokens: 12, total_tokens: 42 });
    const sent = fake.requestsFor('fake-chat')[0]!.body;
    expect(sent).toMatchObject({ parallel_tool_calls: true, seed: 42, stop: ['\nUser:', '###'], max_tokens: 64, user: 'end-user-9', stream: true });
    // Keel's own: not sent to a provider (docs: `metadata`, `store`).
    expect(sent).not.toHaveProperty('metadata');
    expect(sent).not.toHaveProperty('store');
  });

  /** Through the SDK's openai-compatible model: an image keeps the call off the wire. */
  const withImage: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'data:image/png;base64,iVBORw0KGgo=' } }, { type: 'text', text: 'Hi' }] }];
  /** `fake-chat` over the wire (openai-compatible), the same through the SDK's openai-compatible model, and `lp-chat` (an `openai` provider's) through the SDK's openai model. */
  const PATHS = [
    { model: 'fake-chat', messages },
    { model: 'fake-chat', messages: withImage },
    { model: 'lp-chat', messages },
  ];
  const PIECES = ['Hello ', 'there.'];

  beforeAll(async () => {
    expect((await api('POST', '/providers', admin, { name: 'lp-openai', kind: 'openai', base_url: fake.url, api_key: 'sk-lp' })).statusCode).toBe(200);
    await addModel({ id: 'lp-chat', provider: 'lp-openai', capabilities: ['chat'] });
    // An Anthropic model: its provider takes neither.
    expect((await api('POST', '/providers', admin, { name: 'lp-anthropic', kind: 'anthropic', base_url: fake.url, api_key: 'sk-lp-anthropic' })).statusCode).toBe(200);
    await addModel({ id: 'lp-claude', provider: 'lp-anthropic', capabilities: ['chat'] });
    await addModel({ id: 'lp-falls-to-claude', capabilities: ['chat'], fallbacks: ['lp-claude'] });
    // An id the openai SDK model takes for a reasoning model's (it drops logprobs and logit_bias for those).
    await addModel({ id: 'gpt-5-lp', provider: 'lp-openai', capabilities: ['chat'] });
  });

  it('passes logprobs, top_logprobs and logit_bias upstream and answers choices[].logprobs, on every path', async () => {
    for (const path of PATHS) {
      fake.script(path.model, { chunks: PIECES, text: PIECES.join('') });
      const completion = await client.chat.completions.create({ ...path, logprobs: true, top_logprobs: 2, logit_bias: { '50256': -100 } });
      expect(completion.choices[0]!.message.content).toBe('Hello there.');
      expect(completion.choices[0]!.logprobs, JSON.stringify(path)).toEqual({ content: fakeLogprobs(PIECES, 2), refusal: null });
      expect(fake.log.at(-1)!.body, JSON.stringify(path)).toMatchObject({ logprobs: true, top_logprobs: 2, logit_bias: { '50256': -100 } });
    }
    // logprobs alone: the chosen tokens, no alternatives.
    fake.script('fake-chat', { text: 'Hello there.' });
    const plain = await client.chat.completions.create({ model: 'fake-chat', messages, logprobs: true });
    expect(plain.choices[0]!.logprobs!.content).toEqual(fakeLogprobs(PIECES, 0));
    // Not asked for: none asked upstream, none answered.
    fake.script('fake-chat', { text: 'Hello there.' });
    expect((await client.chat.completions.create({ model: 'fake-chat', messages })).choices[0]!.logprobs).toBeNull();
    expect(fake.log.at(-1)!.body).not.toHaveProperty('logprobs');
    expect(fake.log.at(-1)!.body).not.toHaveProperty('logit_bias');
  });

  it('sends logit_bias token ids in their integer form on every path, and refuses two keys naming one token (400 naming the param)', async () => {
    for (const path of PATHS) {
      fake.script(path.model, { text: 'Hello there.' });
      await client.chat.completions.create({ ...path, logit_bias: { '0050256': -100, '0': 1, '7': 5 } });
      expect(fake.log.at(-1)!.body.logit_bias, JSON.stringify(path)).toEqual({ '0': 1, '7': 5, '50256': -100 });
    }
    const sent = fake.log.length;
    for (const path of PATHS) {
      const twice = await apiError(client.chat.completions.create({ ...path, logit_bias: { '1': 5, '0001': -5 } }));
      expect(twice, JSON.stringify(path)).toMatchObject({ status: 400, param: 'logit_bias' });
      expect(twice.message).toContain('Invalid value for logit_bias: Keys "1" and "0001" name one token id, 1');
    }
    expect(fake.log).toHaveLength(sent);
  });

  it('streams each piece\'s logprobs in its chunk, on every path: the stream helper puts them together', async () => {
    for (const path of PATHS) {
      fake.script(path.model, { chunks: PIECES });
      const stream = client.chat.completions.stream({ ...path, logprobs: true, top_logprobs: 1 });
      const chunks: OpenAI.ChatCompletionChunk[] = [];
      // Copies: the helper's snapshot shares (and extends) the first chunk's list.
      stream.on('chunk', (chunk) => chunks.push(structuredClone(chunk)));
      const final = await stream.finalChatCompletion();
      expect(final.choices[0]!.logprobs, JSON.stringify(path)).toEqual({ content: fakeLogprobs(PIECES, 1), refusal: null });
      // In the chunk of the text they are the log probabilities of, as OpenAI streams them.
      const withText = chunks.filter((chunk) => chunk.choices[0]?.delta.content);
      expect(withText.map((chunk) => chunk.choices[0]!.logprobs?.content?.map((entry) => entry.token)), JSON.stringify(path)).toEqual(PIECES.map((piece) => [piece]));
      expect(fake.log.at(-1)!.body, JSON.stringify(path)).toMatchObject({ logprobs: true, top_logprobs: 1 });
    }
  });

  /** `count` tokens of an answer, each its own piece (and log probability entry). */
  const tokens = (count: number) => Array.from({ length: count }, (_, i) => `t${i} `);

  it('reads an answer whose log probabilities (20 alternatives a token) take past MODEL_MAX_RESPONSE_BYTES, streamed or not, on every path: they are what the call asked for', async () => {
    const limit = ctx.app.settings.MODEL_MAX_RESPONSE_BYTES;
    const pieces = tokens(600);
    expect(JSON.stringify(fakeLogprobs(pieces, 20)).length).toBeGreaterThan(1.5 * limit);
    const asked = { logprobs: true, top_logprobs: 20, max_tokens: pieces.length };
    for (const path of PATHS) {
      fake.script(path.model, { chunks: pieces, text: pieces.join('') }, { chunks: pieces });
      const completion = await client.chat.completions.create({ ...path, ...asked });
      expect(completion.choices[0]!.logprobs, JSON.stringify(path)).toEqual({ content: fakeLogprobs(pieces, 20), refusal: null });
      const streamed = await client.chat.completions.stream({ ...path, ...asked }).finalChatCompletion();
      expect(streamed.choices[0]!.logprobs!.content, JSON.stringify(path)).toHaveLength(pieces.length);
      expect(streamed.choices[0]!.message.content).toBe(pieces.join(''));
    }
  });

  it('streams a whole answer with logprobs and few or no alternatives whose max_tokens is its length, on every path: its log probabilities, not its events, are counted', async () => {
    // Each chunk's event (id, model, text, framing) is longer than its one entry: counted whole, the wire cut this answer off halfway.
    const pieces = tokens(400);
    for (const top of [0, 2]) {
      for (const path of PATHS) {
        fake.script(path.model, { chunks: pieces });
        const streamed = await client.chat.completions.stream({ ...path, logprobs: true, top_logprobs: top, max_tokens: pieces.length }).finalChatCompletion();
        expect(streamed.choices[0]!.message.content, JSON.stringify({ path, top })).toBe(pieces.join(''));
        expect(streamed.choices[0]!.logprobs!.content).toHaveLength(pieces.length);
      }
    }
  });

  it('answers without log probabilities the call did not ask for when the upstream sends them anyway, streamed or not, on every path', async () => {
    for (const path of PATHS) {
      fake.script(path.model, { chunks: PIECES, text: PIECES.join(''), logprobsUnasked: true }, { chunks: PIECES, logprobsUnasked: true });
      const completion = await client.chat.completions.create(path);
      expect(completion.choices[0]!.message.content, JSON.stringify(path)).toBe(PIECES.join(''));
      expect(completion.choices[0]!.logprobs, JSON.stringify(path)).toBeNull();
      const chunks: OpenAI.ChatCompletionChunk[] = [];
      for await (const chunk of await client.chat.completions.create({ ...path, stream: true })) chunks.push(chunk);
      expect(chunks.map((chunk) => chunk.choices[0]?.delta.content ?? '').join(''), JSON.stringify(path)).toBe(PIECES.join(''));
      expect(chunks.filter((chunk) => chunk.choices[0]?.logprobs), JSON.stringify(path)).toEqual([]);
      // The fake did send them: what is tested is that they were not handed on.
      expect(fake.log.at(-1)!.body, JSON.stringify(path)).not.toHaveProperty('logprobs');
    }
  });

  it('still cuts off log probabilities past what the call asked for (its max_tokens, 20 alternatives each): 502, streamed or not, on every path', async () => {
    const limit = ctx.app.settings.MODEL_MAX_RESPONSE_BYTES;
    // 5 tokens: 5 × 21 entries of at most 160 bytes each beyond the limit.
    const asked = { logprobs: true, top_logprobs: 20, max_tokens: 5 };
    const message = `The model's answer exceeded ${limit + 5 * 21 * 160} bytes`;
    for (const path of PATHS) {
      fake.reset();
      // A non-streamed answer padded past both; a stream of far more tokens than asked for, all within the limit.
      fake.script(path.model, { text: 'Hi', padBytes: 4 * limit }, { chunks: tokens(300) });
      const plain = await apiError(client.chat.completions.create({ ...path, ...asked }));
      expect(plain.status, JSON.stringify(path)).toBe(502);
      expect(plain.error).toEqual({ message, type: 'server_error', param: null, code: 'upstream_error' });
      const stream = await client.chat.completions.create({ ...path, ...asked, stream: true });
      const cut = await apiError(
        (async () => {
          for await (const part of stream) void part;
        })(),
      );
      expect(cut.error, JSON.stringify(path)).toMatchObject({ type: 'server_error', code: 'upstream_error', message: `The log probabilities of the model's answer exceeded ${5 * 21 * 160} characters` });
      await fake.waitFor((log) => log.length === 2 && log.every((r) => r.aborted || r.completed));
      expect(fake.log.map((r) => r.reply)).toEqual([200, 200]);
    }
  });

  it('bounds what log probabilities add to a non-streamed answer by the model\'s own max_output_tokens and by 8 × MODEL_MAX_RESPONSE_BYTES, whatever max_tokens the client chose, on every path', async () => {
    const limit = ctx.app.settings.MODEL_MAX_RESPONSE_BYTES;
    await addModel({ id: 'lp-fake-capped', capabilities: ['chat'], max_output_tokens: 5 });
    await addModel({ id: 'lp-chat-capped', provider: 'lp-openai', capabilities: ['chat'], max_output_tokens: 5 });
    const capped: Record<string, string> = { 'fake-chat': 'lp-fake-capped', 'lp-chat': 'lp-chat-capped' };
    const asked = { logprobs: true, top_logprobs: 20 };
    for (const path of PATHS) {
      fake.reset();
      // The model's limit: 5 tokens, 21 entries each, however many the client asks for.
      fake.script(capped[path.model]!, { text: 'Hi', padBytes: 4 * limit });
      const own = await apiError(client.chat.completions.create({ ...path, model: capped[path.model]!, ...asked, max_tokens: 1_000 }));
      expect(own.error, JSON.stringify(path)).toMatchObject({ code: 'upstream_error', message: `The model's answer exceeded ${limit + 5 * 21 * 160} bytes` });
      // No limit of its own: at most 8 times the answer's limit more (10,000,000 tokens would be ~33 GB).
      fake.script(path.model, { text: 'Hi', padBytes: 10 * limit });
      const huge = await apiError(client.chat.completions.create({ ...path, ...asked, max_tokens: 10_000_000 }));
      expect(huge.error, JSON.stringify(path)).toMatchObject({ code: 'upstream_error', message: `The model's answer exceeded ${9 * limit} bytes` });
    }
  });

  it('refuses logprobs and logit_bias for a model whose provider takes neither, 400 naming the param, before calling upstream; a fallback that cannot is skipped', async () => {
    const logprobs = await apiError(client.chat.completions.create({ model: 'lp-claude', messages, logprobs: true }));
    expect(logprobs).toMatchObject({ status: 400, type: 'invalid_request_error', param: 'logprobs', code: 'unsupported_parameter' });
    expect(logprobs.message).toContain('lp-claude');
    const streamed = await apiError(client.chat.completions.create({ model: 'lp-claude', messages, logprobs: true, stream: true }));
    expect(streamed).toMatchObject({ status: 400, param: 'logprobs' });
    const bias = await apiError(client.chat.completions.create({ model: 'lp-claude', messages, logit_bias: { '1': 5 } }));
    expect(bias).toMatchObject({ status: 400, param: 'logit_bias', code: 'unsupported_parameter' });
    for (const extra of [{ logprobs: true }, { logit_bias: { '1': 5 } }]) {
      const reasoning = await apiError(client.chat.completions.create({ model: 'gpt-5-lp', messages, ...extra }));
      expect(reasoning).toMatchObject({ status: 400, param: Object.keys(extra)[0], code: 'unsupported_parameter' });
      expect(reasoning.message).toContain('reasoning models');
    }
    const top = await apiError(client.chat.completions.create({ model: 'fake-chat', messages, top_logprobs: 3 }));
    expect(top).toMatchObject({ status: 400, param: 'top_logprobs' });
    expect(fake.log).toEqual([]);
    // The fallback would answer without them: the call fails with the first model's failure instead.
    fake.script('lp-falls-to-claude', { status: 500 }, { status: 500 });
    expect((await apiError(client.chat.completions.create({ model: 'lp-falls-to-claude', messages, logprobs: true }))).status).toBe(502);
    expect(fake.log.map((r) => r.model)).toEqual(['lp-falls-to-claude', 'lp-falls-to-claude']);
  });

  it('passes verbosity and prediction to OpenAI-style providers, on every path; not store or metadata (the provider account is the operator\'s)', async () => {
    const prediction = { type: 'content' as const, content: 'Hello there.' };
    for (const path of PATHS) {
      fake.script(path.model, { text: 'Hello there.' });
      await client.chat.completions.create({ ...path, verbosity: 'low', store: true, metadata: { team: 'a' }, prediction });
      const sent = fake.log.at(-1)!.body;
      expect(sent, JSON.stringify(path)).toMatchObject({ verbosity: 'low', prediction });
      expect(sent, JSON.stringify(path)).not.toHaveProperty('store');
      expect(sent, JSON.stringify(path)).not.toHaveProperty('metadata');
    }
  });

  it('passes prompt_cache_key, prompt_cache_retention and safety_identifier (what the openai package has in place of the deprecated user) to OpenAI models; not to OpenAI-compatible servers (many refuse them) nor to an Anthropic model', async () => {
    const fields = { prompt_cache_key: 'tenant-7/support-bot', prompt_cache_retention: '24h' as const, safety_identifier: 'user-3f9a' };
    const sentTo = async (create: () => Promise<unknown>) => {
      await create();
      return fake.log.at(-1)!.body;
    };
    for (const path of PATHS) {
      const expectSent = (body: unknown) => {
        if (path.model === 'lp-chat') expect(body, JSON.stringify(path)).toMatchObject(fields);
        else for (const field of Object.keys(fields)) expect(body, `${JSON.stringify(path)}: ${field}`).not.toHaveProperty(field);
      };
      fake.script(path.model, { text: 'Hello there.' });
      expectSent(await sentTo(() => client.chat.completions.create({ ...path, ...fields })));
      // The usual body (text messages, sampling settings) with them, streamed: the route's own check of it takes them too.
      fake.script(path.model, { text: 'Hello there.' });
      expectSent(
        await sentTo(async () => {
          for await (const chunk of await client.chat.completions.create({ ...path, ...fields, stream: true, temperature: 0.5 })) void chunk;
        }),
      );
    }
    // Hints: an Anthropic model answers without them (its API has no place for either).
    fake.script('lp-claude', { text: 'Hello there.' });
    expect((await client.chat.completions.create({ model: 'lp-claude', messages, ...fields })).choices[0]!.message.content).toBe('Hello there.');
    const sent = fake.log.at(-1)!.body;
    for (const field of Object.keys(fields)) expect(sent).not.toHaveProperty(field);
    // Held to OpenAI's limits: each at most 64 characters.
    expect(await apiError(client.chat.completions.create({ model: 'fake-chat', messages, safety_identifier: 'x'.repeat(65) }))).toMatchObject({ status: 400, param: 'safety_identifier' });
    expect(await apiError(client.chat.completions.create({ model: 'fake-chat', messages, prompt_cache_key: 'x'.repeat(65) }))).toMatchObject({ status: 400, param: 'prompt_cache_key' });
    expect(await apiError(client.chat.completions.create({ model: 'fake-chat', messages, prompt_cache_key: 7 as never }))).toMatchObject({ status: 400, param: 'prompt_cache_key' });
    expect(await apiError(client.chat.completions.create({ model: 'fake-chat', messages, prompt_cache_retention: '1h' as never }))).toMatchObject({ status: 400, param: 'prompt_cache_retention' });
  });

  it('holds a logit_bias to 1,024 token ids of at most 10 digits, and takes an empty one as none (an Anthropic model answers)', async () => {
    const many = Object.fromEntries(Array.from({ length: 1025 }, (_, i) => [String(i), 1]));
    expect(await apiError(client.chat.completions.create({ model: 'fake-chat', messages, logit_bias: many }))).toMatchObject({ status: 400, param: 'logit_bias' });
    expect(await apiError(client.chat.completions.create({ model: 'fake-chat', messages, logit_bias: { '12345678901': 1 } }))).toMatchObject({ status: 400 });
    expect(fake.log).toEqual([]);
    const answered = await client.chat.completions.create({ model: 'lp-claude', messages, logit_bias: {} });
    expect(answered.choices[0]!.message.content).toBe(fake.defaultReply.text);
    expect(fake.log.map((r) => r.path)).toEqual(['/v1/messages']); // sent to its provider
  });

  it('refuses with 400 naming the param what it does not serve, rather than answer without it', async () => {
    const refused: [Record<string, unknown>, string][] = [
      [{ modalities: ['text', 'audio'], audio: { voice: 'alloy', format: 'mp3' } }, 'modalities[1]'],
      [{ audio: { voice: 'alloy', format: 'mp3' } }, 'audio'],
      [{ web_search_options: {} }, 'web_search_options'],
      [{ functions: [{ name: 'weather', parameters: {} }] }, 'functions'],
      [{ function_call: 'auto' }, 'function_call'],
      [{ service_tier: 'priority' }, 'service_tier'],
    ];
    for (const [extra, param] of refused) {
      const error = await apiError(client.chat.completions.create({ model: 'fake-chat', messages, ...extra } as never));
      expect(error, param).toMatchObject({ status: 400, type: 'invalid_request_error', param });
    }
    expect(fake.log).toEqual([]);
    // Hints generic clients send to any model are no reason to refuse an Anthropic model: it answers, taking those it has a place for (openai-thinking.test.ts).
    const hints = [{ reasoning_effort: 'low' }, { verbosity: 'low' }, { parallel_tool_calls: false, tools: [{ type: 'function', function: { name: 'weather' } }] }, { seed: 7 }, { frequency_penalty: 0.5 }];
    for (const extra of hints) {
      const answered = await client.chat.completions.create({ model: 'lp-claude', messages, ...extra } as never);
      expect(answered.choices[0]!.message.content, JSON.stringify(extra)).toBe(fake.defaultReply.text);
      expect(fake.log, JSON.stringify(extra)).toHaveLength(1);
      fake.reset();
    }
    // The defaults go on: text only, the auto tier, null for what is not asked for.
    fake.script('fake-chat', { text: 'ok' });
    await client.chat.completions.create({ model: 'fake-chat', messages, modalities: ['text'], service_tier: 'auto', audio: null, web_search_options: null } as never);
    expect(fake.log).toHaveLength(1);
  });

  it('sends an earlier tool call\'s arguments upstream as JSON objects (none as {}), and takes a model\'s own broken ones (cut off) on every path, so the conversation goes on', async () => {
    const historyOf = (args: string[]): OpenAI.ChatCompletionMessageParam[] => {
      const calls = args.map((text, i) => ({ id: `call_${i}`, type: 'function' as const, function: { name: 'weather', arguments: text } }));
      return [{ role: 'assistant', content: null, tool_calls: calls }, ...calls.map((call) => ({ role: 'tool' as const, tool_call_id: call.id, content: 'sunny' })), { role: 'user', content: 'And now?' }];
    };
    for (const path of PATHS) {
      fake.script(path.model, { text: 'Sunny.' });
      const completion = await client.chat.completions.create({ model: path.model, messages: [...path.messages, ...historyOf(['{"city": "Paris"}', '', ' '])] });
      expect(completion.choices[0]!.message.content).toBe('Sunny.');
      const sent = (fake.log.at(-1)!.body.messages as { tool_calls?: { function: { arguments: string } }[] }[]).find((m) => m.tool_calls)!;
      expect(sent.tool_calls!.map((c) => c.function.arguments), JSON.stringify(path)).toEqual(['{"city":"Paris"}', '{}', '{}']);
    }
    // OpenAI takes any string here: a call cut off by max_tokens, replayed with the tool's error, is answered.
    for (const path of PATHS) {
      fake.script(path.model, { text: 'Which city?' });
      const completion = await client.chat.completions.create({ model: path.model, messages: [...path.messages, ...historyOf(['{"city": "Par'])] });
      expect(completion.choices[0]!.message.content, JSON.stringify(path)).toBe('Which city?');
    }
  });
});

describe('done when', () => {
  it('a superuser adds an openai-compatible provider and a model at run time; the openai package calls it', async () => {
    const before = await apiError(client.chat.completions.create({ model: 'runtime-llama', messages: [{ role: 'user', content: 'Hi' }] }));
    expect(before.status).toBe(404);

    const provider = await api('POST', '/providers', admin, { name: 'runtime', kind: 'openai-compatible', base_url: fake.url });
    expect(provider.statusCode, provider.body).toBe(200);
    const model = await api('POST', '/models', admin, { id: 'runtime-llama', provider: 'runtime', capabilities: ['chat'], pricing: PRICING });
    expect(model.statusCode, model.body).toBe(200);

    fake.script('runtime-llama', { text: 'Hello from run time.' });
    const completion = await client.chat.completions.create({ model: 'runtime-llama', messages: [{ role: 'user', content: 'Hi' }] });
    expect(completion.choices[0]!.message.content).toBe('Hello from run time.');
    expect(completion.model).toBe('runtime-llama');
    expect(fake.requestsFor('runtime-llama')).toHaveLength(1);
    expect((await client.models.retrieve('runtime-llama')).owned_by).toBe('runtime');
  });
});
