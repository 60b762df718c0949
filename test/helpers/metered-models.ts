import { randomUUID } from 'node:crypto';

import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, beforeEach, expect } from 'vitest';

import type { UsageRow } from '../../src/crud/billing.js';
import { type CallContext, type ChatRequest, type CostEstimate, type UsageRecord, ZERO_USAGE } from '../../src/modules/ai-models/index.js';
import type { TestContext } from './app.js';
import { superuserHeaders } from './factories.js';
import { FakeModelServer } from './fake-model-server.js';
import { call } from './http.js';

/** Prices per million tokens of the models `addFakeModels` registers. */
export const FAKE_MODELS = {
  /** Odd prices, a cached-input price, no reasoning price (reasoning costs the output price). */
  precise: { input: '1.23', output: '4.56', cached: '0.123456' },
  /** Input free, 1 credit per output token: a call's worst case is exactly its max output tokens. */
  billed: { input: '0', output: '1000000' },
  /** An embedding model (`fake-embed`): the fake server's deterministic 8-dimension vectors. */
  embed: { input: '0.02', output: '0' },
} as const;

/**
 * A superuser adds an `openai-compatible` provider pointing at the fake server and the models
 * `fake-precise`, `fake-billed` and `fake-embed` priced as FAKE_MODELS says.
 */
export async function addFakeModels(app: FastifyInstance, admin: Record<string, string>, baseUrl: string): Promise<void> {
  const provider = await call(app, 'POST', '/providers', admin, { name: 'fake', kind: 'openai-compatible', base_url: baseUrl, api_key: 'sk-fake' });
  expect(provider.statusCode, provider.body).toBe(200);
  const precise = FAKE_MODELS.precise;
  const models = [
    {
      id: 'fake-precise',
      provider: 'fake',
      pricing: { input_cost_per_million_tokens: precise.input, output_cost_per_million_tokens: precise.output, cached_input_cost_per_million_tokens: precise.cached },
    },
    { id: 'fake-billed', provider: 'fake', pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: FAKE_MODELS.billed.output } },
    {
      id: 'fake-embed',
      provider: 'fake',
      capabilities: ['embedding'],
      pricing: { input_cost_per_million_tokens: FAKE_MODELS.embed.input, output_cost_per_million_tokens: FAKE_MODELS.embed.output },
    },
  ];
  for (const model of models) {
    const response = await call(app, 'POST', '/models', admin, model);
    expect(response.statusCode, response.body).toBe(200);
  }
}

/** A chat request as the gateway and the runner make it. */
export function chatRequest(model: string, context: CallContext, extra: Partial<ChatRequest> = {}): ChatRequest {
  return { model, messages: [{ role: 'user', content: 'Hello' }], context, ...extra };
}

/**
 * A suite's fake model server with `addFakeModels` registered on the suite's app: started before
 * the tests (then `onReady` gets it and the superuser's headers), its log reset before each test,
 * closed after them.
 */
export function useFakeModels(ctx: TestContext, onReady: (fake: FakeModelServer, admin: Record<string, string>) => void): void {
  let fake: FakeModelServer | undefined;
  beforeAll(async () => {
    fake = await FakeModelServer.start();
    const admin = await superuserHeaders(ctx.app);
    await addFakeModels(ctx.app, admin, fake.url);
    onReady(fake, admin);
  });
  afterAll(async () => {
    await fake?.close();
  });
  beforeEach(() => fake?.reset());
}

/** A usage record's row as the meter writes it (`created_at` also its start), `fields` over it. */
export function usageRowOf(ownerId: string, createdAt: string, fields: Partial<UsageRow> = {}): UsageRow {
  return {
    id: randomUUID(),
    created_at: createdAt,
    owner_id: ownerId,
    api_key_id: null,
    project_id: null,
    agent_id: null,
    run_id: null,
    model: 'm1',
    provider: 'fake',
    operation: 'chat',
    input_tokens: 10,
    cached_input_tokens: 0,
    cache_write_tokens: 0,
    output_tokens: 5,
    reasoning_tokens: 0,
    cost: '0.1',
    latency_ms: 5,
    time_to_first_token_ms: null,
    status: 'success',
    error: null,
    estimated: false,
    attempts: 1,
    started_at: createdAt,
    charge_key: true,
    ...fields,
  };
}

/** A successful call's usage record as the model manager settles it: `estimate`'s call, 5 output tokens, costing `cost`. */
export function usageRecordOf(estimate: CostEstimate, cost: string): UsageRecord {
  return {
    ...estimate,
    tokens: { ...ZERO_USAGE, output: 5 },
    estimated: false,
    cost,
    latency_ms: 1,
    time_to_first_token_ms: null,
    status: 'success',
    error: null,
    attempts: 1,
    started_at: new Date(),
  };
}
