import { afterAll, beforeAll, beforeEach } from 'vitest';

import { ModelCatalog } from '../../src/modules/ai-models/catalog.js';
import { ModelManager, type ModelManagerOptions, usageCallback, type UsageRecord } from '../../src/modules/ai-models/model-manager.js';
import type { SdkLoader } from '../../src/modules/ai-models/provider-sdks.js';
import { type ProviderRecord, ProviderRegistry } from '../../src/modules/ai-models/providers.js';
import type { ModelInfo, ModelOverride } from '../../src/modules/ai-models/types.js';
import { FakeModelServer } from './fake-model-server.js';

export interface FakeManagerOptions {
  /** Built-in models (none by default) and the custom models on the fake provider. */
  builtins?: ModelInfo[];
  models: ModelOverride[];
  /** Where the usage records go. */
  records: UsageRecord[];
  /** For the built-in `openai` provider (pointed at the fake server). */
  openaiKey?: string;
  /** Provider records besides `fake`. */
  providers?: ProviderRecord[];
  overrides?: Partial<ModelManagerOptions>;
  /** The SDK packages loaded on first use (default: the process's). */
  sdks?: SdkLoader;
}

/** The SECRET_KEY of a fakeModelManager's providers: what their hop mark is made of (core/hop.ts). */
export const MANAGER_SECRET_KEY = 'model-manager-test-secret-key-0123456789';

/**
 * A ModelManager whose provider `fake` (openai-compatible, key `fake-key`, header `x-team: keel`)
 * is the fake model server, metered into `records`, with short timeouts and retry waits for tests.
 */
export function fakeModelManager(server: FakeModelServer, options: FakeManagerOptions): ModelManager {
  // One limit for the manager and the SDK providers' fetch, as createModelManager gives both.
  const maxResponseBytes = options.overrides?.maxResponseBytes ?? 16_777_216;
  return new ModelManager({
    catalog: new ModelCatalog(options.builtins ?? [], options.models),
    providers: new ProviderRegistry(
      { OPENAI_API_KEY: options.openaiKey, OPENAI_BASE_URL: server.url, ANTHROPIC_API_KEY: undefined, GOOGLE_GENERATIVE_AI_API_KEY: undefined, MODEL_MAX_RESPONSE_BYTES: maxResponseBytes, SECRET_KEY: MANAGER_SECRET_KEY },
      [{ id: 'fake', kind: 'openai-compatible', base_url: server.url, api_key: 'fake-key', headers: { 'x-team': 'keel' } }, ...(options.providers ?? [])],
      options.sdks,
    ),
    meter: usageCallback((record) => {
      options.records.push(record);
    }),
    timeoutMs: 2_000,
    streamTimeoutMs: 600_000,
    maxResponseBytes,
    maxRetries: 2,
    retryMaxWaitMs: 1_000,
    retryBaseDelayMs: 10,
    defaultMaxOutputTokens: 100,
    ...options.overrides,
  });
}

/** A test file's fake model server, and where its managers' usage records go (`fakeModelManager`'s `records`). */
export interface FakeManagerServer {
  server: FakeModelServer;
  records: UsageRecord[];
}

/** Call at the top of a test file: the fake model server, started before its tests and closed after; before each test its script and log are reset and `records` is a new, empty array. */
export function useFakeManagerServer(): FakeManagerServer {
  const fake = { records: [] as UsageRecord[] } as FakeManagerServer;
  beforeAll(async () => {
    fake.server = await FakeModelServer.start();
  });
  afterAll(async () => {
    await fake.server?.close();
  });
  beforeEach(() => {
    fake.server.reset();
    fake.records = [];
  });
  return fake;
}
