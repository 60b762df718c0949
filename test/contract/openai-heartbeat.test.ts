/**
 * A streamed /v1/chat/completions keeps its connection busy while the model is silent
 * (GATEWAY_STREAM_HEARTBEAT_MS): SSE comments (`: keep-alive`), which the official `openai`
 * package's parser skips, so that a proxy's or a load balancer's idle timeout does not cut a model
 * that thinks long before its first event. A failure before the first event within the interval
 * still answers its own HTTP status; once a comment has gone out the answer is a 200, and a failure
 * is the stream's error event. Each stream's one heartbeat timer is cleared however it ends. The
 * same for `agent:<id>` models, whose run may think (or run a tool) long before its first text.
 */
import { createHook } from 'node:async_hooks';
import type { AddressInfo } from 'node:net';

import OpenAI from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey, eventually } from '../helpers/http.js';
import { apiError } from '../helpers/openai.js';
import { createAgent, waitForRun } from '../helpers/runs.js';

/**
 * Short, and of a length no other timer of the process has: the heartbeat's timers are told apart
 * by it. Long enough that an agent's run (queued, run, its failure written and read back through
 * the run bus) fails within it on PostgreSQL and Redis too.
 */
const HEARTBEAT_MS = 1_009;
/** Past two intervals: a comment goes out within two intervals of silence. */
const LATE_MS = 2 * HEARTBEAT_MS + 250;

const ctx = useTestApp({ GATEWAY_STREAM_HEARTBEAT_MS: String(HEARTBEAT_MS), MODEL_MAX_RETRIES: '0' });
const api = apiOf(ctx);

let fake: FakeModelServer;
let baseURL: string;
let client: OpenAI;
let user: TestUser;
/** An agent whose model is fake-chat, as `agent:<id>`. */
let agentModel: string;

/** The heartbeat timers alive in this process (the app runs in it): Timeouts of HEARTBEAT_MS, from their creation to their clearing. */
const heartbeats = new Set<number>();
const hook = createHook({
  init(asyncId, type, _trigger, resource) {
    if (type === 'Timeout' && (resource as { _idleTimeout?: number })._idleTimeout === HEARTBEAT_MS) heartbeats.add(asyncId);
  },
  destroy(asyncId) {
    heartbeats.delete(asyncId);
  },
});

beforeAll(async () => {
  hook.enable();
  fake = await FakeModelServer.start();
  await ctx.app.listen({ host: '127.0.0.1', port: 0 });
  baseURL = `http://127.0.0.1:${(ctx.app.server.address() as AddressInfo).port}/v1`;
  const admin = await superuserHeaders(ctx.app);
  expect((await api('POST', '/providers', admin, { name: 'fake', kind: 'openai-compatible', base_url: fake.url, api_key: 'sk-upstream' })).statusCode).toBe(200);
  expect((await api('POST', '/models', admin, { id: 'fake-chat', provider: 'fake', capabilities: ['chat'], pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '2' } })).statusCode).toBe(200);
  for (const model of [{ id: 'fake-backup' }, { id: 'fake-primary', fallbacks: ['fake-backup'] }]) {
    expect((await api('POST', '/models', admin, { ...model, provider: 'fake', capabilities: ['chat'], pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '2' } })).statusCode).toBe(200);
  }
  user = await createUser(ctx.app);
  client = new OpenAI({ apiKey: (await createKey(ctx.app, user)).key, baseURL, maxRetries: 0 });
  agentModel = `agent:${(await createAgent(ctx.app, user.headers, { model: 'fake-chat' })).id}`;
});
afterAll(async () => {
  hook.disable();
  await fake.close();
});
beforeEach(() => fake.reset());

/** Every heartbeat timer is cleared soon after its stream ended (a leaked one would beat on forever). */
async function noHeartbeatLeft(): Promise<void> {
  await eventually(async () => heartbeats.size === 0, 2_000).catch(() => {
    throw new Error(`${heartbeats.size} heartbeat timer(s) still alive`);
  });
}

/** A streamed completion as raw HTTP: its status and its body's text. */
async function rawStream(body: Record<string, unknown> = {}): Promise<{ status: number; text: string }> {
  const response = await fetch(`${baseURL}/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true, ...body }),
  });
  return { status: response.status, text: await response.text() };
}

/** Reads a streamed body until it has shown `awaited` (a keep-alive, or the first event). */
async function readUntil(reader: ReadableStreamDefaultReader<Uint8Array>, awaited: string): Promise<void> {
  let seen = '';
  while (!seen.includes(awaited)) {
    const { done, value } = await reader.read();
    if (done) throw new Error(`the stream ended before ${awaited}: ${seen}`);
    seen += new TextDecoder().decode(value);
  }
}

/**
 * A late failure's answer: a 200 whose body, after a keep-alive, is the error event alone (no role
 * chunk opens an answer that never came); and through the openai package (the model scripted to
 * fail late again by `scriptFailure`), an error raised on its first read, as for an HTTP error.
 */
async function expectLateFailure(model: string, code: string, scriptFailure: () => void): Promise<void> {
  scriptFailure();
  const { status, text } = await rawStream({ model });
  expect(status).toBe(200);
  expect(text.startsWith(': keep-alive\n\n')).toBe(true);
  const events = text.split('\n\n').filter((event) => event.startsWith('data: '));
  expect(events).toHaveLength(1);
  expect((JSON.parse(events[0]!.slice(6)) as { error: Record<string, unknown> }).error).toMatchObject({ type: 'server_error', code });
  expect(text).not.toContain('[DONE]');

  scriptFailure();
  const stream = await client.chat.completions.create({ model, messages: [{ role: 'user', content: 'Hi' }], stream: true });
  const read: OpenAI.ChatCompletionChunk[] = [];
  const failed = await apiError((async () => {
    for await (const chunk of stream) read.push(chunk);
  })());
  expect(failed.error).toMatchObject({ type: 'server_error', code });
  expect(read).toEqual([]);
  await noHeartbeatLeft();
}

describe('a streamed chat completion whose model is silent', () => {
  it('sends keep-alive comments before a late first event and between late events; the openai package reads the answer as sent', async () => {
    fake.script('fake-chat', { text: 'Hello there friend', chunkDelayMs: LATE_MS, usage: { prompt_tokens: 3, completion_tokens: 3 } });
    const { status, text } = await rawStream();
    expect(status).toBe(200);
    const firstData = text.indexOf('data: ');
    expect(text.slice(0, firstData)).toMatch(/^(: keep-alive\n\n)+$/);
    // Between the late chunks too.
    expect(text.slice(firstData).split('\n\n').filter((event) => event === ': keep-alive').length).toBeGreaterThan(0);
    expect(text.endsWith('data: [DONE]\n\n')).toBe(true);

    fake.script('fake-chat', { text: 'Hello there friend', chunkDelayMs: LATE_MS, usage: { prompt_tokens: 3, completion_tokens: 3 } });
    const stream = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true, stream_options: { include_usage: true } });
    let said = '';
    const chunks: OpenAI.ChatCompletionChunk[] = [];
    for await (const chunk of stream) {
      chunks.push(chunk);
      said += chunk.choices[0]?.delta.content ?? '';
    }
    expect(said).toBe('Hello there friend');
    expect(chunks.every((chunk) => chunk.model === 'fake-chat' && chunk.object === 'chat.completion.chunk')).toBe(true);
    expect(chunks.at(-1)!.usage).toMatchObject({ prompt_tokens: 3, completion_tokens: 3 });
    await noHeartbeatLeft();
  });

  it('sends none when the events come in time', async () => {
    fake.script('fake-chat', { text: 'Quick answer here' });
    const { status, text } = await rawStream();
    expect(status).toBe(200);
    expect(text.startsWith('data: ')).toBe(true);
    expect(text).not.toContain(': keep-alive');
    await noHeartbeatLeft();
  });

  it('answers a failure within the interval with its own status, as before any event', async () => {
    fake.script('fake-chat', { status: 429, headers: { 'retry-after': '1' } });
    const limited = await apiError(client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true }));
    expect(limited).toMatchObject({ status: 429, type: 'requests' });
    fake.script('fake-chat', { status: 500 });
    const { status, text } = await rawStream();
    expect(status).toBe(502);
    expect(text).not.toContain('keep-alive');
    expect(JSON.parse(text)).toMatchObject({ error: { type: 'server_error' } });
    await noHeartbeatLeft();
  });

  it('ends with an error event in OpenAI\'s shape when it fails after a keep-alive went out (the 200 has been sent)', async () => {
    await expectLateFailure('fake-chat', 'upstream_error', () => fake.script('fake-chat', { status: 500, chunkDelayMs: LATE_MS }));
  });

  it('names the model that answered in every chunk when the first event came late from a fallback', async () => {
    fake.script('fake-primary', { status: 500, chunkDelayMs: LATE_MS });
    fake.script('fake-backup', { text: 'From the backup' });
    const { status, text } = await rawStream({ model: 'fake-primary' });
    expect(status).toBe(200);
    expect(text.startsWith(': keep-alive\n\n')).toBe(true);
    const chunks = text.split('\n\n').filter((event) => event.startsWith('data: {')).map((event) => JSON.parse(event.slice(6)) as { model: string; choices: { delta: { content?: string } }[] });
    expect(new Set(chunks.map((chunk) => chunk.model))).toEqual(new Set(['fake-backup']));
    expect(chunks.map((chunk) => chunk.choices[0]?.delta.content ?? '').join('')).toBe('From the backup');
    await noHeartbeatLeft();
  });

  it('clears its timer when the client goes away, before the first event or after it, and closes the upstream request', async () => {
    for (const reply of [{ text: 'never said', chunkDelayMs: 5_000 }, { text: 'one two three four', chunkDelayMs: LATE_MS }]) {
      fake.reset();
      fake.script('fake-chat', reply);
      const controller = new AbortController();
      const response = await fetch(`${baseURL}/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true }),
        signal: controller.signal,
      });
      expect(response.status).toBe(200);
      const reader = (response.body as ReadableStream<Uint8Array>).getReader();
      await readUntil(reader, reply.chunkDelayMs > LATE_MS ? ': keep-alive' : 'data: ');
      controller.abort();
      await eventually(async () => fake.log[0]?.aborted === true);
      await noHeartbeatLeft();
    }
  });
});

/** The data events of a raw stream's text, parsed (`[DONE]` as the string). */
const dataEvents = (text: string) =>
  text
    .split('\n\n')
    .filter((event) => event.startsWith('data: '))
    .map((event) => (event === 'data: [DONE]' ? '[DONE]' : (JSON.parse(event.slice(6)) as Record<string, unknown>)));

describe('a streamed agent completion whose run is silent', () => {
  it('sends keep-alive comments before a late first text and between late texts; the openai package reads the answer as sent', async () => {
    fake.script('fake-chat', { chunks: ['Hello ', 'friend'], chunkDelayMs: LATE_MS, usage: { prompt_tokens: 3, completion_tokens: 3 } });
    const response = await fetch(`${baseURL}/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: agentModel, messages: [{ role: 'user', content: 'Hi' }], stream: true }),
    });
    const text = await response.text();
    expect(response.status).toBe(200);
    const firstData = text.indexOf('data: ');
    expect(text.slice(0, firstData)).toMatch(/^(: keep-alive\n\n)+$/);
    expect(text.slice(firstData).split('\n\n').filter((event) => event === ': keep-alive').length).toBeGreaterThan(0);
    expect(text.endsWith('data: [DONE]\n\n')).toBe(true);
    expect(
      dataEvents(text)
        .slice(0, -1)
        .map((chunk) => (chunk as { choices: { delta: { content?: string } }[] }).choices[0]!.delta.content ?? '')
        .join(''),
    ).toBe('Hello friend');

    fake.script('fake-chat', { chunks: ['Hello ', 'friend'], chunkDelayMs: LATE_MS, usage: { prompt_tokens: 3, completion_tokens: 3 } });
    const stream = await client.chat.completions.create({ model: agentModel, messages: [{ role: 'user', content: 'Hi' }], stream: true, stream_options: { include_usage: true } });
    let said = '';
    const chunks: OpenAI.ChatCompletionChunk[] = [];
    for await (const chunk of stream) {
      chunks.push(chunk);
      said += chunk.choices[0]?.delta.content ?? '';
    }
    expect(said).toBe('Hello friend');
    expect(chunks.every((chunk) => chunk.model === agentModel && chunk.object === 'chat.completion.chunk')).toBe(true);
    expect(chunks.at(-1)!.usage).toMatchObject({ prompt_tokens: 3, completion_tokens: 3 });
    await noHeartbeatLeft();
  });

  it('sends none when the text comes in time, and answers a run that fails within the interval with its own status', async () => {
    fake.script('fake-chat', { text: 'Quick answer here' });
    const quick = await rawStream({ model: agentModel });
    expect(quick.status).toBe(200);
    expect(quick.text.startsWith('data: ')).toBe(true);
    expect(quick.text).not.toContain(': keep-alive');

    fake.script('fake-chat', { status: 401 });
    const failed = await rawStream({ model: agentModel });
    expect(failed.status).toBe(500);
    expect(failed.text).not.toContain('keep-alive');
    expect(JSON.parse(failed.text)).toMatchObject({ error: { type: 'server_error', code: 'agent_run_failed' } });
    await noHeartbeatLeft();
  });

  it('ends with an error event in OpenAI\'s shape when its run fails after a keep-alive went out (the 200 has been sent)', async () => {
    await expectLateFailure(agentModel, 'agent_run_failed', () => fake.script('fake-chat', { status: 401, chunkDelayMs: LATE_MS }));
  });

  it('clears its timer when the client goes away, before the first text or after it, and cancels the run', async () => {
    for (const reply of [{ text: 'never said', chunkDelayMs: 5_000 }, { chunks: ['one ', 'two ', 'three ', 'four'], chunkDelayMs: LATE_MS }]) {
      fake.reset();
      fake.script('fake-chat', reply);
      const controller = new AbortController();
      const response = await fetch(`${baseURL}/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: agentModel, messages: [{ role: 'user', content: 'Hi' }], stream: true }),
        signal: controller.signal,
      });
      expect(response.status).toBe(200);
      const runId = response.headers.get('x-keel-run-id')!;
      const reader = (response.body as ReadableStream<Uint8Array>).getReader();
      await readUntil(reader, reply.chunkDelayMs > LATE_MS ? ': keep-alive' : 'data: ');
      controller.abort();
      await waitForRun(ctx.app, user.headers, runId, ['cancelled']);
      await eventually(async () => fake.log[0]?.aborted === true);
      await noHeartbeatLeft();
    }
  });
});
