/**
 * The OpenAI-compatible gateway (/v1) as the Vercel AI SDK sees it when an application points its
 * OpenAI providers at Keel: `@ai-sdk/openai-compatible` and `@ai-sdk/openai`'s chat and embedding
 * models, driven by `ai`'s generateText, streamText (with a tool round trip) and embedMany. The SDK
 * checks every answer and chunk against its own schemas: a field of the wrong shape fails the call.
 */
import type { AddressInfo } from 'node:net';

import { createOpenAI } from '@ai-sdk/openai';
import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { APICallError, embedMany, generateText, type LanguageModel, stepCountIs, streamText, tool } from 'ai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { z } from 'zod';

import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { fakeEmbedding, FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey } from '../helpers/http.js';

const ctx = useTestApp({ MODEL_MAX_RETRIES: '0', BILLING_ENABLED: 'true' });
const api = apiOf(ctx);

let fake: FakeModelServer;
let admin: Record<string, string>;
let user: TestUser;
let baseURL: string;
let apiKey: string;

/** The two ways an application reaches an OpenAI-compatible server through the AI SDK. */
const providers = {
  'openai-compatible': (key: string) => createOpenAICompatible({ name: 'keel', baseURL, apiKey: key, includeUsage: true }),
  openai: (key: string) => createOpenAI({ baseURL, apiKey: key }),
};
type ProviderName = keyof typeof providers;
const chatModel = (name: ProviderName, model: string, key = apiKey): LanguageModel => {
  const provider = providers[name](key);
  return 'chat' in provider ? provider.chat(model) : provider.chatModel(model);
};

/** The AI SDK's own error for a refused call, with the status and OpenAI error object Keel answered. */
async function refusal(call: Promise<unknown>): Promise<{ status: number | undefined; error: unknown }> {
  const error = await call.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(APICallError.isInstance(error), String(error)).toBe(true);
  const { statusCode, responseBody } = error as APICallError;
  return { status: statusCode, error: (JSON.parse(responseBody ?? '{}') as { error?: unknown }).error };
}

beforeAll(async () => {
  fake = await FakeModelServer.start();
  await ctx.app.listen({ host: '127.0.0.1', port: 0 });
  baseURL = `http://127.0.0.1:${(ctx.app.server.address() as AddressInfo).port}/v1`;
  admin = await superuserHeaders(ctx.app);
  expect((await api('POST', '/providers', admin, { name: 'fake', kind: 'openai-compatible', base_url: fake.url, api_key: 'sk-upstream' })).statusCode).toBe(200);
  const pricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '2' };
  for (const model of [
    { id: 'fake-chat', capabilities: ['chat', 'tools'] },
    { id: 'fake-embed', capabilities: ['embedding'] },
  ]) {
    expect((await api('POST', '/models', admin, { provider: 'fake', pricing, ...model })).statusCode).toBe(200);
  }
  user = await createUser(ctx.app);
  expect((await api('POST', '/billing/credits', admin, { user_id: user.user.id, amount: '1000', description: 'test credits' })).statusCode).toBe(200);
  apiKey = (await createKey(ctx.app, user)).key;
});
afterAll(async () => {
  await fake.close();
});
beforeEach(() => fake.reset());

describe.each(Object.keys(providers) as ProviderName[])('the AI SDK through %s', (name) => {
  it('generates text and reads the usage Keel reports, cached and reasoning tokens included', async () => {
    fake.script('fake-chat', { text: 'Four.', usage: { prompt_tokens: 12, completion_tokens: 5, cached_tokens: 2, reasoning_tokens: 3 } });
    const result = await generateText({ model: chatModel(name, 'fake-chat'), prompt: 'What is 2 + 2?', maxOutputTokens: 50, temperature: 0.5 });
    expect(result.text).toBe('Four.');
    expect(result.finishReason).toBe('stop');
    expect(result.usage).toMatchObject({ inputTokens: 12, outputTokens: 5, totalTokens: 17 });
    expect(result.usage.inputTokenDetails.cacheReadTokens).toBe(2);
    expect(result.usage.outputTokenDetails.reasoningTokens).toBe(3);
    const [sent] = fake.requestsFor('fake-chat');
    expect(sent?.body).toMatchObject({ messages: [{ role: 'user', content: 'What is 2 + 2?' }], temperature: 0.5 });
  });

  it('streams text deltas and the usage, then runs a tool and sends its result back in a second step', async () => {
    fake.script(
      'fake-chat',
      { toolCalls: [{ id: 'call_1', name: 'weather', arguments: '{"city":"Paris"}' }], usage: { prompt_tokens: 20, completion_tokens: 8 } },
      { chunks: ['Sunny ', 'in ', 'Paris.'], usage: { prompt_tokens: 30, completion_tokens: 3 } },
    );
    const cities: string[] = [];
    const result = streamText({
      model: chatModel(name, 'fake-chat'),
      prompt: 'Weather in Paris?',
      tools: {
        weather: tool({
          description: 'The weather in a city',
          inputSchema: z.object({ city: z.string() }),
          execute: async ({ city }) => {
            cities.push(city);
            return { city, sky: 'sunny' };
          },
        }),
      },
      stopWhen: stepCountIs(2),
    });
    const deltas: string[] = [];
    for await (const delta of result.textStream) deltas.push(delta);
    expect(deltas.join('')).toBe('Sunny in Paris.');
    expect(deltas.length).toBeGreaterThan(1);
    expect(cities).toEqual(['Paris']);
    expect(await result.totalUsage).toMatchObject({ inputTokens: 50, outputTokens: 11 });
    // The second request carried the tool call and its result, as OpenAI's messages.
    const second = fake.requestsFor('fake-chat')[1]?.body as { messages: { role: string; tool_call_id?: string; content?: unknown }[] };
    expect(second.messages.map((m) => m.role)).toEqual(['user', 'assistant', 'tool']);
    expect(second.messages[2]).toMatchObject({ tool_call_id: 'call_1' });
    expect(JSON.parse(String(second.messages[2]?.content))).toEqual({ city: 'Paris', sky: 'sunny' });
  });

  it('embeds many texts, each with its own vector', async () => {
    const { embeddings, usage } = await embedMany({ model: providers[name](apiKey).embeddingModel('fake-embed'), values: ['alpha', 'beta', 'gamma'] });
    expect(embeddings).toHaveLength(3);
    ['alpha', 'beta', 'gamma'].forEach((text, i) => embeddings[i]!.forEach((value, j) => expect(value).toBeCloseTo(fakeEmbedding(text)[j]!, 6)));
    expect(usage.tokens).toBeGreaterThan(0);
  });

  it('gets Keel\'s refusals as the SDK\'s APICallError with OpenAI\'s error object: a bad key, an unknown model, a bad parameter', async () => {
    const badKey = await refusal(generateText({ model: chatModel(name, 'fake-chat', 'sk-not-a-key'), prompt: 'Hi' }));
    expect(badKey).toMatchObject({ status: 401, error: { type: 'invalid_request_error', code: 'invalid_api_key' } });
    const unknown = await refusal(generateText({ model: chatModel(name, 'no-such-model'), prompt: 'Hi' }));
    expect(unknown).toMatchObject({ status: 404, error: { code: 'model_not_found' } });
    const hot = await refusal(generateText({ model: chatModel(name, 'fake-chat'), prompt: 'Hi', temperature: 5 }));
    expect(hot).toMatchObject({ status: 400, error: { param: 'temperature' } });
    expect(fake.log).toEqual([]);
  });
});

describe('credits through the AI SDK', () => {
  it('a call the balance cannot cover is refused with 402 insufficient_quota, and nothing reaches the model', async () => {
    const poor = await createUser(ctx.app);
    expect((await api('POST', '/billing/credits', admin, { user_id: poor.user.id, amount: '0.000001', description: 'a little' })).statusCode).toBe(200);
    const key = (await createKey(ctx.app, poor)).key;
    const refused = await refusal(generateText({ model: chatModel('openai-compatible', 'fake-chat', key), prompt: 'Hi', maxOutputTokens: 1000 }));
    expect(refused).toMatchObject({ status: 402, error: { code: 'insufficient_quota' } });
    expect(fake.log).toEqual([]);
  });
});
