import { jsonSchema, tool } from 'ai';
import { describe, expect, it } from 'vitest';
import { z } from 'zod';

import { HOP_HEADER } from '../../src/core/hop.js';

import { loadBuiltinModels } from '../../src/modules/ai-models/builtin-models.js';
import { ModelCatalog } from '../../src/modules/ai-models/catalog.js';
import { ModelAnswerError, ModelAnswerLimitError, ModelArgumentError, ModelCallAbortedError, ModelOptionError, ModelTimeoutError, ModelToolChoiceError, ModelValueError, UpstreamError } from '../../src/modules/ai-models/errors.js';
import {
  type ChatRequest,
  type CostEstimate,
  type ModelManager,
  type ModelManagerOptions,
  type UsageRecord,
} from '../../src/modules/ai-models/model-manager.js';
import { ProviderUnavailableError } from '../../src/modules/ai-models/providers.js';
import { estimateTextTokens } from '../../src/modules/ai-models/token-estimate.js';
import type { ModelOverride } from '../../src/modules/ai-models/types.js';
import { fakeEmbedding, type LoggedRequest, type ScriptedReply } from '../helpers/fake-model-server.js';
import { fakeModelManager, useFakeManagerServer } from '../helpers/model-manager.js';

const price = (input: string, output: string, cached?: string) => ({
  input_cost_per_million_tokens: input,
  output_cost_per_million_tokens: output,
  ...(cached ? { cached_input_cost_per_million_tokens: cached } : {}),
});

const CUSTOM_MODELS: ModelOverride[] = [
  { id: 'fake-chat', provider: 'fake', capabilities: ['chat', 'tools'], pricing: price('2', '8', '0.5'), fallbacks: ['fake-backup'] },
  { id: 'fake-backup', provider: 'fake', capabilities: ['chat', 'tools'], pricing: price('1', '4') },
  { id: 'fake-embed', provider: 'fake', capabilities: ['embedding'], pricing: price('0.02', '0') },
];

const builtins = loadBuiltinModels();
const fake = useFakeManagerServer();

function manager(overrides: Partial<ModelManagerOptions> = {}, settings: { OPENAI_API_KEY?: string } = {}): ModelManager {
  return fakeModelManager(fake.server, { builtins, models: CUSTOM_MODELS, records: fake.records, openaiKey: settings.OPENAI_API_KEY, overrides });
}

async function settled(count: number): Promise<UsageRecord[]> {
  const deadline = Date.now() + 5_000;
  while (fake.records.length < count && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  return fake.records;
}

const hello = [{ role: 'user' as const, content: 'Hello' }];
const tools = { lookup: tool({ description: 'Look up', inputSchema: jsonSchema({ type: 'object', properties: {} }) }) };
/** The SDK's generateText/streamText: a tool whose input the SDK validates (a Zod schema) keeps a call off the wire and the provider model. */
const SDK_TOOLS: Partial<ChatRequest> = { tools: { lookup: tool({ description: 'Look up', inputSchema: z.looseObject({}) }) } };
/** Each way a chat call can go: the wire, the provider model directly (provider options keep a call off the wire), both with tools, the SDK with tools. */
const PATHS: Partial<ChatRequest>[] = [{}, { providerOptions: {} }, { tools }, { tools, providerOptions: {} }, SDK_TOOLS];
/** The wire, the provider model directly (provider options), the SDK (tools): named for the messages. */
const NAMED: [string, Partial<ChatRequest>][] = [
  ['wire', PATHS[0]!],
  ['provider model', PATHS[1]!],
  ['wire with tools', PATHS[2]!],
  ['provider model with tools', PATHS[3]!],
  ['SDK with tools', PATHS[4]!],
];
/** An embeddings call's vectors as plain arrays (the manager hands on Float32Arrays). */
const vectorsOf = (result: { embeddings: Float32Array[] }): number[][] => result.embeddings.map((vector) => Array.from(vector));

const failureOf = (call: Promise<unknown>) =>
  call.then(
    () => undefined,
    (e: unknown) => e,
  );
/** What a stream's reading fails with (undefined when it ends well). */
async function streamFailure(stream: AsyncIterable<unknown>): Promise<unknown> {
  try {
    for await (const _ of stream);
  } catch (error) {
    return error;
  }
  return undefined;
}


describe('ModelManager.chat', () => {
  it('answers, reports usage with cached and reasoning tokens, and prices it exactly', async () => {
    fake.server.script('fake-chat', { text: 'Hi there', usage: { prompt_tokens: 1200, completion_tokens: 300, cached_tokens: 1000, reasoning_tokens: 100 } });
    const result = await manager().chat({ model: 'fake-chat', messages: hello, context: { user_id: 'u1', run_id: 'r1' } });
    expect(result).toMatchObject({ text: 'Hi there', model: 'fake-chat', provider: 'fake', finishReason: 'stop' });
    expect(result.usage).toEqual({ input: 1200, cached_input: 1000, cache_write: 0, output: 300, reasoning: 100 });
    // 200 uncached × 2 + 1000 cached × 0.5 + 300 output × 8 = 400 + 500 + 2400 = 3300 / 10^6.
    expect(result.cost).toBe('0.0033');
    const record = (await settled(1))[0]!;
    expect(record).toMatchObject({
      operation: 'chat',
      model: 'fake-chat',
      provider: 'fake',
      status: 'success',
      error: null,
      cost: '0.0033',
      attempts: 1,
      estimated: false,
      context: { user_id: 'u1', run_id: 'r1' },
    });
    expect(record.latency_ms).toBeGreaterThanOrEqual(0);
    const request = fake.server.log[0]!;
    expect(request.headers.authorization).toBe('Bearer fake-key');
    expect(request.headers['x-team']).toBe('keel');
  });

  it('reserves the worst-case cost before the call and settles once after it', async () => {
    const events: string[] = [];
    let estimate: CostEstimate | undefined;
    const m = manager({
      meter: {
        reserve(e) {
          estimate = e;
          events.push(`reserve:${fake.server.log.length}`);
          return { settle: (r) => void events.push(`settle:${r.status}`) };
        },
      },
    });
    fake.server.script('fake-chat', { text: 'ok', usage: { prompt_tokens: 3, completion_tokens: 1 } });
    await m.chat({ model: 'fake-chat', messages: hello, maxOutputTokens: 1000 });
    await new Promise((r) => setTimeout(r, 20));
    expect(events).toEqual(['reserve:0', 'settle:success']);
    expect(estimate).toMatchObject({ model: 'fake-chat', max_output_tokens: 1000 });
    // input estimate × 2 + 1000 × 8, per million.
    expect(Number(estimate?.cost)).toBeGreaterThanOrEqual(0.008);
  });

  it('a reserve that refuses stops the call before any upstream request', async () => {
    const refusal = new Error('Insufficient credits');
    const m = manager({ meter: { reserve: () => Promise.reject(refusal) } });
    await expect(m.chat({ model: 'fake-chat', messages: hello })).rejects.toBe(refusal);
    expect(fake.server.log).toHaveLength(0);
  });

  it('retries an upstream 429 after its retry-after, then succeeds', async () => {
    fake.server.script('fake-chat', { status: 429, headers: { 'retry-after': '0.3' } }, { text: 'second time lucky', usage: { prompt_tokens: 1, completion_tokens: 1 } });
    const started = Date.now();
    const result = await manager().chat({ model: 'fake-chat', messages: hello });
    expect(result.text).toBe('second time lucky');
    expect(Date.now() - started).toBeGreaterThanOrEqual(290);
    expect(fake.server.requestsFor('fake-chat').map((r) => r.reply)).toEqual([429, 200]);
    expect((await settled(1))[0]).toMatchObject({ status: 'success', attempts: 2 });
  });

  it('caps a long retry-after at MODEL_RETRY_MAX_WAIT_MS and tries again (runs, ingestion)', async () => {
    fake.server.script('fake-chat', { status: 503, headers: { 'retry-after': '3600' } }, { text: 'ok' });
    const started = Date.now();
    expect((await manager({ retryMaxWaitMs: 100 }).chat({ model: 'fake-chat', messages: hello })).text).toBe('ok');
    expect(Date.now() - started).toBeLessThan(2_000);
    expect(fake.server.log.map((r) => r.reply)).toEqual([503, 200]);
  });

  it('a caller that backs off by itself is told a retry-after past MODEL_RETRY_MAX_WAIT_MS at once, after the fallbacks (chat and stream)', async () => {
    const models = () => manager({ retryMaxWaitMs: 1_000 });
    for (const [status, header] of [[503, '3600'], [429, '30']] as const) {
      fake.server.reset();
      fake.records = [];
      fake.server.script('fake-chat', { status, headers: { 'retry-after': header } }, { text: 'too soon' });
      fake.server.script('fake-backup', { text: 'from the backup' });
      const started = Date.now();
      expect(await models().chat({ model: 'fake-chat', messages: hello, interactive: true })).toMatchObject({ text: 'from the backup', model: 'fake-backup' });
      expect(Date.now() - started).toBeLessThan(900);
      expect(fake.server.log.map((r) => [r.model, r.reply])).toEqual([['fake-chat', status], ['fake-backup', 200]]);
      expect((await settled(2)).map((r) => [r.model, r.status, r.attempts])).toEqual(expect.arrayContaining([['fake-chat', 'error', 1], ['fake-backup', 'success', 1]]));
    }
    // No fallback left: the provider's own wait reaches the caller.
    for (const operation of ['chat', 'stream'] as const) {
      fake.server.reset();
      fake.server.script('fake-backup', { status: 429, headers: { 'retry-after': '30' } }, { text: 'too soon' });
      const started = Date.now();
      const request = { model: 'fake-backup', messages: hello, interactive: true };
      const failed = operation === 'chat' ? models().chat(request) : models().stream(request).result;
      await expect(failed).rejects.toMatchObject({ upstreamStatus: 429, retryAfterMs: 30_000, waitPassedOn: true });
      expect(Date.now() - started).toBeLessThan(900);
      expect(fake.server.log).toHaveLength(1);
    }
    // A wait within the bound is still waited for.
    fake.server.reset();
    fake.server.script('fake-backup', { status: 429, headers: { 'retry-after': '0.2' } }, { text: 'waited' });
    expect((await models().chat({ model: 'fake-backup', messages: hello, interactive: true })).text).toBe('waited');
    expect(fake.server.log.map((r) => r.reply)).toEqual([429, 200]);
  });

  it('retries a 500 and a dropped connection', async () => {
    fake.server.script('fake-chat', { status: 500 }, { drop: 'immediately' }, { text: 'ok' });
    const result = await manager().chat({ model: 'fake-chat', messages: hello });
    expect(result.text).toBe('ok');
    expect(fake.server.requestsFor('fake-chat').map((r) => r.reply)).toEqual([500, 'drop', 200]);
  });

  it('does not retry a 400: the error reaches the caller at once', async () => {
    fake.server.script('fake-chat', { status: 400, body: { error: { message: 'bad tool schema' } } });
    await expect(manager().chat({ model: 'fake-chat', messages: hello })).rejects.toThrow(UpstreamError);
    expect(fake.server.log).toHaveLength(1);
    expect((await settled(1))[0]?.error).toContain('bad tool schema');
  });

  it("an upstream's error that echoes its provider's key (as some servers echo what they were sent) carries it neither to the caller nor to the usage record", async () => {
    const echo = { error: { message: 'Bad request from Authorization: Bearer fake-key; check fake-key' } };
    for (const [what, call] of [
      ['wire', () => manager().chat({ model: 'fake-chat', messages: hello })],
      ['SDK with tools', () => manager().chat({ model: 'fake-chat', messages: hello, ...SDK_TOOLS })],
      ['stream', () => manager().stream({ model: 'fake-chat', messages: hello }).result],
      ['embeddings', () => manager().embed({ model: 'fake-embed', values: ['x'] })],
    ] as const) {
      fake.records = [];
      fake.server.reset();
      // Embeddings: a 400 to base64 is asked again for numbers (see openai-wire.ts), refused alike.
      const refusal = { status: 400, body: echo };
      if (what === 'embeddings') fake.server.script('fake-embed', refusal, refusal);
      else fake.server.script('fake-chat', refusal);
      const failure = await (call as () => Promise<unknown>)().catch((e: unknown) => e);
      expect(failure, what).toBeInstanceOf(UpstreamError);
      const { message, detail, stack } = failure as UpstreamError;
      expect(`${message} ${String(detail)} ${stack}`, what).not.toContain('fake-key');
      expect(message, what).toContain('Bearer [redacted]; check [redacted]');
      expect((await settled(1))[0]?.error, what).toContain('[redacted]');
      expect((await settled(1))[0]?.error, what).not.toContain('fake-key');
    }
  });

  it("an upstream's error that echoes the credentials of a provider's Authorization header alone (without its scheme) carries them neither to the caller nor to the usage record", async () => {
    const token = 'hdr-token-0123456789';
    const m = fakeModelManager(fake.server, {
      models: [{ id: 'fake-bearer', provider: 'bearer', pricing: price('1', '2') }],
      records: fake.records,
      // Another header's second word is no credential (it would be redacted wherever an error says it).
      providers: [{ id: 'bearer', kind: 'openai-compatible', base_url: fake.server.url, headers: { Authorization: `Bearer ${token}`, 'X-Title': 'Acme Assistant' } }],
    });
    fake.server.script('fake-bearer', { status: 400, body: { error: { message: `Invalid token ${token}: Assistant messages must alternate` } } });
    const failure = await m.chat({ model: 'fake-bearer', messages: hello }).catch((e: unknown) => e);
    expect(fake.server.log[0]?.headers.authorization).toBe(`Bearer ${token}`);
    expect(failure).toBeInstanceOf(UpstreamError);
    expect((failure as Error).message).toBe('Upstream 400 error: Invalid token [redacted]: Assistant messages must alternate');
    const [record] = await settled(1);
    expect(record?.error).toBe('Upstream 400 error: Invalid token [redacted]: Assistant messages must alternate');
  });

  it('a provider refusing the model itself (401, 402, 403, 404) is not retried: the fallback answers', async () => {
    for (const status of [401, 402, 403, 404]) {
      fake.server.reset();
      fake.server.script('fake-chat', { status, body: { error: { message: `refused ${status}` } } });
      fake.server.script('fake-backup', { text: 'from the backup' });
      const result = await manager().chat({ model: 'fake-chat', messages: hello });
      expect(result).toMatchObject({ text: 'from the backup', model: 'fake-backup' });
      expect(fake.server.log.map((r) => [r.model, r.reply])).toEqual([['fake-chat', status], ['fake-backup', 200]]);
    }
    // With no fallback left, the refusal is the caller's error.
    fake.server.reset();
    fake.server.script('fake-backup', { status: 401, body: { error: { message: 'bad key' } } });
    await expect(manager().chat({ model: 'fake-backup', messages: hello })).rejects.toThrow(UpstreamError);
    expect(fake.server.log).toHaveLength(1);
  });

  it("two models that name each other as fallbacks: a call tries its model's own fallbacks, never theirs (no loop)", async () => {
    const paired = fakeModelManager(fake.server, { builtins, models: [CUSTOM_MODELS[0]!, { ...CUSTOM_MODELS[1]!, fallbacks: ['fake-chat'] }], records: fake.records });
    for (const [first, second] of [['fake-chat', 'fake-backup'], ['fake-backup', 'fake-chat']] as const) {
      fake.server.reset();
      fake.server.script('*', { status: 401, body: { error: { message: 'refused' } } }, { status: 401, body: { error: { message: 'refused' } } }, { status: 401, body: { error: { message: 'refused' } } });
      await expect(paired.chat({ model: first, messages: hello })).rejects.toThrow(UpstreamError);
      expect(fake.server.log.map((r) => r.model)).toEqual([first, second]);
    }
  });

  it('times out a hung upstream and aborts the request', async () => {
    fake.server.script('fake-chat', { hang: true });
    fake.server.script('fake-backup', { hang: true });
    const m = manager({ maxRetries: 0 });
    const started = Date.now();
    await expect(m.chat({ model: 'fake-chat', messages: hello, timeoutMs: 300 })).rejects.toThrow(ModelTimeoutError);
    expect(Date.now() - started).toBeLessThan(1_500);
    await fake.server.waitFor((log) => log.length === 2 && log.every((r) => r.aborted));
    expect(fake.server.log.map((r) => r.model)).toEqual(['fake-chat', 'fake-backup']);
    expect((await settled(2)).map((r) => r.status)).toEqual(['error', 'error']);
  });

  it('tries a timed-out attempt again for a run (SPEC §5), not for a waiting client (interactive): its fallbacks are, or it ends at once', async () => {
    const m = manager({ maxRetries: 1 });
    fake.server.script('fake-backup', { hang: true }, { text: 'second try' });
    expect((await m.chat({ model: 'fake-backup', messages: hello, timeoutMs: 300 })).text).toBe('second try');
    expect(fake.server.requestsFor('fake-backup')).toHaveLength(2);

    fake.server.reset();
    fake.server.script('fake-backup', { hang: true }, { text: 'second try' });
    const started = Date.now();
    await expect(m.chat({ model: 'fake-backup', messages: hello, timeoutMs: 300, interactive: true })).rejects.toThrow(ModelTimeoutError);
    expect(Date.now() - started).toBeLessThan(600);
    await fake.server.waitFor((log) => log.length === 1 && log[0]!.aborted);

    fake.server.reset();
    fake.server.script('fake-chat', { hang: true }, { text: 'not asked again' });
    fake.server.script('fake-backup', { text: 'from the backup' });
    expect(await m.chat({ model: 'fake-chat', messages: hello, timeoutMs: 300, interactive: true })).toMatchObject({ text: 'from the backup', model: 'fake-backup' });
    expect(fake.server.log.map((r) => r.model)).toEqual(['fake-chat', 'fake-backup']);
  });

  it('falls back to the next model when the first keeps failing, and meters both', async () => {
    fake.server.script('fake-chat', { status: 500 }, { status: 502 }, { status: 503 });
    fake.server.script('fake-backup', { text: 'from the backup', usage: { prompt_tokens: 10, completion_tokens: 5 } });
    const result = await manager().chat({ model: 'fake-chat', messages: hello });
    expect(result).toMatchObject({ text: 'from the backup', model: 'fake-backup' });
    expect(fake.server.requestsFor('fake-chat')).toHaveLength(3); // 1 + MODEL_MAX_RETRIES
    const metered = await settled(2);
    expect(metered.map((r) => [r.model, r.status, r.attempts])).toEqual([
      ['fake-chat', 'error', 3],
      ['fake-backup', 'success', 1],
    ]);
    expect(metered[0]!.cost).toBe('0');
    expect(metered[1]!.cost).toBe('0.00003'); // 10 × 1 + 5 × 4 = 30 / 10^6
  });

  it('returns tool calls for the caller to run', async () => {
    fake.server.script('fake-chat', { toolCalls: [{ id: 'call_1', name: 'get_weather', arguments: '{"city":"Oslo"}' }], usage: { prompt_tokens: 5, completion_tokens: 5 } });
    const { jsonSchema, tool } = await import('ai');
    const result = await manager().chat({
      model: 'fake-chat',
      messages: hello,
      tools: { get_weather: tool({ description: 'Weather', inputSchema: jsonSchema({ type: 'object', properties: { city: { type: 'string' } } }) }) },
    });
    expect(result.finishReason).toBe('tool-calls');
    expect(result.toolCalls).toEqual([{ toolCallId: 'call_1', toolName: 'get_weather', input: { city: 'Oslo' }, text: '{"city":"Oslo"}' }]);
    const sent = fake.server.log[0]!.body as { tools: { function: { name: string } }[] };
    expect(sent.tools[0]!.function.name).toBe('get_weather');
  });

  it('an aborted signal stops the call (even while waiting to retry) and records it as aborted', async () => {
    fake.server.script('fake-chat', { status: 429, headers: { 'retry-after': '10' } });
    const controller = new AbortController();
    const call = manager({ retryMaxWaitMs: 10_000 }).chat({ model: 'fake-chat', messages: hello, signal: controller.signal });
    await fake.server.waitFor((log) => log.length === 1 && log[0]!.completed);
    controller.abort();
    await expect(call).rejects.toThrow(ModelCallAbortedError);
    expect(fake.server.log).toHaveLength(1);
    expect((await settled(1))[0]!.status).toBe('aborted');
  });

  it('a caller gone while the call is being reserved: no upstream request, settled as aborted (chat and stream)', async () => {
    for (const operation of ['chat', 'stream'] as const) {
      fake.records = [];
      let release!: () => void;
      const gate = new Promise<void>((resolve) => (release = resolve));
      // A slow hold (a busy database): the caller leaves before it is granted.
      const m = manager({ meter: { reserve: () => gate.then(() => ({ settle: (r) => void fake.records.push(r) })) } });
      const controller = new AbortController();
      const request = { model: 'fake-chat', messages: hello, signal: controller.signal };
      const call = operation === 'chat' ? m.chat(request) : m.stream(request).result;
      await new Promise((r) => setTimeout(r, 20));
      controller.abort();
      release();
      await expect(call, operation).rejects.toThrow(ModelCallAbortedError);
      await new Promise((r) => setTimeout(r, 100));
      expect(fake.server.log, operation).toHaveLength(0);
      expect(await settled(1), operation).toMatchObject([{ status: 'aborted', attempts: 0, cost: '0', operation }]);
    }
  });

  it('a built-in provider without its key fails naming the setting, and is listed unavailable', async () => {
    const m = manager();
    await expect(m.chat({ model: 'gpt-4.1-mini', messages: hello })).rejects.toThrow(ProviderUnavailableError);
    await expect(m.chat({ model: 'gpt-4.1-mini', messages: hello })).rejects.toThrow('OPENAI_API_KEY is not set');
    expect(m.getModel('gpt-4.1-mini')).toMatchObject({ available: false, unavailable_reason: 'OPENAI_API_KEY is not set' });
    expect(m.getModel('fake-chat')).toMatchObject({ available: true, unavailable_reason: null });
    expect(fake.server.log).toHaveLength(0);
  });

  it('the built-in openai provider calls Chat Completions at OPENAI_BASE_URL with OPENAI_API_KEY', async () => {
    fake.server.script('gpt-4.1-mini', { text: 'via openai', usage: { prompt_tokens: 1000, completion_tokens: 1000, cached_tokens: 1000 } });
    const result = await manager({}, { OPENAI_API_KEY: 'sk-test' }).chat({ model: 'gpt-4.1-mini', messages: hello });
    expect(result).toMatchObject({ text: 'via openai', model: 'gpt-4.1-mini', provider: 'openai' });
    expect(fake.server.log[0]).toMatchObject({ path: '/v1/chat/completions', model: 'gpt-4.1-mini' });
    expect(fake.server.log[0]!.headers.authorization).toBe('Bearer sk-test');
    // Catalog prices: 1000 cached × 0.1 + 1000 output × 1.6 = 1700 / 10^6.
    expect(result.cost).toBe('0.0017');
  });

  it('calls a pinned snapshot or variant the catalog prices with its model as asked, at that price; another spelling calls the catalog id', async () => {
    const m = manager({}, { OPENAI_API_KEY: 'sk-test' });
    const usage = { prompt_tokens: 1000, completion_tokens: 1000, cached_tokens: 1000 };
    fake.server.script('gpt-4.1-mini-2025-04-14', { text: 'snapshot', usage });
    const snapshot = await m.chat({ model: 'gpt-4.1-mini-2025-04-14', messages: hello });
    expect(snapshot).toMatchObject({ text: 'snapshot', model: 'gpt-4.1-mini-2025-04-14', provider: 'openai', cost: '0.0017' });
    fake.server.script('gpt-5-chat-latest', { text: 'variant' });
    expect((await m.chat({ model: 'gpt-5-chat-latest', messages: hello })).model).toBe('gpt-5-chat-latest');
    // Another spelling, and a name that is no API model (o4-mini asked to reason hard): the entry's id.
    fake.server.script('gpt-5.1', { text: 'respelled' });
    expect((await m.chat({ model: 'gpt-5-1', messages: hello })).model).toBe('gpt-5.1');
    fake.server.script('o4-mini', { text: 'reasoned' });
    expect((await m.chat({ model: 'o4-mini-high', messages: hello })).model).toBe('o4-mini');
    expect(fake.server.log.map((entry) => entry.model)).toEqual(['gpt-4.1-mini-2025-04-14', 'gpt-5-chat-latest', 'gpt-5.1', 'o4-mini']);
    // The catalog entry still answers for the snapshot's id (GET /models/{id}); the call's model is the snapshot, at the entry's price.
    expect(m.getModel('gpt-4.1-mini-2025-04-14')?.id).toBe('gpt-4.1-mini');
    expect(m.modelAsCalled('gpt-4.1-mini-2025-04-14')).toMatchObject({ id: 'gpt-4.1-mini-2025-04-14', pricing: m.getModel('gpt-4.1-mini')!.pricing });
    expect(m.modelAsCalled('gpt-4o-mini-search-preview-2025-03-11')?.id).toBe('gpt-4o-mini'); // a variant the catalog leaves out
  });

  it('falls back to a pinned snapshot as it is named', async () => {
    const catalog = new ModelCatalog(builtins, [...CUSTOM_MODELS, { id: 'gpt-4.1', fallbacks: ['gpt-4.1-mini-2025-04-14'] }]);
    const m = manager({ catalog, maxRetries: 0 }, { OPENAI_API_KEY: 'sk-test' });
    fake.server.script('gpt-4.1', { status: 500 });
    fake.server.script('gpt-4.1-mini-2025-04-14', { text: 'fallback' });
    expect(await m.chat({ model: 'gpt-4.1', messages: hello })).toMatchObject({ text: 'fallback', model: 'gpt-4.1-mini-2025-04-14' });
    expect(fake.server.log.map((entry) => entry.model)).toEqual(['gpt-4.1', 'gpt-4.1-mini-2025-04-14']);
  });

  it('skips a fallback whose provider has no credentials, says so in the model\'s view, and fails with its own model\'s error when no other answers', async () => {
    const catalog = new ModelCatalog(builtins, [...CUSTOM_MODELS, { id: 'fake-chat', fallbacks: ['gpt-4.1', 'fake-backup'] }]);
    const m = manager({ catalog, maxRetries: 0 });
    expect(m.publicView(m.getModel('fake-chat')!).unavailable_fallbacks).toEqual([{ name: 'gpt-4.1', reason: 'OPENAI_API_KEY is not set' }]);
    fake.server.script('fake-chat', { status: 500 }, { status: 500 });
    fake.server.script('fake-backup', { text: 'from the backup' }, { status: 500 });
    expect(await m.chat({ model: 'fake-chat', messages: hello })).toMatchObject({ text: 'from the backup', model: 'fake-backup' });
    // None left that can answer: the caller gets its model's upstream error, not the skipped fallback's 503.
    await expect(m.chat({ model: 'fake-chat', messages: hello })).rejects.toMatchObject({ statusCode: 502, upstreamStatus: 500 });
    expect(fake.server.log.map((entry) => entry.model)).toEqual(['fake-chat', 'fake-backup', 'fake-chat', 'fake-backup']);
  });

  it("tells the openai provider what the request asks of it as its own options: a loose schema, reasoning effort, the end user, one tool call at a time", async () => {
    fake.server.script('gpt-4.1-mini', { text: '{}' });
    await manager({}, { OPENAI_API_KEY: 'sk-test' }).chat({
      model: 'gpt-4.1-mini',
      messages: hello,
      responseFormat: { type: 'json', name: 'r', schema: { type: 'object' }, strict: false },
      reasoningEffort: 'low',
      user: 'end-user-7',
      parallelToolCalls: false,
    });
    expect(fake.server.log[0]!.body).toMatchObject({ reasoning_effort: 'low', user: 'end-user-7', parallel_tool_calls: false, response_format: { type: 'json_schema', json_schema: { strict: false } } });
    // One it does not take is the request's fault (400 in the SDK's words), not a 500; nothing goes upstream.
    const refused = await manager({}, { OPENAI_API_KEY: 'sk-test' }).chat({ model: 'gpt-4.1-mini', messages: hello, reasoningEffort: 'auto' }).catch((e: unknown) => e);
    expect(refused).toMatchObject({ statusCode: 400 });
    expect(fake.server.log).toHaveLength(1);
  });

  it('refuses a part its provider has no place for (a file of a type an openai-compatible model does not take) as the request\'s fault, 400, without calling it', async () => {
    const file = [{ role: 'user' as const, content: [{ type: 'file' as const, data: new TextEncoder().encode('hello'), mediaType: 'application/x-keel-unknown' }] }];
    const refused = await manager().chat({ model: 'fake-chat', messages: file }).catch((e: unknown) => e);
    expect(refused).toMatchObject({ statusCode: 400 });
    expect((refused as Error).message).toMatch(/media type/);
    expect(fake.server.log).toHaveLength(0);
  });

  it('refuses an image for a built-in model without vision (400 at the image, as OpenAI does), passes it to one with vision and to a custom model, whose capability is the operator\'s to know, and skips a fallback without vision', async () => {
    const image = { type: 'image' as const, image: 'data:image/png;base64,iVBORw0KGgo=' };
    const withImage = [{ role: 'user' as const, content: 'Hello' }, { role: 'user' as const, content: [{ type: 'text' as const, text: 'What is this?' }, image] }];
    const openai = manager({}, { OPENAI_API_KEY: 'sk-test' });
    expect(builtins.find((m) => m.id === 'o3-mini')?.capabilities).not.toContain('vision');
    for (const refused of [await failureOf(openai.chat({ model: 'o3-mini', messages: withImage })), await streamFailure(openai.stream({ model: 'o3-mini', messages: withImage }))]) {
      expect(refused).toBeInstanceOf(ModelValueError);
      expect(refused).toMatchObject({ statusCode: 400, param: 'messages[1].content[1].type' });
      expect((refused as Error).message).toContain('does not take image input');
    }
    // Text alone still goes to it.
    fake.server.script('o3-mini', { text: 'ok' });
    await openai.chat({ model: 'o3-mini', messages: hello });
    expect(fake.server.log.map((r) => r.model)).toEqual(['o3-mini']);
    fake.server.reset();
    // gpt-4.1-mini reads images; fake-chat (custom, capabilities chat and tools) is not known not to.
    await openai.chat({ model: 'gpt-4.1-mini', messages: withImage });
    await openai.chat({ model: 'fake-chat', messages: withImage });
    expect(fake.server.log.map((r) => r.model)).toEqual(['gpt-4.1-mini', 'fake-chat']);
    // A fallback without vision does not take an image call: the primary's failure is the call's.
    fake.server.reset();
    const falling = fakeModelManager(fake.server, { builtins, models: [{ ...CUSTOM_MODELS[0]!, fallbacks: ['o3-mini'] }], records: fake.records, openaiKey: 'sk-test', overrides: { maxRetries: 0 } });
    fake.server.script('fake-chat', { status: 500 });
    expect(await failureOf(falling.chat({ model: 'fake-chat', messages: withImage }))).toBeInstanceOf(UpstreamError);
    expect(fake.server.log.map((r) => r.model)).toEqual(['fake-chat']);
  });

  it('lists models with availability; disabled ones only when asked', () => {
    const m = manager({ catalog: new ModelCatalog(builtins, [...CUSTOM_MODELS, { id: 'fake-backup', enabled: false }]) });
    expect(m.listAvailableModels().map((x) => x.id)).not.toContain('fake-backup');
    expect(m.listAvailableModels({ includeDisabled: true }).find((x) => x.id === 'fake-backup')).toMatchObject({ enabled: false, available: true });
  });

  it('an answer that broke the tool choice fails the call and is charged as the provider billed it, on every path (the SDK\'s generateText too)', async () => {
    for (const [name, way] of NAMED.filter(([, way]) => way.tools)) {
      fake.server.reset();
      fake.records = [];
      fake.server.script('fake-chat', { text: 'No tool for you', usage: { prompt_tokens: 1000, completion_tokens: 500 } });
      const failure = await manager().chat({ model: 'fake-chat', messages: hello, ...way, toolChoice: 'required' }).catch((e: unknown) => e);
      expect(failure, name).toBeInstanceOf(ModelToolChoiceError);
      expect(fake.server.log, name).toHaveLength(1); // the request's fault: no retry, no fallback
      // 1000 × 2 + 500 × 8 = 6000 / 10^6, as reported: not an estimate, not nothing.
      expect((await settled(1))[0], name).toMatchObject({ status: 'error', estimated: false, tokens: { input: 1000, output: 500 }, cost: '0.006' });
    }
  });

  it('refuses unknown and disabled models, and embeddings from chat models', async () => {
    const m = manager();
    await expect(m.chat({ model: 'nope', messages: hello })).rejects.toMatchObject({ statusCode: 404 });
    await expect(m.embed({ model: 'fake-chat', values: ['x'] })).rejects.toMatchObject({ statusCode: 400 });
  });
});

describe('ModelManager.stream', () => {
  it('streams text with time to first token and usage', async () => {
    fake.server.script('fake-chat', { chunks: ['Hel', 'lo ', 'world'], chunkDelayMs: 20, usage: { prompt_tokens: 7, completion_tokens: 3, cached_tokens: 2, reasoning_tokens: 1 } });
    const stream = manager().stream({ model: 'fake-chat', messages: hello });
    const deltas: string[] = [];
    let finish;
    for await (const event of stream) {
      if (event.type === 'text-delta') deltas.push(event.text);
      if (event.type === 'finish') finish = event.result;
    }
    expect(deltas.join('')).toBe('Hello world');
    const result = await stream.result;
    expect(finish).toEqual(result);
    expect(result.usage).toEqual({ input: 7, cached_input: 2, cache_write: 0, output: 3, reasoning: 1 });
    expect(result.time_to_first_token_ms).toBeGreaterThanOrEqual(15);
    expect(fake.server.log[0]!.body.stream_options).toEqual({ include_usage: true });
    const record = (await settled(1))[0]!;
    // 5 × 2 + 2 × 0.5 + 3 × 8 = 35 / 10^6
    expect(record).toMatchObject({ operation: 'stream', status: 'success', cost: '0.000035' });
    expect(record.time_to_first_token_ms).toBeGreaterThanOrEqual(15);
  });

  it('streams tool calls', async () => {
    fake.server.script('fake-chat', { toolCalls: [{ id: 'call_9', name: 'lookup', arguments: '{"q":"keel"}' }], usage: { prompt_tokens: 1, completion_tokens: 1 } });
    const stream = manager().stream({ model: 'fake-chat', messages: hello });
    const calls = [];
    for await (const event of stream) if (event.type === 'tool-call') calls.push(event.toolCall);
    // With the arguments as the model wrote them (what /v1 answers: a parse changes integers past 2^53).
    expect(calls).toEqual([{ toolCallId: 'call_9', toolName: 'lookup', input: { q: 'keel' }, text: '{"q":"keel"}' }]);
  });

  it('aborting mid-stream aborts the upstream request', async () => {
    fake.server.script('fake-chat', { chunks: Array.from({ length: 50 }, (_, i) => `w${i} `), chunkDelayMs: 30 });
    const controller = new AbortController();
    const stream = manager().stream({ model: 'fake-chat', messages: hello, signal: controller.signal });
    const seen: string[] = [];
    await expect(
      (async () => {
        for await (const event of stream) {
          if (event.type === 'text-delta') seen.push(event.text);
          if (seen.length === 3) controller.abort();
        }
      })(),
    ).rejects.toThrow(ModelCallAbortedError);
    await fake.server.waitFor((log) => log[0]?.aborted === true);
    expect(fake.server.log[0]!.completed).toBe(false);
    expect(fake.server.log[0]!.chunksSent).toBeLessThan(50);
    const record = (await settled(1))[0]!;
    expect(record).toMatchObject({ status: 'aborted', estimated: true });
    expect(record.tokens.output).toBeGreaterThan(0); // estimated from what was streamed
  });

  it('stopping the iteration (break) aborts the upstream request too', async () => {
    fake.server.script('fake-chat', { chunks: Array.from({ length: 50 }, (_, i) => `w${i} `), chunkDelayMs: 30 });
    const stream = manager().stream({ model: 'fake-chat', messages: hello });
    for await (const event of stream) if (event.type === 'text-delta') break;
    await fake.server.waitFor((log) => log[0]?.aborted === true);
    await expect(stream.result).rejects.toThrow(ModelCallAbortedError);
  });

  it('retries before the first chunk; after it, a dropped connection ends the stream with an error', async () => {
    fake.server.script('fake-chat', { status: 429, headers: { 'retry-after': '0' } }, { chunks: ['a ', 'b ', 'c '], chunkDelayMs: 30, drop: { afterChunks: 2 } });
    const stream = manager().stream({ model: 'fake-chat', messages: hello });
    const seen: string[] = [];
    await expect(
      (async () => {
        for await (const event of stream) if (event.type === 'text-delta') seen.push(event.text);
      })(),
    ).rejects.toThrow();
    expect(seen.length).toBeGreaterThan(0);
    expect(fake.server.requestsFor('fake-chat')).toHaveLength(2); // no retry after output reached the caller
    expect(fake.server.requestsFor('fake-backup')).toHaveLength(0);
  });

  it('times out a stream that stalls between chunks', async () => {
    fake.server.script('fake-chat', { chunks: ['a ', 'b '], stallAfterChunks: 1 });
    const stream = manager().stream({ model: 'fake-chat', messages: hello, timeoutMs: 200 });
    const started = Date.now();
    const seen: string[] = [];
    await expect(
      (async () => {
        for await (const event of stream) if (event.type === 'text-delta') seen.push(event.text);
      })(),
    ).rejects.toThrow(ModelTimeoutError);
    expect(seen).toEqual(['a ']);
    expect(Date.now() - started).toBeLessThan(1_500);
    await fake.server.waitFor((log) => log[0]?.aborted === true);
    expect(fake.server.log).toHaveLength(1); // output had reached the caller: no retry, no fallback
  });
});

describe('ModelManager.stream limits', () => {
  /** Streams `fake-chat` (aborted after 5 s): the text deltas and what the stream failed with. */
  async function drain(models: ModelManager): Promise<{ texts: string[]; failure: unknown; ms: number }> {
    const started = Date.now();
    const texts: string[] = [];
    let failure: unknown;
    const signal = AbortSignal.timeout(5_000);
    try {
      for await (const event of models.stream({ model: 'fake-chat', messages: hello, signal })) if (event.type === 'text-delta') texts.push(event.text);
    } catch (error) {
      failure = error;
    }
    return { texts, failure, ms: Date.now() - started };
  }

  it('ends a stream at its total deadline however steadily it trickles: 504, upstream closed, metered, no fallback', async () => {
    // A chunk every 50 ms for 50 s: the chunk timeout (2 s) never fires.
    fake.server.script('fake-chat', { chunks: Array.from({ length: 1_000 }, () => 'x '), chunkDelayMs: 50 });
    const { texts, failure, ms } = await drain(manager({ streamTimeoutMs: 1_000 }));
    expect(failure).toBeInstanceOf(ModelAnswerLimitError);
    expect(failure).toMatchObject({ statusCode: 504, detail: "The model's answer did not finish within 1000 ms" });
    expect(ms).toBeGreaterThanOrEqual(950);
    expect(ms).toBeLessThan(2_000);
    expect(texts.length).toBeGreaterThan(5);
    await fake.server.waitFor((log) => log[0]?.aborted === true);
    expect(fake.server.log).toHaveLength(1); // fake-chat's fallback is not tried
    const record = (await settled(1))[0]!;
    expect(record).toMatchObject({ status: 'error', estimated: true, error: "The model's answer did not finish within 1000 ms" });
    expect(record.tokens.output).toBeGreaterThan(0);
  });

  it("a retry-after the stream's deadline would pass is not waited out: the fallback is tried at once, else the provider's refusal (its wait passed on) ends the call", async () => {
    const limited: ScriptedReply = { status: 429, headers: { 'retry-after': '3' } };
    const models = manager({ streamTimeoutMs: 1_500, retryMaxWaitMs: 5_000 });
    fake.server.script('fake-chat', limited);
    fake.server.script('fake-backup', { text: 'from the backup' });
    let started = Date.now();
    const answered = await models.stream({ model: 'fake-chat', messages: hello }).result;
    expect(answered).toMatchObject({ text: 'from the backup', model: 'fake-backup' });
    expect(Date.now() - started).toBeLessThan(1_000);
    expect(fake.server.log.map((r) => [r.model, r.reply])).toEqual([['fake-chat', 429], ['fake-backup', 200]]);

    fake.server.reset();
    fake.records = [];
    fake.server.script('fake-chat', limited);
    fake.server.script('fake-backup', limited);
    started = Date.now();
    const failure = await manager({ streamTimeoutMs: 1_500, retryMaxWaitMs: 5_000 }).stream({ model: 'fake-chat', messages: hello }).result.catch((e: unknown) => e);
    expect(Date.now() - started).toBeLessThan(1_000);
    expect(failure).toBeInstanceOf(UpstreamError);
    expect(failure).toMatchObject({ upstreamStatus: 429, retryAfterMs: 3_000, waitPassedOn: true });
    // Each model asked once: none was sent a try only to have it cut off at the deadline.
    expect(fake.server.log.map((r) => [r.model, r.reply])).toEqual([['fake-chat', 429], ['fake-backup', 429]]);
    expect((await settled(2)).map((r) => [r.model, r.status, r.attempts])).toEqual([['fake-chat', 'error', 1], ['fake-backup', 'error', 1]]);
  });

  it("a retry or fallback with less than a tenth of the stream's time left (at most 1 s) is not sent: it would be cut off at the deadline", async () => {
    // The refusal comes ~1.85 s into a 2 s stream; its short wait leaves ~100 ms, under the floor (200 ms).
    fake.server.script('fake-chat', { status: 503, chunkDelayMs: 1_850, headers: { 'retry-after-ms': '50' } });
    fake.server.script('fake-backup', { text: 'from the backup' });
    const started = Date.now();
    const failure = await streamFailure(manager({ streamTimeoutMs: 2_000 }).stream({ model: 'fake-chat', messages: hello }));
    expect(Date.now() - started).toBeLessThan(2_000);
    expect(failure).toBeInstanceOf(UpstreamError);
    expect(failure).toMatchObject({ upstreamStatus: 503, retryAfterMs: 50, waitPassedOn: true });
    expect(fake.server.log.map((r) => [r.model, r.reply])).toEqual([['fake-chat', 503]]);
    expect((await settled(1)).map((r) => [r.model, r.status, r.attempts])).toEqual([['fake-chat', 'error', 1]]);

    // With the time for it, the same refusal is tried again.
    fake.server.reset();
    fake.server.script('fake-chat', { status: 503, chunkDelayMs: 1_000, headers: { 'retry-after-ms': '50' } }, { text: 'second try' });
    expect((await manager({ streamTimeoutMs: 2_000 }).stream({ model: 'fake-chat', messages: hello }).result).text).toBe('second try');
  });

  it('the deadline also ends a stream that sends only empty chunks (each one resets the chunk timeout)', async () => {
    fake.server.script('fake-chat', { chunks: Array.from({ length: 1_000 }, () => ''), chunkDelayMs: 50 });
    const { texts, failure } = await drain(manager({ streamTimeoutMs: 1_000 }));
    expect(failure).toBeInstanceOf(ModelAnswerLimitError);
    expect(texts).toEqual([]);
    await fake.server.waitFor((log) => log[0]?.aborted === true);
    expect(fake.server.log).toHaveLength(1); // not retried
  });

  it('ends a stream whose answer passes the size limit: 502, upstream closed, metered', async () => {
    fake.server.script('fake-chat', { chunks: Array.from({ length: 200 }, () => 'x'.repeat(100)), chunkDelayMs: 5 });
    const { texts, failure } = await drain(manager({ maxResponseBytes: 1_000 }));
    expect(failure).toBeInstanceOf(ModelAnswerLimitError);
    expect(failure).toMatchObject({ statusCode: 502 });
    expect(texts.join('').length).toBeLessThanOrEqual(1_000);
    await fake.server.waitFor((log) => log[0]?.aborted === true);
    expect(fake.server.log[0]!.chunksSent).toBeLessThan(200);
    const record = (await settled(1))[0]!;
    expect(record).toMatchObject({ status: 'error', estimated: true });
    expect(record.tokens.output).toBeGreaterThan(250);
  });
});

describe("the answer size limit on the SDK's paths as on the wire's (MODEL_MAX_RESPONSE_BYTES)", () => {
  const LIMIT = 64 * 1024;
  /** Far past the limit: what a client reading it whole would hold. */
  const PAD = 32 * 1024 * 1024;
  const EXCEEDED = `The model's answer exceeded ${LIMIT} bytes`;
  const limited = () => manager({ maxResponseBytes: LIMIT });

  it('a chat answer past the limit ends the call: 502 naming the limit, unretried, no fallback, its connection closed, metered as an error', async () => {
    for (const [path, extra] of NAMED) {
      fake.server.reset();
      fake.records = [];
      fake.server.script('fake-chat', { text: 'Hi', padBytes: PAD });
      const failure = await failureOf(limited().chat({ model: 'fake-chat', messages: hello, ...extra }));
      expect(failure, path).toBeInstanceOf(ModelAnswerLimitError);
      expect(failure, path).toMatchObject({ statusCode: 502, detail: EXCEEDED });
      await fake.server.waitFor((log) => log[0]?.aborted === true, 2_000);
      expect(fake.server.log, path).toHaveLength(1); // fake-chat's fallback is not tried either
      // Read no further than the limit: what was sent beyond it sits in the sockets' buffers at most.
      expect(fake.server.log[0]!.bodyBytesSent, path).toBeLessThan(PAD / 4);
      expect(await settled(1), path).toMatchObject([{ operation: 'chat', model: 'fake-chat', status: 'error', error: EXCEEDED, attempts: 1 }]);
    }
  });

  it('an answer that announces its length past the limit is refused the same (SDK with tools)', async () => {
    const completion = JSON.stringify({ id: 'x', object: 'chat.completion', created: 1, model: 'fake-chat', choices: [{ index: 0, message: { role: 'assistant', content: 'x'.repeat(2 * LIMIT) }, finish_reason: 'stop' }] });
    fake.server.script('fake-chat', { rawBody: completion });
    const failure = await failureOf(limited().chat({ model: 'fake-chat', messages: hello, ...SDK_TOOLS }));
    expect(failure).toMatchObject({ statusCode: 502, detail: EXCEEDED });
    expect(fake.server.log).toHaveLength(1);
  });

  /** An embeddings answer may carry the limit or 128 KiB a vector asked for, whichever is more. */
  const PER_VECTOR = 128 * 1024;

  it('an embeddings answer past what its batch may carry: the same, the message naming that size', async () => {
    fake.server.script('fake-embed', { padBytes: PAD });
    const failure = await failureOf(limited().embed({ model: 'fake-embed', values: ['hello'] }));
    expect(failure).toBeInstanceOf(ModelAnswerLimitError);
    expect(failure).toMatchObject({ statusCode: 502, detail: `The model's answer exceeded ${PER_VECTOR} bytes` });
    await fake.server.waitFor((log) => log[0]?.aborted === true, 2_000);
    expect(fake.server.log).toHaveLength(1);
    expect(fake.server.log[0]!.bodyBytesSent).toBeLessThan(PAD / 4);
    expect(await settled(1)).toMatchObject([{ operation: 'embed', status: 'error', error: `The model's answer exceeded ${PER_VECTOR} bytes` }]);
  });

  it('an embeddings batch answers with more than the limit when its vectors need it (OpenAI takes 2,048 inputs of ~60 KB each as JSON), up to 128 KiB a vector', async () => {
    const values = ['a', 'b', 'c', 'd'];
    fake.server.script('fake-embed', { padBytes: 3 * PER_VECTOR });
    expect(vectorsOf(await limited().embed({ model: 'fake-embed', values }))).toEqual(values.map((v) => fakeEmbedding(v)));
    fake.server.script('fake-embed', { padBytes: 5 * PER_VECTOR });
    const failure = await failureOf(limited().embed({ model: 'fake-embed', values }));
    expect(failure).toMatchObject({ statusCode: 502, detail: `The model's answer exceeded ${4 * PER_VECTOR} bytes` });
  });

  it('answers within the limit come through whole on every path, embeddings too', async () => {
    for (const [path, extra] of NAMED) {
      fake.server.script('fake-chat', { text: 'Hi', padBytes: LIMIT / 2 });
      expect((await limited().chat({ model: 'fake-chat', messages: hello, ...extra })).text, path).toBe('Hi');
    }
    fake.server.script('fake-embed', { padBytes: LIMIT / 2 });
    expect(vectorsOf(await limited().embed({ model: 'fake-embed', values: ['hello'] }))).toEqual([fakeEmbedding('hello')]);
    expect(fake.server.log.every((r) => r.completed && !r.aborted)).toBe(true);
  });

  it('a stream is not capped by its bytes (its framing is most of them): an answer whose text is within the limit comes through (SDK with tools)', async () => {
    const pieces = Array.from({ length: 400 }, (_, i) => `w${i % 10} `);
    fake.server.script('fake-chat', { chunks: pieces });
    const small = 4_096;
    const texts: string[] = [];
    const stream = manager({ maxResponseBytes: small }).stream({ model: 'fake-chat', messages: hello, ...SDK_TOOLS });
    for await (const event of stream) if (event.type === 'text-delta') texts.push(event.text);
    expect(texts.join('')).toBe(pieces.join(''));
    expect(texts.join('').length).toBeLessThan(small);
    expect(fake.server.log[0]!.chunksSent * 100).toBeGreaterThan(small); // each event is far more than its text
  });

  it("the manager's word to the limited fetch (what answer to expect) never reaches the upstream", async () => {
    fake.server.script('fake-chat', { chunks: ['a', 'b'] });
    for await (const event of limited().stream({ model: 'fake-chat', messages: hello, ...SDK_TOOLS })) void event;
    fake.server.script('fake-embed', {});
    await limited().embed({ model: 'fake-embed', values: ['hello', 'world'] });
    expect(fake.server.log.length).toBeGreaterThanOrEqual(2);
    // Keel's one header an upstream sees is the deployment's hop mark (core/hop.ts).
    for (const request of fake.server.log) expect(Object.keys(request.headers).filter((name) => name.startsWith('x-keel'))).toEqual([HOP_HEADER]);
  });

  it('a stream event that does not end is not held past the limit (the SDK would assemble it): 502 at once, the connection closed', async () => {
    fake.server.script('fake-chat', { rawBody: `data: {"choices":[{"index":0,"delta":{"content":"${'x'.repeat(1024 * 1024)}`, holdOpen: true });
    const started = Date.now();
    const failure = await failureOf(
      (async () => {
        for await (const event of limited().stream({ model: 'fake-chat', messages: hello, ...SDK_TOOLS })) void event;
      })(),
    );
    expect(failure).toBeInstanceOf(ModelAnswerLimitError);
    expect(failure).toMatchObject({ statusCode: 502, detail: EXCEEDED });
    expect(Date.now() - started).toBeLessThan(1_000); // the attempt's timeout is 2 s
    await fake.server.waitFor((log) => log[0]?.aborted === true, 1_000);
    expect(fake.server.log).toHaveLength(1);
  });

  it('tool-call input the SDK assembles from a stream is not held past the limit either (provider model, SDK with tools)', async () => {
    const sse = (chunk: unknown) => `data: ${JSON.stringify(chunk)}\n\n`;
    const piece = (args: string) => sse({ choices: [{ index: 0, delta: { tool_calls: [{ index: 0, id: 'call_1', type: 'function', function: { name: 'lookup', arguments: args } }] }, finish_reason: null }] });
    for (const [path, extra] of NAMED.slice(1)) {
      fake.server.reset();
      // Each event well within the limit, their input together four times past it, and no end.
      fake.server.script('fake-chat', { rawBody: piece('{"q":"') + piece('x'.repeat(16 * 1024)).repeat(16), holdOpen: true });
      const started = Date.now();
      const failure = await failureOf(
        (async () => {
          for await (const event of limited().stream({ model: 'fake-chat', messages: hello, ...extra })) void event;
        })(),
      );
      expect(failure, path).toBeInstanceOf(ModelAnswerLimitError);
      expect(failure, path).toMatchObject({ statusCode: 502, detail: `The model's answer exceeded ${LIMIT} characters` });
      expect(Date.now() - started, path).toBeLessThan(1_000); // the attempt's timeout is 2 s
      await fake.server.waitFor((log) => log[0]?.aborted === true, 1_000);
      expect(fake.server.log, path).toHaveLength(1);
    }
  });

  it("the caller's abort still reaches the upstream through the limited fetch, before the answer and mid-stream (provider model, SDK with tools)", async () => {
    for (const [path, extra] of NAMED.slice(1)) {
      fake.server.reset();
      fake.server.script('fake-chat', { hang: true });
      const controller = new AbortController();
      setTimeout(() => controller.abort(), 100);
      expect(await failureOf(limited().chat({ model: 'fake-chat', messages: hello, signal: controller.signal, ...extra })), path).toBeInstanceOf(ModelCallAbortedError);
      await fake.server.waitFor((log) => log[0]?.aborted === true, 1_000);

      fake.server.reset();
      fake.server.script('fake-chat', { chunks: Array.from({ length: 50 }, (_, i) => `w${i} `), chunkDelayMs: 30 });
      const midway = new AbortController();
      let seen = 0;
      const failure = await failureOf(
        (async () => {
          for await (const event of limited().stream({ model: 'fake-chat', messages: hello, signal: midway.signal, ...extra })) {
            if (event.type === 'text-delta' && ++seen === 3) midway.abort();
          }
        })(),
      );
      expect(failure, path).toBeInstanceOf(ModelCallAbortedError);
      await fake.server.waitFor((log) => log[0]?.aborted === true, 1_000);
      expect(fake.server.log[0]!.chunksSent, path).toBeLessThan(50);
    }
  });
});

describe('a conversation the SDK cannot convert, an error event in a stream', () => {
  it('a tool call without its result is the request\'s fault: 400 in the SDK\'s words, on every path, streamed or not, nothing sent', async () => {
    const call = { role: 'assistant' as const, content: [{ type: 'tool-call' as const, toolCallId: 'c1', toolName: 'lookup', input: {} }] };
    const messages = [...hello, call, { role: 'user' as const, content: 'And next?' }];
    for (const [path, extra] of NAMED) {
      for (const failure of [await failureOf(manager().chat({ model: 'fake-chat', messages, ...extra })), await streamFailure(manager().stream({ model: 'fake-chat', messages, ...extra }))]) {
        expect(failure, path).toBeInstanceOf(ModelArgumentError);
        expect(failure, path).toMatchObject({ statusCode: 400 });
        expect((failure as ModelArgumentError).detail, path).toContain('c1');
      }
    }
    expect(fake.server.log).toEqual([]);
  });

  it('a stream that carries the provider\'s error event after its first text fails with the provider\'s 502 naming it, on every path', async () => {
    const chunk = (delta: unknown) => `data: ${JSON.stringify({ id: 'x', object: 'chat.completion.chunk', created: 1, model: 'fake-chat', choices: [{ index: 0, delta, finish_reason: null }] })}\n\n`;
    // The second reads like a lost connection ("socket"): it is still the provider's event.
    for (const message of ['overloaded mid stream', 'upstream socket terminated']) {
      const rawBody = `${chunk({ role: 'assistant', content: 'Hel' })}data: ${JSON.stringify({ error: { message, type: 'server_error' } })}\n\n`;
      for (const [path, extra] of NAMED) {
        fake.server.reset();
        fake.server.script('fake-chat', { rawBody });
        const failure = await streamFailure(manager().stream({ model: 'fake-chat', messages: hello, ...extra }));
        expect(failure, path).toBeInstanceOf(UpstreamError);
        expect(failure, path).toMatchObject({ statusCode: 502 });
        expect((failure as Error).message, path).toBe(`Upstream error in the stream: ${message}`); // the same words on every path
        expect(fake.server.log, path).toHaveLength(1); // text reached the caller: no retry, no fallback
      }
    }
  });
});

describe('ModelManager.embed', () => {
  it("a call whose vectors are compared with its model's own (sameModel) is not answered by a fallback: it fails with its model's error", async () => {
    const models = fakeModelManager(fake.server, {
      models: [
        { id: 'fake-embed-main', provider: 'fake', capabilities: ['embedding'], pricing: price('0.02', '0'), fallbacks: ['fake-embed-other'] },
        { id: 'fake-embed-other', provider: 'fake', capabilities: ['embedding'], pricing: price('0.02', '0') },
      ],
      records: fake.records,
    });
    const failing: ScriptedReply = { status: 500 };
    fake.server.script('fake-embed-main', failing, failing, failing);
    const failure = await models.embed({ model: 'fake-embed-main', values: ['x'], sameModel: true }).catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(UpstreamError);
    expect(fake.server.log.map((r) => [r.model, r.reply])).toEqual([['fake-embed-main', 500], ['fake-embed-main', 500], ['fake-embed-main', 500]]);
    // Without it, the fallback answers as for any call.
    fake.server.reset();
    fake.server.script('fake-embed-main', failing, failing, failing);
    expect(await models.embed({ model: 'fake-embed-main', values: ['x'] })).toMatchObject({ model: 'fake-embed-other' });
  });

  it('returns the deterministic embeddings with usage and cost', async () => {
    const result = await manager().embed({ model: 'fake-embed', values: ['hello world', 'keel'] });
    expect(vectorsOf(result)).toEqual([fakeEmbedding('hello world'), fakeEmbedding('keel')]);
    expect(result.usage.input).toBe(4); // ceil(11/4) + ceil(4/4)
    expect(result.cost).toBe('0.00000008'); // 4 × 0.02 / 10^6
    expect((await settled(1))[0]).toMatchObject({ operation: 'embed', status: 'success', cost: '0.00000008' });
  });

  it('asks each kind of provider for shorter vectors as its API takes them, and refuses an answer of another size', async () => {
    const pricing = price('0.02', '0');
    const m = fakeModelManager(fake.server, {
      models: [...CUSTOM_MODELS, { id: 'oa-embed', provider: 'openai', capabilities: ['embedding'], pricing }, { id: 'gem-embed', provider: 'gem', capabilities: ['embedding'], pricing }],
      records: fake.records,
      openaiKey: 'sk-test',
      providers: [{ id: 'gem', kind: 'google', base_url: fake.server.url, api_key: 'g-key' }],
    });
    for (const model of ['fake-embed', 'oa-embed']) {
      expect(vectorsOf(await m.embed({ model, values: ['hello'], dimensions: 3, user: 'u-9' }))).toEqual([fakeEmbedding('hello').slice(0, 3)]);
    }
    // Both speak OpenAI's API: asked for base64, as OpenAI's SDKs ask (see openai-wire.ts).
    expect(fake.server.log.map((r) => [r.path, r.body.dimensions, r.body.user, r.body.encoding_format])).toEqual([
      ['/v1/embeddings', 3, 'u-9', 'base64'],
      ['/v1/embeddings', 3, 'u-9', 'base64'],
    ]);
    // Google's API, as its outputDimensionality.
    expect(vectorsOf(await m.embed({ model: 'gem-embed', values: ['hello'], dimensions: 3 }))).toEqual([fakeEmbedding('hello').slice(0, 3)]);
    expect(fake.server.log[2]).toMatchObject({ path: '/v1/models/gem-embed:embedContent', body: { outputDimensionality: 3 } });

    // A server that ignores `dimensions`: an error naming both sizes, not retried, and no vectors handed on.
    fake.server.reset();
    const failure = await m.embed({ model: 'fake-embed', values: ['hello'], dimensions: 64 }).catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(ModelAnswerError);
    expect((failure as ModelAnswerError).message).toBe('Model fake-embed answered vectors of 8 dimensions where 64 were asked for: it may not support dimensions');
    expect(fake.server.log).toHaveLength(1);
  });

  it('hands each input its own vector: an answer listed out of order is put back by its index; one that does not fit the inputs is a 502, not vectors', async () => {
    const vector = (i: number) => [i, i];
    const answer = (data: { index?: number; embedding: number[] }[]): ScriptedReply => ({
      rawBody: JSON.stringify({ object: 'list', model: 'fake-embed', data: data.map((d) => ({ object: 'embedding', ...d })), usage: { prompt_tokens: 3, total_tokens: 3 } }),
    });
    const m = manager();
    const embed = () => m.embed({ model: 'fake-embed', values: ['a', 'b', 'c'] });
    fake.server.script('fake-embed', answer([2, 0, 1].map((index) => ({ index, embedding: vector(index) }))));
    expect(vectorsOf(await embed())).toEqual([vector(0), vector(1), vector(2)]);
    // Without numbers (some servers leave them out): the order listed.
    fake.server.script('fake-embed', answer([5, 6, 7].map((i) => ({ embedding: vector(i) }))));
    expect(vectorsOf(await embed())).toEqual([vector(5), vector(6), vector(7)]);
    const misfits: [string, { index?: number; embedding: number[] }[], RegExp][] = [
      ['too few', [{ index: 0, embedding: vector(0) }], /answered 1 vector for 3 inputs/],
      ['too many', [0, 1, 2, 3].map((index) => ({ index, embedding: vector(index) })), /answered 4 vectors for 3 inputs/],
      ['the same number twice', [0, 0, 1].map((index) => ({ index, embedding: vector(index) })), /numbered its vectors 0, 0, 1/],
      ['a number past the inputs', [0, 1, 1000].map((index) => ({ index, embedding: vector(index) })), /numbered its vectors 0, 1, 1000/],
      ['sizes that differ', [[0], [1, 1], [2, 2, 2]].map((embedding, index) => ({ index, embedding })), /vectors of 1 and 2 dimensions/],
    ];
    for (const [what, data, message] of misfits) {
      fake.server.script('fake-embed', answer(data));
      const failure = await embed().catch((e: unknown) => e);
      expect(failure, what).toBeInstanceOf(ModelAnswerError);
      expect((failure as ModelAnswerError).message, what).toMatch(message);
    }
  });

  it('reads vectors as base64 float32, or as numbers from a server that answers numbers whatever was asked; refuses an answer that is neither, or holds NaN', async () => {
    const m = manager();
    const values = ['hello world', 'keel'];
    const base64 = await m.embed({ model: 'fake-embed', values });
    expect(base64.embeddings[0]).toBeInstanceOf(Float32Array);
    expect(vectorsOf(base64)).toEqual(values.map((v) => fakeEmbedding(v)));
    fake.server.script('fake-embed', { floatsAlways: true });
    expect(vectorsOf(await m.embed({ model: 'fake-embed', values }))).toEqual(values.map((v) => fakeEmbedding(v)));
    expect(fake.server.log.map((r) => r.body.encoding_format)).toEqual(['base64', 'base64']);
    const f32 = (...numbers: number[]) => Buffer.from(Float32Array.from(numbers).buffer).toString('base64');
    const answer = (embedding: unknown): ScriptedReply => ({ rawBody: JSON.stringify({ object: 'list', data: [{ object: 'embedding', index: 0, embedding }], usage: { prompt_tokens: 1 } }) });
    // Padded, unpadded, or wrapped over lines as MIME encoders write it: the same vector.
    for (const text of [f32(0.5, -0.25), f32(0.5, -0.25).replace(/=+$/, ''), `${f32(0.5, -0.25).slice(0, 4)}\r\n${f32(0.5, -0.25).slice(4)}`]) {
      fake.server.script('fake-embed', answer(text));
      expect(vectorsOf(await m.embed({ model: 'fake-embed', values: ['x'] })), JSON.stringify(text)).toEqual([[0.5, -0.25]]);
    }
    const bad: [string, unknown][] = [
      ['bytes that are no float32s', Buffer.from([1, 2, 3, 4, 5, 6]).toString('base64')],
      ['NaN', f32(0.5, Number.NaN)],
      ['infinity', f32(Number.POSITIVE_INFINITY)],
      ['an object', { values: [1] }],
      ['a text among numbers', [0.5, '0.5']],
      // Node's decoder skips what is not base64 and stops at a `=` inside, with no error: values from elsewhere in the text.
      ['characters that are not base64', `${f32(0.5, -0.25).slice(0, 4)}!!!!${f32(0.5, -0.25).slice(4)}`],
      ['two padded pieces', `${f32(0.5)}${f32(0.25)}`],
      ['a length no base64 has', `${f32(0.5, -0.25).replace(/=+$/, '')}AA`],
      ['an empty vector', ''],
      ['an empty list', []],
    ];
    for (const [what, embedding] of bad) {
      fake.server.reset();
      fake.server.script('fake-embed', answer(embedding));
      const failure = await failureOf(m.embed({ model: 'fake-embed', values: ['x'] }));
      // An answer that cannot be read (UpstreamError) or that reads as no vectors (ModelAnswerError): 502 either way.
      expect(failure, what).toSatisfy((error) => error instanceof UpstreamError || error instanceof ModelAnswerError);
      expect(failure, what).toMatchObject({ statusCode: 502 });
      expect(fake.server.log, what).toHaveLength(1); // an answer, not retried
    }
  });

  it('believes no more input tokens than the inputs can hold (two a UTF-8 byte, and 64 each for marks and a server\'s prompt)', async () => {
    const answer = (tokens: number): ScriptedReply => ({
      rawBody: JSON.stringify({ object: 'list', data: [0, 1].map((index) => ({ object: 'embedding', index, embedding: [0.5, 0.5] })), usage: { prompt_tokens: tokens } }),
    });
    fake.server.script('fake-embed', answer(1e15), answer(3));
    const m = manager();
    const values = ['hello', 'héllo']; // 5 and 6 bytes
    expect((await m.embed({ model: 'fake-embed', values })).usage.input).toBe(2 * (5 + 6) + 2 * 64);
    expect((await m.embed({ model: 'fake-embed', values })).usage.input).toBe(3); // within it: as reported
  });

  it('asks a server that refuses base64 (a 400) for numbers, at once and from then on', async () => {
    const m = manager();
    fake.server.script('fake-embed', { status: 400, body: { error: { message: 'base64 encoding is not currently supported', type: 'invalid_request_error' } } });
    expect(vectorsOf(await m.embed({ model: 'fake-embed', values: ['hello'] }))).toEqual([fakeEmbedding('hello')]);
    expect(vectorsOf(await m.embed({ model: 'fake-embed', values: ['keel'] }))).toEqual([fakeEmbedding('keel')]);
    expect(fake.server.log.map((r) => [r.reply, r.body.encoding_format])).toEqual([
      [400, 'base64'],
      [200, 'float'],
      [200, 'float'],
    ]);
    // Another refusal (a 401, a 429) is not taken for that: refused as before, and base64 stays.
    fake.server.reset();
    const fresh = manager({ maxRetries: 0 });
    fake.server.script('fake-embed', { status: 401 });
    expect(await failureOf(fresh.embed({ model: 'fake-embed', values: ['x'] }))).toMatchObject({ statusCode: 502 });
    await fresh.embed({ model: 'fake-embed', values: ['x'] });
    expect(fake.server.log.map((r) => r.body.encoding_format)).toEqual(['base64', 'base64']);
  });

  it('sends an `openai` provider record without a base URL where OPENAI_BASE_URL says, as the SDK does', async () => {
    const m = fakeModelManager(fake.server, {
      models: [...CUSTOM_MODELS, { id: 'rec-embed', provider: 'oa-record', capabilities: ['embedding'], pricing: price('0.02', '0') }],
      records: fake.records,
      providers: [{ id: 'oa-record', kind: 'openai', api_key: 'sk-record', headers: { Authorization: 'Bearer sk-from-header' } }],
    });
    expect(vectorsOf(await m.embed({ model: 'rec-embed', values: ['hello'] }))).toEqual([fakeEmbedding('hello')]);
    expect(fake.server.log[0]).toMatchObject({ path: '/v1/embeddings', body: { model: 'rec-embed', encoding_format: 'base64' } });
    // A record's own Authorization header replaces the key's (one header, as the SDK sends it).
    expect(fake.server.log[0]!.headers.authorization).toBe('Bearer sk-from-header');
  });

  it('refuses a split answer whose requests miscount, though the total fits, naming the inputs; each request sent is charged the usage it reported, as a call of its own is', async () => {
    const m = manager({ maxRetries: 0 });
    const values = Array.from({ length: 2051 }, (_, i) => `t${i}`);
    const answer = (count: number, tokens: number): ScriptedReply => ({
      rawBody: JSON.stringify({ object: 'list', data: Array.from({ length: count }, (_, index) => ({ object: 'embedding', index, embedding: [index, 1] })), usage: { prompt_tokens: tokens } }),
    });
    // The first of the two requests miscounts: the second is never sent.
    fake.server.script('fake-embed', answer(2047, 5), answer(3, 1));
    const first = await failureOf(m.embed({ model: 'fake-embed', values }));
    expect(first).toBeInstanceOf(ModelAnswerError);
    expect((first as ModelAnswerError).message).toBe("Model fake-embed answered 2047 vectors for 2048 inputs (inputs 1 to 2048 of the call's 2051, sent in several requests)");
    expect(fake.server.log).toHaveLength(1);
    // What its provider reported, not its inputs' estimate: it answered, and billed that.
    expect(await settled(1)).toMatchObject([{ status: 'error', estimated: false, attempts: 1, tokens: { input: 5, output: 0 } }]);

    // The second miscounts: both requests as reported.
    fake.server.reset();
    fake.records.length = 0;
    fake.server.script('fake-embed', answer(2048, 5), answer(2, 1));
    const second = await failureOf(m.embed({ model: 'fake-embed', values }));
    expect((second as ModelAnswerError).message).toBe("Model fake-embed answered 2 vectors for 3 inputs (inputs 2049 to 2051 of the call's 2051, sent in several requests)");
    expect(await settled(1)).toMatchObject([{ status: 'error', estimated: false, attempts: 1, tokens: { input: 5 + 1, output: 0 } }]);

    // A call of one request that miscounts: what it reported too (as far as its inputs can hold: 3 × (2 × 2 bytes + 64)), not its estimate.
    const ownCalls: [reported: number, charged: number][] = [
      [7, 7],
      [1e15, 3 * (2 * 2 + 64)],
    ];
    for (const [reported, charged] of ownCalls) {
      fake.server.reset();
      fake.records.length = 0;
      fake.server.script('fake-embed', answer(2, reported));
      const own = await failureOf(m.embed({ model: 'fake-embed', values: values.slice(0, 3) }));
      expect((own as ModelAnswerError).message).toBe('Model fake-embed answered 2 vectors for 3 inputs');
      expect(await settled(1)).toMatchObject([{ status: 'error', estimated: false, attempts: 1, tokens: { input: charged, output: 0 } }]);
    }
  });

  it('sends more than 2,048 inputs in requests of 2,048 at most, and hands back every vector in input order with the usage of all', async () => {
    const values = Array.from({ length: 2049 + 7 }, (_, i) => `text ${i}`);
    const result = await manager().embed({ model: 'fake-embed', values });
    expect(fake.server.log.map((r) => (r.body.input as string[]).length)).toEqual([2048, 8]);
    expect(vectorsOf(result)).toEqual(values.map((v) => fakeEmbedding(v)));
    expect(result.usage.input).toBe(values.reduce((n, v) => n + Math.ceil(v.length / 4), 0));
  });

  it("a 200 whose connection drops after its headers is retried alike over the wire and through the SDK (Google's), each cut-off try charged its inputs' estimate", async () => {
    const pricing = price('0.02', '0');
    const m = fakeModelManager(fake.server, {
      models: [...CUSTOM_MODELS, { id: 'gem-embed', provider: 'gem', capabilities: ['embedding'], pricing }],
      records: fake.records,
      providers: [{ id: 'gem', kind: 'google', base_url: fake.server.url, api_key: 'g-key' }],
      overrides: { maxRetries: 1 },
    });
    const values = ['hello world', 'keel'];
    const dropped: ScriptedReply = { drop: { afterChunks: 0 } };
    let estimate: number | undefined;
    for (const model of ['fake-embed', 'gem-embed']) {
      fake.server.reset();
      fake.records.length = 0;
      fake.server.script(model, dropped);
      expect(vectorsOf(await m.embed({ model, values })), model).toEqual(values.map((v) => fakeEmbedding(v)));
      expect(fake.server.log.map((r) => r.reply), model).toEqual(['drop', 200]);
      // Every try dropped (the retry budget: one retry): the error, each try's inputs charged.
      fake.records.length = 0;
      fake.server.script(model, dropped, dropped);
      await expect(m.embed({ model, values }), model).rejects.toThrow(/Upstream connection error/);
      const [failed] = await settled(1);
      expect(failed, model).toMatchObject({ operation: 'embed', status: 'error', estimated: true, attempts: 2, tokens: { output: 0 } });
      estimate ??= failed!.tokens.input / 2;
      expect(estimate, model).toBeGreaterThan(0);
      expect(failed!.tokens.input, model).toBe(2 * estimate);
    }
    // The answered calls: the answer's usage (the wire's reports 4 tokens; Google's none: its inputs'
    // estimate) and the dropped try's estimate.
    fake.server.reset();
    fake.records.length = 0;
    for (const model of ['fake-embed', 'gem-embed']) {
      fake.server.script(model, dropped);
      await m.embed({ model, values });
    }
    const answered = await settled(2);
    expect(answered.map((r) => [r.model, r.status, r.estimated, r.attempts, r.tokens.input])).toEqual([
      ['fake-embed', 'success', true, 2, 4 + estimate!],
      ['gem-embed', 'success', true, 2, 2 * estimate!],
    ]);
  });

  it('an embeddings call sent in several requests that fails midway is charged what its requests were billed: those before as reported, the one that failed as a call of its own, not every input', async () => {
    const m = manager({ maxRetries: 0 });
    // Four requests: 2,048 inputs, 2,048, 2,048 and 5.
    const values = Array.from({ length: 3 * 2048 + 5 }, (_, i) => `input number ${i}`);
    const [first, second] = [values.slice(0, 2048), values.slice(2048, 4096)];
    /** What the fake server reports for `inputs`. */
    const reported = (inputs: string[]) => inputs.reduce((n, v) => n + Math.ceil(v.length / 4), 0);
    const dropped: ScriptedReply = { drop: { afterChunks: 0 } };
    // The second request's inputs in a call of their own, cut off after the 200's headers: charged their estimate.
    fake.server.script('fake-embed', dropped);
    await expect(m.embed({ model: 'fake-embed', values: second })).rejects.toThrow(/Upstream connection error/);
    const [alone] = await settled(1);
    expect(alone).toMatchObject({ status: 'error', estimated: true });

    // The first request answered, the second dropped after its headers, the others never sent.
    fake.server.reset();
    fake.records.length = 0;
    fake.server.script('fake-embed', {}, dropped);
    await expect(m.embed({ model: 'fake-embed', values })).rejects.toThrow(/Upstream connection error/);
    expect(fake.server.log.map((r) => [(r.body.input as string[]).length, r.reply])).toEqual([
      [2048, 200],
      [2048, 'drop'],
    ]);
    const [cutOff] = await settled(1);
    expect(cutOff).toMatchObject({ operation: 'embed', status: 'error', estimated: true, attempts: 1, tokens: { output: 0 } });
    expect(cutOff!.tokens.input).toBe(reported(first) + alone!.tokens.input);
    // Not the estimate of every input (the call's hold), as it was.
    expect(cutOff!.tokens.input).toBeLessThan(Math.ceil(estimateTextTokens(values.join(''))));

    // The second refused (a 500: not billed): the first as reported, nothing estimated.
    fake.server.reset();
    fake.records.length = 0;
    fake.server.script('fake-embed', {}, { status: 500 });
    await expect(m.embed({ model: 'fake-embed', values })).rejects.toThrow(/Upstream 500 error/);
    const [refused] = await settled(1);
    expect(refused).toMatchObject({ status: 'error', estimated: false, tokens: { input: reported(first) } });
  });

  it("sends a Google model's inputs past 100 in requests of 100 side by side; one refused midway is charged what the others were billed, each waited for; the caller gone, each one sent", async () => {
    const m = fakeModelManager(fake.server, {
      models: [...CUSTOM_MODELS, { id: 'gem-embed', provider: 'gem', capabilities: ['embedding'], pricing: price('0.02', '0') }],
      records: fake.records,
      providers: [{ id: 'gem', kind: 'google', base_url: fake.server.url, api_key: 'g-key' }],
      overrides: { maxRetries: 0 },
    });
    const values = Array.from({ length: 250 }, (_, i) => `input number ${i}`);
    /** A request's inputs as the fake server logged it, and their estimate (Google reports no usage). */
    const inputsOf = (r: LoggedRequest) => (r.body.requests as { content: { parts: { text: string }[] } }[]).map((one) => one.content.parts[0]!.text);
    const estimate = (inputs: string[]) => Math.ceil(estimateTextTokens(inputs.join('')));
    expect(vectorsOf(await m.embed({ model: 'gem-embed', values }))).toEqual(values.map((v) => fakeEmbedding(v)));
    expect(fake.server.log.map((r) => [r.path, inputsOf(r).length]).sort()).toEqual([
      ['/v1/models/gem-embed:batchEmbedContents', 100],
      ['/v1/models/gem-embed:batchEmbedContents', 100],
      ['/v1/models/gem-embed:batchEmbedContents', 50],
    ]);

    // One of the three refused (a 500: not billed), whichever reaches the server second: the other two answered, charged their inputs' estimate.
    fake.server.reset();
    fake.records.length = 0;
    fake.server.script('gem-embed', {}, { status: 500 }, {});
    await expect(m.embed({ model: 'gem-embed', values })).rejects.toThrow(/Upstream 500 error/);
    expect(fake.server.log.map((r) => [r.reply, r.completed, r.aborted]).sort()).toEqual([
      [200, true, false],
      [200, true, false],
      [500, true, false],
    ]);
    const answered = fake.server.log.filter((r) => r.reply === 200).map((r) => estimate(inputsOf(r)));
    expect(await settled(1)).toMatchObject([{ operation: 'embed', status: 'error', estimated: true, attempts: 1, tokens: { input: answered[0]! + answered[1]!, output: 0 } }]);

    // The caller gone while one hangs upstream, the others answered: each charged its estimate, the one cut off as a call of its own then is.
    fake.server.reset();
    fake.records.length = 0;
    fake.server.script('gem-embed', {}, { hang: true }, {});
    const controller = new AbortController();
    const gone = m.embed({ model: 'gem-embed', values, signal: controller.signal });
    await fake.server.waitFor((log) => log.length === 3 && log.filter((r) => r.completed).length === 2);
    controller.abort();
    expect(await failureOf(gone)).toBeInstanceOf(ModelCallAbortedError);
    const sent = fake.server.log.reduce((n, r) => n + estimate(inputsOf(r)), 0);
    expect(await settled(1)).toMatchObject([{ operation: 'embed', status: 'aborted', estimated: true, attempts: 1, tokens: { input: sent, output: 0 } }]);

    // A call of one request (3 inputs) answered with two vectors: a 502, charged as one answered in full is (its estimate: no usage reported).
    fake.server.reset();
    fake.records.length = 0;
    fake.server.script('gem-embed', { rawBody: JSON.stringify({ embeddings: [{ values: [0, 1] }, { values: [1, 1] }] }) });
    const own = await failureOf(m.embed({ model: 'gem-embed', values: values.slice(0, 3) }));
    expect(own).toMatchObject({ statusCode: 502, message: 'Model gem-embed answered 2 vectors for 3 inputs' });
    expect(fake.server.log.map((r) => [r.path, inputsOf(r).length])).toEqual([['/v1/models/gem-embed:batchEmbedContents', 3]]);
    expect(await settled(1)).toMatchObject([{ operation: 'embed', status: 'error', estimated: true, attempts: 1, tokens: { input: estimate(values.slice(0, 3)), output: 0 } }]);
  });

  it("a Google model's split call with a vector past float32's range in one request is charged each request's estimate, as a split call's other failures are, not the whole call's", async () => {
    const m = fakeModelManager(fake.server, {
      models: [...CUSTOM_MODELS, { id: 'gem-embed', provider: 'gem', capabilities: ['embedding'], pricing: price('0.02', '0') }],
      records: fake.records,
      providers: [{ id: 'gem', kind: 'google', base_url: fake.server.url, api_key: 'g-key' }],
      overrides: { maxRetries: 0 },
    });
    // Two requests of 100 inputs, each of 397 characters: 99.25 tokens, charged 100 as a call of its
    // own would be (200 in all), where the call's one estimate is 198.5, charged 199.
    const values = Array.from({ length: 200 }, (_, i) => (i % 100 === 0 ? 'a' : 'abcd'));
    const estimate = (inputs: string[]) => Math.ceil(estimateTextTokens(inputs.join('')));
    expect([estimate(values.slice(0, 100)) + estimate(values.slice(100)), estimate(values)]).toEqual([200, 199]);
    // One of the two answers 1e39 (a float32 infinity); Google reports no usage.
    const vectors = Array.from({ length: 100 }, (_, i) => ({ values: [i === 7 ? 1e39 : 0.5, 1] }));
    fake.server.script('gem-embed', {}, { rawBody: JSON.stringify({ embeddings: vectors }) });
    const failure = await failureOf(m.embed({ model: 'gem-embed', values }));
    expect(failure).toBeInstanceOf(ModelAnswerError);
    expect(failure).toMatchObject({ statusCode: 502 });
    expect(fake.server.log.map((r) => r.reply)).toEqual([200, 200]);
    expect(await settled(1)).toMatchObject([{ operation: 'embed', status: 'error', estimated: true, attempts: 1, tokens: { input: 200, output: 0 } }]);
    // The request at fault named, as a count that does not fit is.
    expect((failure as Error).message).toMatch(/^Model gem-embed answered a vector with a value that is not a finite float32 \(inputs (1 to 100|101 to 200) of the call's 200, sent in several requests\)$/);
  });

  it('a retried split call sends only the requests that did not answer, keeps the vectors of those that did, and charges each once (the wire and a Google model)', async () => {
    const m = fakeModelManager(fake.server, {
      models: [...CUSTOM_MODELS, { id: 'gem-embed', provider: 'gem', capabilities: ['embedding'], pricing: price('0.02', '0') }],
      records: fake.records,
      providers: [{ id: 'gem', kind: 'google', base_url: fake.server.url, api_key: 'g-key' }],
      overrides: { maxRetries: 1 },
    });
    const refused: ScriptedReply = { status: 500, headers: { 'retry-after': '0' } };
    // The wire: four requests (2,048 inputs, 2,048, 2,048 and 5), one after another; the second refused, then retried with those after it.
    const values = Array.from({ length: 3 * 2048 + 5 }, (_, i) => `input number ${i}`);
    /** What the fake server reports for `inputs`. */
    const reported = (inputs: string[]) => inputs.reduce((n, v) => n + Math.ceil(v.length / 4), 0);
    fake.server.script('fake-embed', {}, refused);
    const wired = await m.embed({ model: 'fake-embed', values });
    expect(vectorsOf(wired)).toEqual(values.map((v) => fakeEmbedding(v)));
    const firstInputs = (r: LoggedRequest) => [(r.body.input as string[])[0], (r.body.input as string[]).length, r.reply];
    expect(fake.server.log.map(firstInputs)).toEqual([
      ['input number 0', 2048, 200],
      ['input number 2048', 2048, 500],
      ['input number 2048', 2048, 200],
      ['input number 4096', 2048, 200],
      ['input number 6144', 5, 200],
    ]);
    // Every input once, as reported: the first request with the try it answered in, the others with the answer.
    expect(await settled(1)).toMatchObject([{ operation: 'embed', status: 'success', estimated: false, attempts: 2, tokens: { input: reported(values), output: 0 } }]);
    expect(wired.usage.input).toBe(reported(values.slice(2048)));

    // Google: three requests side by side (100, 100, 50), one refused; the retry sends it alone.
    fake.server.reset();
    fake.records.length = 0;
    const inputsOf = (r: LoggedRequest) => (r.body.requests as { content: { parts: { text: string }[] } }[]).map((one) => one.content.parts[0]!.text);
    const estimate = (inputs: string[]) => Math.ceil(estimateTextTokens(inputs.join('')));
    const few = values.slice(0, 250);
    fake.server.script('gem-embed', {}, refused, {});
    expect(vectorsOf(await m.embed({ model: 'gem-embed', values: few }))).toEqual(few.map((v) => fakeEmbedding(v)));
    expect(fake.server.log).toHaveLength(4);
    const [again] = fake.server.log.slice(3);
    expect(inputsOf(again!)).toEqual(inputsOf(fake.server.log.find((r) => r.reply === 500)!));
    const charged = fake.server.log.filter((r) => r.reply === 200).reduce((n, r) => n + estimate(inputsOf(r)), 0);
    expect(charged).toBe(estimate(few.slice(0, 100)) + estimate(few.slice(100, 200)) + estimate(few.slice(200)));
    expect(await settled(1)).toMatchObject([{ operation: 'embed', status: 'success', estimated: true, attempts: 2, tokens: { input: charged, output: 0 } }]);
  });

  it('a 2xx whose vectors cannot be read is charged the usage it reported, exact, alone or as one request of a split call', async () => {
    const m = manager({ maxRetries: 0 });
    const unreadable = (tokens: number): ScriptedReply => ({ rawBody: JSON.stringify({ object: 'list', data: [{ object: 'embedding', index: 0, embedding: 'not base64!' }], usage: { prompt_tokens: tokens } }) });
    fake.server.script('fake-embed', unreadable(3));
    const alone = await failureOf(m.embed({ model: 'fake-embed', values: ['x'] }));
    expect(alone).toMatchObject({ statusCode: 502 });
    expect(await settled(1)).toMatchObject([{ operation: 'embed', status: 'error', estimated: false, attempts: 1, tokens: { input: 3, output: 0 } }]);
    // Without usage: its estimate, as before.
    fake.server.reset();
    fake.records.length = 0;
    fake.server.script('fake-embed', { rawBody: JSON.stringify({ object: 'list', data: [{ object: 'embedding', index: 0, embedding: 'not base64!' }] }) });
    await failureOf(m.embed({ model: 'fake-embed', values: ['x'.repeat(400)] }));
    expect(await settled(1)).toMatchObject([{ status: 'error', estimated: true, tokens: { input: 100 } }]);

    // The second of four requests: the first as reported, the second at what it reported.
    fake.server.reset();
    fake.records.length = 0;
    const values = Array.from({ length: 3 * 2048 + 5 }, (_, i) => `input number ${i}`);
    const reported = (inputs: string[]) => inputs.reduce((n, v) => n + Math.ceil(v.length / 4), 0);
    fake.server.script('fake-embed', {}, unreadable(1234));
    expect(await failureOf(m.embed({ model: 'fake-embed', values }))).toMatchObject({ statusCode: 502 });
    expect(fake.server.log.map((r) => r.reply)).toEqual([200, 200]);
    expect(await settled(1)).toMatchObject([{ status: 'error', estimated: false, tokens: { input: reported(values.slice(0, 2048)) + 1234 } }]);
  });

  it('retries an embeddings 429', async () => {
    fake.server.script('fake-embed', { status: 429, headers: { 'retry-after': '0' } });
    const result = await manager().embed({ model: 'fake-embed', values: ['x'] });
    expect(result.embeddings).toHaveLength(1);
    expect(fake.server.requestsFor('fake-embed').map((r) => r.reply)).toEqual([429, 200]);
  });
});

describe('the output cap', () => {
  /** A meter that keeps the estimates it is asked to reserve; `holdsOutput`: its reservations hold credit by them (billing's, a key budget's). */
  const keeping = (estimates: CostEstimate[], holdsOutput = true): ModelManagerOptions['meter'] => ({
    reserve(estimate) {
      estimates.push(estimate);
      return { settle: () => {}, holdsOutput };
    },
  });

  it('a prompt outside ASCII is held by its bytes: 800 CJK characters reserve ~1,000 input tokens, not ~200', async () => {
    const estimates: CostEstimate[] = [];
    const m = manager({ meter: keeping(estimates) });
    await m.chat({ model: 'fake-backup', messages: [{ role: 'user', content: '数据'.repeat(400) }] });
    for await (const _ of m.stream({ model: 'fake-backup', messages: [{ role: 'user', content: '数据'.repeat(400) }] }));
    // 800 × 1¼ = 1,000, and the messages' JSON around them (some 40 ASCII characters).
    for (const estimate of estimates) {
      expect(estimate.input_tokens).toBeGreaterThanOrEqual(1_000);
      expect(estimate.input_tokens).toBeLessThan(1_020);
    }
    expect(estimates).toHaveLength(2);
  });

  it('a call without a maximum whose reservation holds credit sends upstream the output tokens its estimate assumed (chat and stream, every path)', async () => {
    const estimates: CostEstimate[] = [];
    // defaultMaxOutputTokens: 100 (the test manager's).
    const m = manager({ meter: keeping(estimates) });
    for (const extra of PATHS) {
      await m.chat({ model: 'fake-backup', messages: hello, ...extra });
      for await (const _ of m.stream({ model: 'fake-backup', messages: hello, ...extra }));
    }
    expect(fake.server.log.map((r) => r.body.max_tokens)).toEqual(Array(10).fill(100));
    expect(estimates.map((e) => e.max_output_tokens)).toEqual(Array(10).fill(100));
  });

  it('a call without a maximum whose reservation holds nothing (billing off, no key budget) sends none to an OpenAI-style provider, which answers as OpenAI does; its estimate still assumes the default (chat and stream, every path)', async () => {
    for (const meter of [undefined, keeping([], false)]) {
      fake.server.reset();
      const estimates: CostEstimate[] = [];
      const m = manager(meter ? { meter: { reserve: (e) => (estimates.push(e), meter.reserve(e)) } } : { meter: undefined });
      for (const extra of PATHS) {
        await m.chat({ model: 'fake-backup', messages: hello, ...extra });
        for await (const _ of m.stream({ model: 'fake-backup', messages: hello, ...extra }));
      }
      // A maximum the caller set is sent as it is.
      await m.chat({ model: 'fake-backup', messages: hello, maxOutputTokens: 7 });
      expect(fake.server.log.map((r) => r.body.max_tokens)).toEqual([...Array<undefined>(10).fill(undefined), 7]);
      for (const r of fake.server.log.slice(0, 10)) expect('max_tokens' in r.body).toBe(false);
      if (meter) expect(estimates.map((e) => e.max_output_tokens)).toEqual([...Array<number>(10).fill(100), 7]);
    }
    // Google's maximum is where its thinking budget is made room in: it is sent one whatever the meter (Anthropic requires one).
    fake.server.reset();
    const m = fakeModelManager(fake.server, {
      builtins,
      models: [...CUSTOM_MODELS, { id: 'gem-chat', provider: 'gem', capabilities: ['chat'], pricing: price('1', '1') }],
      records: fake.records,
      providers: [{ id: 'gem', kind: 'google', base_url: fake.server.url, api_key: 'gem-key' }],
      overrides: { meter: undefined },
    });
    await m.chat({ model: 'gem-chat', messages: hello });
    expect((fake.server.log[0]!.body.generationConfig as { maxOutputTokens?: number }).maxOutputTokens).toBe(100);
  });

  it('a model\'s own smaller limit wins over the default, model by model along the fallbacks; a maximum the caller set is sent as it is', async () => {
    const estimates: CostEstimate[] = [];
    const catalog = new ModelCatalog(builtins, [
      ...CUSTOM_MODELS,
      { id: 'fake-short', provider: 'fake', capabilities: ['chat', 'tools'], pricing: price('1', '4'), max_output_tokens: 40 },
      { id: 'fake-long', provider: 'fake', capabilities: ['chat'], pricing: price('1', '4'), max_output_tokens: 5_000, fallbacks: ['fake-short'] },
    ]);
    const m = manager({ catalog, maxRetries: 0, meter: keeping(estimates) });
    for (const extra of PATHS) await m.chat({ model: 'fake-short', messages: hello, ...extra });
    fake.server.script('fake-long', { status: 500 });
    await m.chat({ model: 'fake-long', messages: hello });
    await m.chat({ model: 'fake-short', messages: hello, maxOutputTokens: 500 });
    for await (const _ of m.stream({ model: 'fake-short', messages: hello, tools, maxOutputTokens: 500 }));
    expect(fake.server.log.map((r) => [r.model, r.body.max_tokens])).toEqual([
      ['fake-short', 40],
      ['fake-short', 40],
      ['fake-short', 40],
      ['fake-short', 40],
      ['fake-short', 40],
      ['fake-long', 100],
      ['fake-short', 40],
      ['fake-short', 500],
      ['fake-short', 500],
    ]);
    expect(estimates.map((e) => e.max_output_tokens)).toEqual([40, 40, 40, 40, 40, 100, 40, 500, 500]);
  });
});

describe('usage the provider did not report', () => {
  /** 380 characters: 95 output tokens at 4 characters a token. */
  const ANSWER = 'A long free answer '.repeat(20);

  it('a chat or stream answer without usage is charged from an estimate and marked estimated, on every path', async () => {
    const m = manager();
    const results = [];
    for (const extra of PATHS) {
      fake.server.script('fake-chat', { text: ANSWER, usage: null }, { text: ANSWER, usage: null });
      results.push(await m.chat({ model: 'fake-chat', messages: hello, ...extra }));
      const stream = m.stream({ model: 'fake-chat', messages: hello, ...extra });
      for await (const _ of stream);
      results.push(await stream.result);
    }
    expect(fake.server.log).toHaveLength(10);
    const metered = await settled(10);
    for (const [i, result] of results.entries()) {
      expect(result.text, `call ${i}`).toBe(ANSWER);
      expect(result.usage.output, `call ${i}`).toBe(95);
      expect(result.usage.input, `call ${i}`).toBeGreaterThan(0); // the prompt's estimate
      expect(Number(result.cost), `call ${i}`).toBeGreaterThan(0);
      expect(metered[i], `call ${i}`).toMatchObject({ status: 'success', estimated: true, tokens: result.usage, cost: result.cost });
    }
  });

  it('usage whose counts are no counts (negative, null, one left out) is unknown, not zero: charged from an estimate, on every path', async () => {
    const broken = [
      { prompt_tokens: -100_000, completion_tokens: -100_000 },
      { prompt_tokens: null, completion_tokens: null },
      { prompt_tokens: 12, completion_tokens: null },
      { prompt_tokens: 12 },
      { total_tokens: 57 },
      {},
    ];
    const m = manager();
    const results = [];
    for (const rawUsage of broken) {
      for (const extra of PATHS) {
        fake.server.script('fake-chat', { text: ANSWER, rawUsage }, { text: ANSWER, rawUsage });
        results.push(await m.chat({ model: 'fake-chat', messages: hello, ...extra }));
        const stream = m.stream({ model: 'fake-chat', messages: hello, ...extra });
        for await (const _ of stream);
        results.push(await stream.result);
      }
    }
    const metered = await settled(results.length);
    for (const [i, result] of results.entries()) {
      expect(result.usage.output, `call ${i}`).toBe(95);
      expect(result.usage.input, `call ${i}`).toBeGreaterThan(0);
      expect(metered[i], `call ${i}`).toMatchObject({ status: 'success', estimated: true, tokens: result.usage, cost: result.cost });
    }
  });

  it('tool calls without arguments are not free: each counts its name, on every path that takes tools', async () => {
    const calls = Array.from({ length: 20 }, (_, i) => ({ id: `call_${i}`, name: 'lookup', arguments: '' }));
    const m = manager();
    const results = [];
    for (const extra of [PATHS[2]!, PATHS[3]!, PATHS[4]!]) {
      fake.server.script('fake-chat', { toolCalls: calls, usage: null }, { toolCalls: calls, usage: null });
      results.push(await m.chat({ model: 'fake-chat', messages: hello, ...extra }));
      const stream = m.stream({ model: 'fake-chat', messages: hello, ...extra });
      for await (const _ of stream);
      results.push(await stream.result);
    }
    // 'lookup': 6 characters, 2 tokens at 4 a token; 20 calls.
    expect(results.map((r) => [r.toolCalls.length, r.usage.output])).toEqual(Array(6).fill([20, 40]));
    expect((await settled(6)).map((r) => [r.estimated, r.tokens.output])).toEqual(Array(6).fill([true, 40]));
  });

  it('a stream that keeps no answer (keepAnswer: false, as the gateway asks) returns none, and is still charged for what it streamed, on every path', async () => {
    const m = manager();
    for (const [i, extra] of PATHS.entries()) {
      fake.server.script('fake-chat', { chunks: [ANSWER.slice(0, 100), ANSWER.slice(100)], usage: null });
      const stream = m.stream({ model: 'fake-chat', messages: hello, keepAnswer: false, ...extra });
      let streamed = '';
      for await (const event of stream) if (event.type === 'text-delta') streamed += event.text;
      const result = await stream.result;
      expect(streamed, `path ${i}`).toBe(ANSWER);
      expect(result, `path ${i}`).toMatchObject({ text: '', responseMessages: [], usage: { output: 95 } });
    }
    expect((await settled(5)).map((r) => [r.estimated, r.tokens.output])).toEqual(Array(5).fill([true, 95]));
  });

  it('an answer outside ASCII is estimated by its bytes (1¼ tokens a CJK character, not ¼), on every path', async () => {
    // 60 characters of 3 UTF-8 bytes: 60 / 4 + 120 / 2 = 75 tokens (4 characters a token said 15).
    const cjk = '数据库的回答'.repeat(10);
    const m = manager();
    const results = [];
    for (const extra of PATHS) {
      fake.server.script('fake-chat', { text: cjk, usage: null }, { chunks: ['数据库的回答', '数据库的回答'.repeat(9)], usage: null });
      results.push(await m.chat({ model: 'fake-chat', messages: hello, ...extra }));
      const stream = m.stream({ model: 'fake-chat', messages: hello, ...extra });
      for await (const _ of stream);
      results.push(await stream.result);
    }
    expect(results.map((r) => r.usage.output)).toEqual(Array(10).fill(75));
    expect((await settled(10)).map((r) => r.tokens.output)).toEqual(Array(10).fill(75));
  });

  it('an embedding answer without usage is charged from the input\'s estimate, marked estimated', async () => {
    fake.server.script('fake-embed', { usage: null });
    const result = await manager().embed({ model: 'fake-embed', values: ['hello world', 'keel'] });
    expect(result.usage.input).toBe(4); // ceil(15 / 4)
    expect(result.cost).toBe('0.00000008');
    expect((await settled(1))[0]).toMatchObject({ operation: 'embed', status: 'success', estimated: true, cost: '0.00000008' });
  });

  it('usage the provider reported is not estimated, even when it is zero', async () => {
    fake.server.script('fake-chat', { text: ANSWER, usage: { prompt_tokens: 0, completion_tokens: 0 } });
    const result = await manager().chat({ model: 'fake-chat', messages: hello });
    expect(result).toMatchObject({ usage: { input: 0, output: 0 }, cost: '0' });
    expect((await settled(1))[0]).toMatchObject({ estimated: false, cost: '0' });
  });
});

describe('a model whose provider cannot be called falls to its fallbacks', () => {
  const pricing = price('1', '4');
  /** `down-*` models on providers that cannot be called as things stand, each falling back to fake-backup. */
  const catalog = () =>
    new ModelCatalog(builtins, [
      ...CUSTOM_MODELS,
      { id: 'down-disabled', provider: 'down', capabilities: ['chat', 'tools'], pricing, fallbacks: ['down-unreadable', 'fake-backup'] },
      { id: 'down-unreadable', provider: 'sealed', capabilities: ['chat', 'tools'], pricing, fallbacks: ['fake-backup'] },
      { id: 'down-embed', provider: 'down', capabilities: ['embedding'], pricing, fallbacks: ['fake-embed'] },
      { id: 'down-alone', provider: 'down', capabilities: ['chat'], pricing },
      { id: 'down-no-usable', provider: 'down', capabilities: ['chat'], pricing, fallbacks: ['down-unreadable'] },
      { id: 'gpt-4.1-mini', fallbacks: ['fake-backup'] },
      // Chats and embeds: its chat calls fall to fake-backup, its embeddings to fake-embed (rows from before fallbacks were checked).
      { id: 'down-both', provider: 'down', capabilities: ['chat', 'embedding'], pricing, fallbacks: ['fake-backup', 'fake-embed'] },
      // Its first fallback is a Google model, which refuses some conversations (refusal): those fall to fake-backup.
      { id: 'gem-chat', provider: 'gem', capabilities: ['chat', 'tools'], pricing: price('5', '5') },
      { id: 'down-picky', provider: 'down', capabilities: ['chat', 'tools'], pricing, fallbacks: ['gem-chat', 'fake-backup'] },
      // Its only usable fallback is the Google model: a call with an option Google does not take has none.
      { id: 'down-gem', provider: 'down', capabilities: ['chat', 'tools'], pricing, fallbacks: ['down-unreadable', 'gem-chat'], aliases: ['down-gem-latest'] },
    ]);
  const downManager = (overrides: Partial<ModelManagerOptions> = {}) =>
    fakeModelManager(fake.server, {
      builtins,
      models: [],
      records: fake.records,
      providers: [
        { id: 'down', kind: 'openai-compatible', base_url: fake.server.url, enabled: false },
        { id: 'sealed', kind: 'openai-compatible', base_url: fake.server.url, unreadable: ['api_key'] },
        { id: 'gem', kind: 'google', base_url: fake.server.url, api_key: 'gem-key' },
      ],
      overrides: { catalog: catalog(), ...overrides },
    });

  it('chat and stream on every path (disabled provider, unreadable secret, no credentials): the first usable fallback answers, metered as it', async () => {
    const m = downManager();
    let calls = 0;
    for (const model of ['down-disabled', 'down-unreadable', 'gpt-4.1-mini']) {
      for (const [name, extra] of NAMED) {
        fake.server.script('fake-backup', { text: 'backup here', usage: { prompt_tokens: 10, completion_tokens: 5 } }, { text: 'backup streamed', usage: { prompt_tokens: 10, completion_tokens: 5 } });
        expect(await m.chat({ model, messages: hello, ...extra }), `${model} ${name}`).toMatchObject({ text: 'backup here', model: 'fake-backup' });
        const stream = m.stream({ model, messages: hello, ...extra });
        let text = '';
        for await (const event of stream) if (event.type === 'text-delta') text += event.text;
        expect(text, `${model} ${name}`).toBe('backup streamed');
        expect((await stream.result).model).toBe('fake-backup');
        calls += 2;
      }
    }
    expect(fake.server.log.map((r) => r.model)).toEqual(Array(calls).fill('fake-backup'));
    // One row per call, the model that answered, priced as it (10 × 1 + 5 × 4 per million).
    const records = await settled(calls);
    expect(records).toHaveLength(calls);
    for (const record of records) expect(record).toMatchObject({ model: 'fake-backup', provider: 'fake', status: 'success', cost: '0.00003' });
  });

  it('embeddings too', async () => {
    const result = await downManager().embed({ model: 'down-embed', values: ['x'] });
    expect(result).toMatchObject({ model: 'fake-embed' });
    expect((await settled(1))[0]).toMatchObject({ model: 'fake-embed', status: 'success' });
  });

  it('the first reservation of such a call counts against the key\'s rate (not as a fallback)', async () => {
    const estimates: CostEstimate[] = [];
    const m = downManager({ meter: { reserve: (estimate) => (estimates.push(estimate), { settle: () => {} }) } });
    await m.chat({ model: 'down-disabled', messages: hello });
    expect(estimates.map((e) => [e.model, e.fallback])).toEqual([['fake-backup', false]]);
  });

  it('with no fallback that can answer, the error names what is missing, as before; nothing is sent or metered', async () => {
    const m = downManager();
    for (const model of ['down-alone', 'down-no-usable']) {
      const failure = await failureOf(m.chat({ model, messages: hello }));
      expect(failure).toBeInstanceOf(ProviderUnavailableError);
      expect(failure).toMatchObject({ statusCode: 503, message: 'Provider down is disabled' });
      expect(await streamFailure(m.stream({ model, messages: hello }))).toMatchObject({ statusCode: 503, message: 'Provider down is disabled' });
    }
    await expect(m.chat({ model: 'down-unreadable', messages: hello })).resolves.toMatchObject({ model: 'fake-backup' });
    await settled(1);
    // An embedding that must be of its own model's space (sameModel) has no fallback.
    await expect(m.embed({ model: 'down-embed', values: ['x'], sameModel: true })).rejects.toMatchObject({ statusCode: 503, message: 'Provider down is disabled' });
    fake.server.reset();
    fake.records.length = 0;
    expect(fake.server.log).toHaveLength(0);
    await new Promise((r) => setTimeout(r, 20));
    expect(fake.records).toHaveLength(0);
  });

  it('a request every usable fallback refuses (an option it does not take) gets the fallback\'s 400, said of the model asked for, not the primary\'s 503; nothing is sent or metered', async () => {
    const m = downManager();
    /** The refusal names the model the client asked for (`asked`), that its own provider was passed over (not why: the operator's), and which fallback refused what. */
    const refusedByFallback = (start: string, reason: string, asked = 'down-gem') =>
      `${start} model ${asked}: its provider cannot be called, and no fallback takes it (gem-chat, the first that could answer: ${reason})`;
    for (const [option, name] of [
      [{ logprobs: true }, 'logprobs'],
      [{ logitBias: { '50256': -100 } }, 'logit_bias'],
    ] as [Partial<ChatRequest>, string][]) {
      const refusal = { statusCode: 400, model: 'down-gem', option: name, detail: refusedByFallback(`${name} is not supported by`, 'its provider (google) does not take it') };
      const failure = await failureOf(m.chat({ model: 'down-gem', messages: hello, ...option }));
      expect(failure, name).toBeInstanceOf(ModelOptionError);
      expect(failure, name).toMatchObject(refusal);
      expect(await streamFailure(m.stream({ model: 'down-gem', messages: hello, ...option })), name).toMatchObject(refusal);
    }
    // A conversation the fallback refuses (Google: a system message after the first user message) too.
    const lateSystem: ChatRequest['messages'] = [...hello, { role: 'system', content: 'Answer briefly.' }];
    const valueRefused = await failureOf(m.chat({ model: 'down-gem', messages: lateSystem }));
    expect(valueRefused).toBeInstanceOf(ModelValueError);
    expect(valueRefused).toMatchObject({
      statusCode: 400,
      model: 'down-gem',
      param: 'messages[1]',
      detail: refusedByFallback('messages[1] cannot be sent to', 'its provider (google) takes system and developer messages only before the first user or assistant message'),
    });
    // Asked by an alias: said of the alias, the name the client sent.
    expect(await failureOf(m.chat({ model: 'down-gem-latest', messages: hello, logprobs: true }))).toMatchObject({
      statusCode: 400,
      model: 'down-gem-latest',
      detail: refusedByFallback('logprobs is not supported by', 'its provider (google) does not take it', 'down-gem-latest'),
    });
    // A fallback that is itself unavailable refuses nothing: 503 as before.
    expect(await failureOf(m.chat({ model: 'down-no-usable', messages: hello, logprobs: true }))).toMatchObject({ statusCode: 503, message: 'Provider down is disabled' });
    expect(fake.server.log).toHaveLength(0);
    await new Promise((r) => setTimeout(r, 20));
    expect(fake.records).toHaveLength(0);
  });

  it('its view says it is unavailable, and which fallback answers for it', () => {
    const m = downManager();
    expect(m.getModel('down-disabled')).toMatchObject({ available: false, unavailable_reason: 'Provider down is disabled' });
    expect(m.answersFor(m.getModel('down-disabled')!)).toBe('fake-backup');
    expect(m.answersFor(m.getModel('down-alone')!)).toBeUndefined();
    expect(m.answersFor(m.getModel('down-no-usable')!)).toBeUndefined();
    expect(m.answersFor(m.getModel('fake-backup')!)).toBe('fake-backup');
    // A disabled model's calls are refused (404) whatever its provider: nothing answers for it.
    const disabled = downManager({ catalog: new ModelCatalog(builtins, [...CUSTOM_MODELS, { id: 'fake-backup', enabled: false }, { id: 'fake-chat', enabled: false }]) });
    expect(disabled.answersFor(disabled.getModel('fake-backup')!)).toBeUndefined();
    expect(disabled.publicView(disabled.getModel('fake-chat')!).answered_by).toBeNull();
  });

  it('says a call is answered by the model the call goes to: per operation, and skipping a fallback its request would be refused by', async () => {
    const m = downManager();
    const both = m.getModel('down-both')!;
    // Each operation falls to a fallback that does it, as the call's chain does (not one that does both).
    expect(m.answersFor(both, { capability: 'chat' })).toBe('fake-backup');
    expect(m.answersFor(both, { capability: 'embedding' })).toBe('fake-embed');
    expect(m.answersFor(both)).toBe('fake-backup'); // its chat calls first: listed by /v1/models
    expect(m.publicView(both).answered_by).toBe('fake-backup');
    fake.server.script('fake-backup', { text: 'backup here', usage: { prompt_tokens: 10, completion_tokens: 5 } });
    expect(await m.chat({ model: 'down-both', messages: hello })).toMatchObject({ model: 'fake-backup' });
    expect(await m.embed({ model: 'down-both', values: ['x'] })).toMatchObject({ model: 'fake-embed' });
    // A conversation Google refuses (a system message after the first user message): the call skips gem-chat, and so does answersFor given the request.
    const picky = m.getModel('down-picky')!;
    const lateSystem: ChatRequest['messages'] = [...hello, { role: 'system', content: 'Answer briefly.' }];
    expect(m.answersFor(picky, { capability: 'chat' })).toBe('gem-chat');
    expect(m.answersFor(picky, { capability: 'chat', request: { messages: lateSystem } })).toBe('fake-backup');
    fake.server.script('fake-backup', { text: 'backup here', usage: { prompt_tokens: 10, completion_tokens: 5 } });
    expect(await m.chat({ model: 'down-picky', messages: lateSystem })).toMatchObject({ model: 'fake-backup' });
    expect(fake.server.log.map((r) => r.model)).toEqual(['fake-backup', 'fake-embed', 'fake-backup']);
    await settled(3);
  });
});

describe('a broken 200 is charged for its prompt (the provider billed it)', () => {
  const LIMIT = 64 * 1024;
  /** fake-chat's input price (2 per million) on the prompt's estimate, marked estimated. */
  const expectPromptCharged = (record: UsageRecord | undefined, label: string, pricePerMillion = 2) => {
    expect(record, label).toMatchObject({ status: 'error', estimated: true, tokens: { output: 0 } });
    expect(record!.tokens.input, label).toBeGreaterThan(0);
    expect(Number(record!.cost), label).toBeCloseTo((record!.tokens.input * pricePerMillion) / 1e6, 12);
  };

  it('a body that is no JSON (or no completion), chat on every path and stream', async () => {
    for (const [path, extra] of NAMED) {
      for (const rawBody of ['{"choices": [', '<html>Gateway</html>']) {
        fake.server.reset();
        fake.records = [];
        fake.server.script('fake-chat', { rawBody });
        const failure = await failureOf(manager().chat({ model: 'fake-chat', messages: hello, ...extra }));
        expect(failure, path).toMatchObject({ statusCode: 502 });
        expect(fake.server.log, path).toHaveLength(1);
        expectPromptCharged((await settled(1))[0], `${path} ${rawBody}`);
      }
    }
    for (const [path, extra] of NAMED) {
      fake.server.reset();
      fake.records = [];
      fake.server.script('fake-chat', { rawBody: 'data: {"choices": [\n\n' });
      expect(await streamFailure(manager().stream({ model: 'fake-chat', messages: hello, ...extra })), path).toMatchObject({ statusCode: 502 });
      expectPromptCharged((await settled(1))[0], `stream ${path}`);
    }
  });

  it('a body past MODEL_MAX_RESPONSE_BYTES, chat on every path and embeddings', async () => {
    for (const [path, extra] of NAMED) {
      fake.server.reset();
      fake.records = [];
      fake.server.script('fake-chat', { text: 'Hi', padBytes: 4 * LIMIT });
      const failure = await failureOf(manager({ maxResponseBytes: LIMIT }).chat({ model: 'fake-chat', messages: hello, ...extra }));
      expect(failure, path).toBeInstanceOf(ModelAnswerLimitError);
      expectPromptCharged((await settled(1))[0], path);
    }
    fake.server.reset();
    fake.records = [];
    fake.server.script('fake-embed', { padBytes: 64 * LIMIT });
    await failureOf(manager({ maxResponseBytes: LIMIT }).embed({ model: 'fake-embed', values: ['hello world, hello again'] }));
    expectPromptCharged((await settled(1))[0], 'embed', 0.02);
  });

  it('an error status with a broken or huge body stays free: the provider refused the call', async () => {
    fake.server.script('fake-chat', { status: 400, body: 'not json at all' });
    await failureOf(manager({ maxRetries: 0 }).chat({ model: 'fake-chat', messages: hello }));
    fake.server.script('fake-chat', { status: 400, padBytes: 4 * LIMIT });
    await failureOf(manager({ maxRetries: 0, maxResponseBytes: LIMIT }).chat({ model: 'fake-chat', messages: hello }));
    const records = await settled(2);
    expect(records.map((r) => [r.status, r.estimated, r.cost])).toEqual([
      ['error', false, '0'],
      ['error', false, '0'],
    ]);
  });
});

describe('a call timed out after its provider began answering is charged its prompt', () => {
  const expectPromptCharged = (record: UsageRecord | undefined, label: string) => {
    expect(record, label).toMatchObject({ model: 'fake-backup', status: 'error', estimated: true, tokens: { output: 0 } });
    expect(record!.tokens.input, label).toBeGreaterThan(0);
    expect(Number(record!.cost), label).toBeCloseTo((record!.tokens.input * 1) / 1e6, 12);
  };

  it('a 200 begun whose answer does not come in time (a body or stream trickling, then silent): estimated, the prompt priced as input (chat and stream, every path)', async () => {
    for (const [path, extra] of NAMED) {
      for (const stream of [false, true]) {
        fake.server.reset();
        fake.records = [];
        fake.server.script('fake-backup', { rawBody: stream ? 'data: {"choices": [' : '{"id": "chatcmpl-1", ', holdOpen: true });
        const request: ChatRequest = { model: 'fake-backup', messages: hello, timeoutMs: 300, interactive: true, ...extra };
        const failure = stream ? await streamFailure(manager({ maxRetries: 0 }).stream(request)) : await failureOf(manager({ maxRetries: 0 }).chat(request));
        expect(failure, `${path} ${stream}`).toBeInstanceOf(ModelTimeoutError);
        expectPromptCharged((await settled(1))[0], `${path} stream: ${stream}`);
      }
    }
  });

  it('stays charged however the model\'s tries end after it: a retry refused (400), or the caller gone during the wait', async () => {
    fake.server.script('fake-backup', { rawBody: '{"id": "chatcmpl-1", ', holdOpen: true }, { status: 400 });
    expect(await failureOf(manager({ maxRetries: 1, retryBaseDelayMs: 1 }).chat({ model: 'fake-backup', messages: hello, timeoutMs: 300 }))).toBeInstanceOf(UpstreamError);
    expect(fake.server.requestsFor('fake-backup')).toHaveLength(2);
    expectPromptCharged((await settled(1))[0], 'then a 400');

    fake.server.reset();
    fake.records = [];
    fake.server.script('fake-backup', { rawBody: '{"id": "chatcmpl-1", ', holdOpen: true });
    const caller = new AbortController();
    const call = failureOf(manager({ maxRetries: 1, retryBaseDelayMs: 2_000 }).chat({ model: 'fake-backup', messages: hello, timeoutMs: 300, signal: caller.signal }));
    setTimeout(() => caller.abort(), 800);
    await call;
    expect((await settled(1))[0]).toMatchObject({ status: 'aborted', estimated: true });
    expect(Number(fake.records[0]!.cost)).toBeGreaterThan(0);
  });

  it('a stream whose 2xx began and that reaches its total deadline (MODEL_STREAM_TIMEOUT_MS) is charged its prompt, as a silent chunk is (every path)', async () => {
    for (const [path, extra] of NAMED) {
      fake.server.reset();
      fake.records = [];
      fake.server.script('fake-backup', { rawBody: 'data: {"choices": [', holdOpen: true });
      const failure = await streamFailure(manager({ maxRetries: 0, streamTimeoutMs: 1_000 }).stream({ model: 'fake-backup', messages: hello, timeoutMs: 5_000, ...extra }));
      expect(failure, path).toBeInstanceOf(ModelAnswerLimitError);
      expectPromptCharged((await settled(1))[0], path);
    }
  });

  it('each try that timed out after its 2xx began is charged its prompt: two such tries then an answer, chat and stream on every path', async () => {
    for (const [path, extra] of NAMED) {
      for (const stream of [false, true]) {
        const label = `${path} stream: ${stream}`;
        fake.server.reset();
        fake.records = [];
        const prompts: number[] = [];
        const m = manager({
          maxRetries: 2,
          retryBaseDelayMs: 1,
          meter: {
            reserve: (estimate) => {
              prompts.push(estimate.input_tokens);
              return { settle: (record) => void fake.records.push(record) };
            },
          },
        });
        const silent: ScriptedReply = { rawBody: stream ? 'data: {"choices": [' : '{"id": "chatcmpl-1", ', holdOpen: true };
        fake.server.script('fake-backup', silent, silent, { text: 'At last', usage: { prompt_tokens: 10, completion_tokens: 2 } });
        const request: ChatRequest = { model: 'fake-backup', messages: hello, timeoutMs: 300, ...extra };
        if (stream) expect(await streamFailure(m.stream(request)), label).toBeUndefined();
        else expect((await m.chat(request)).text, label).toBe('At last');
        expect(fake.server.requestsFor('fake-backup'), label).toHaveLength(3);
        const record = (await settled(1))[0]!;
        expect(prompts, label).toHaveLength(1);
        const prompt = prompts[0]!;
        expect(prompt, label).toBeGreaterThan(0);
        // The answer's reported usage, and each silent try's prompt estimate.
        expect(record, label).toMatchObject({ status: 'success', attempts: 3, estimated: true, tokens: { input: 10 + 2 * prompt, output: 2 } });
        expect(Number(record.cost), label).toBeCloseTo(((10 + 2 * prompt) * 1 + 2 * 4) / 1e6, 12);
      }
    }
    // Every try timed out so: each is charged, none answered.
    fake.server.reset();
    fake.records = [];
    const silent: ScriptedReply = { rawBody: '{"id": "chatcmpl-1", ', holdOpen: true };
    fake.server.script('fake-backup', silent, silent);
    const failure = await failureOf(manager({ maxRetries: 1, retryBaseDelayMs: 1 }).chat({ model: 'fake-backup', messages: hello, timeoutMs: 300 }));
    expect(failure).toBeInstanceOf(ModelTimeoutError);
    const record = (await settled(1))[0]!;
    expect(record).toMatchObject({ status: 'error', attempts: 2, estimated: true, tokens: { output: 0 } });
    expect(Number(record.cost)).toBeCloseTo((record.tokens.input * 1) / 1e6, 12);
    fake.server.reset();
    fake.records = [];
    fake.server.script('fake-backup', silent);
    await failureOf(manager({ maxRetries: 0 }).chat({ model: 'fake-backup', messages: hello, timeoutMs: 300 }));
    expect(record.tokens.input).toBe(2 * (await settled(1))[0]!.tokens.input);
  });

  it('a try that times out before any answer began (no status yet) stays free, as before', async () => {
    fake.server.script('fake-chat', { hang: true });
    await failureOf(manager({ maxRetries: 0 }).chat({ model: 'fake-chat', messages: hello, timeoutMs: 300, interactive: true }));
    expect((await settled(1))[0]).toMatchObject({ model: 'fake-chat', status: 'error', estimated: false, cost: '0' });
  });
});
