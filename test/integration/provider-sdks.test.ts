/**
 * Anthropic's and Google's SDK packages are loaded on the first call to one of their models
 * (provider-sdks.ts), not at start. Each test has a loader of its own, so that its first call is a
 * first call whatever other files in this worker loaded before it.
 */
import { describe, expect, it } from 'vitest';

import { SDK_IMPORTERS, type SdkImporters,SdkLoader } from '../../src/modules/ai-models/provider-sdks.js';
import { type ProviderRecord, ProviderRegistry, ProviderUnavailableError } from '../../src/modules/ai-models/providers.js';
import type { ModelOverride } from '../../src/modules/ai-models/types.js';
import { eventually } from '../helpers/http.js';
import { fakeModelManager, useFakeManagerServer } from '../helpers/model-manager.js';

const pricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '2' };
const MODELS: ModelOverride[] = [
  { id: 'sdk-claude', provider: 'ant', capabilities: ['chat', 'tools', 'reasoning'], pricing, max_output_tokens: 8192 },
  { id: 'sdk-gemini', provider: 'gem', capabilities: ['chat', 'tools'], pricing },
  { id: 'sdk-gemini-embed', provider: 'gem', capabilities: ['embedding'], pricing },
  // An OpenAI-compatible model that falls back to the Claude one.
  { id: 'sdk-first', provider: 'fake', capabilities: ['chat'], pricing, fallbacks: ['sdk-claude'] },
  // A Claude model that falls back to an OpenAI-compatible one.
  { id: 'sdk-claude-first', provider: 'ant', capabilities: ['chat'], pricing, fallbacks: ['sdk-first'] },
  // On a provider whose kind a test changes while a call waits to try again.
  { id: 'sdk-swing', provider: 'swing', capabilities: ['chat'], pricing },
];
const hello = [{ role: 'user' as const, content: 'Hello' }];

const fake = useFakeManagerServer();

/** A loader whose imports are counted and, while `failing` holds a kind, fail as a missing package would. */
function countedLoader(): { loader: SdkLoader; imports: Record<string, number>; failing: Set<string> } {
  const imports: Record<string, number> = { anthropic: 0, google: 0 };
  const failing = new Set<string>();
  const wrap = <K extends keyof SdkImporters>(kind: K): SdkImporters[K] =>
    (async () => {
      imports[kind]! += 1;
      await new Promise((resolve) => setTimeout(resolve, 20)); // a load takes a while: calls meanwhile wait for it
      if (failing.has(kind)) throw new Error(`Cannot find package '@ai-sdk/${kind}' imported from /somewhere/dist/modules/ai-models/provider-sdks.js`);
      return SDK_IMPORTERS[kind]();
    }) as SdkImporters[K];
  return { loader: new SdkLoader({ anthropic: wrap('anthropic'), google: wrap('google') }), imports, failing };
}

const managerWith = (loader: SdkLoader, maxRetries = 0) =>
  fakeModelManager(fake.server, {
    models: MODELS,
    records: fake.records,
    providers: [
      { id: 'ant', kind: 'anthropic', base_url: fake.server.url, api_key: 'sk-ant-test' },
      { id: 'gem', kind: 'google', base_url: fake.server.url, api_key: 'g-key-test' },
      { id: 'swing', kind: 'openai-compatible', base_url: fake.server.url, api_key: 'swing-key' },
    ],
    sdks: loader,
    overrides: { maxRetries },
  });


describe('SDK packages loaded on first use', () => {
  it('a first call to an Anthropic or Google model loads its package once (calls meanwhile wait for that load) and answers as later calls do', async () => {
    const { loader, imports } = countedLoader();
    const m = managerWith(loader);
    expect(() => loader.get('anthropic')).toThrow(/before it was loaded/);

    // Three first calls at once: one import, three answers through Anthropic's API.
    const answers = await Promise.all([0, 1, 2].map(() => m.chat({ model: 'sdk-claude', messages: hello })));
    expect(answers.map((a) => a.text)).toEqual(Array(3).fill('Hello from the fake model.'));
    expect(fake.server.log.map((r) => r.path)).toEqual(Array(3).fill('/v1/messages'));
    // Thinking asked of it: its capabilities are read from the package (thinkingBudget) before the call is held.
    expect((await m.chat({ model: 'sdk-claude', messages: hello, reasoningEffort: 'low' })).text).toBe('Hello from the fake model.');
    expect(fake.server.log.at(-1)!.body.thinking).toMatchObject({ type: 'enabled' });
    expect(imports).toEqual({ anthropic: 1, google: 0 });

    // Google's first call a stream, then an embedding call.
    let streamed = '';
    for await (const event of m.stream({ model: 'sdk-gemini', messages: hello })) if (event.type === 'text-delta') streamed += event.text;
    expect(streamed).toBe('Hello from the fake model.');
    expect((await m.embed({ model: 'sdk-gemini-embed', values: ['hello'] })).embeddings).toHaveLength(1);
    expect(fake.server.log.slice(-2).map((r) => r.path)).toEqual(['/v1/models/sdk-gemini:streamGenerateContent', '/v1/models/sdk-gemini-embed:embedContent']);
    expect(imports).toEqual({ anthropic: 1, google: 1 });
    expect(loader.load('anthropic')).toBeUndefined();
    expect(loader.load('google')).toBeUndefined();
  });

  it('a package that cannot be loaded fails the call at once with a 503 naming the provider (not the import\'s words), sends nothing, and the next call loads it again', async () => {
    const { loader, imports, failing } = countedLoader();
    const m = managerWith(loader);
    failing.add('anthropic').add('google');

    const failure = await m.chat({ model: 'sdk-claude', messages: hello }).catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(ProviderUnavailableError);
    expect(failure).toMatchObject({ statusCode: 503, provider: 'ant', detail: 'Provider ant is unavailable: the SDK package of its kind (anthropic) could not be loaded' });
    expect(String((failure as Error).cause)).toMatch(/Cannot find package '@ai-sdk\/anthropic'/);
    let streamFailure: unknown;
    try {
      for await (const _ of m.stream({ model: 'sdk-gemini', messages: hello }));
    } catch (error) {
      streamFailure = error;
    }
    expect(streamFailure).toMatchObject({ statusCode: 503, detail: 'Provider gem is unavailable: the SDK package of its kind (google) could not be loaded' });
    expect(fake.server.log).toHaveLength(0);
    expect(fake.records).toHaveLength(0); // nothing held, nothing to settle

    // Not kept: once the package can be loaded, the next call loads it and answers.
    failing.clear();
    expect((await m.chat({ model: 'sdk-claude', messages: hello })).text).toBe('Hello from the fake model.');
    expect(imports).toEqual({ anthropic: 2, google: 1 });
  });

  it('a fallback whose package cannot be loaded is passed over, as one whose provider is not set up: the call fails with its own model\'s error', async () => {
    const { loader, failing } = countedLoader();
    const m = managerWith(loader);
    failing.add('anthropic');
    fake.server.script('sdk-first', { status: 500 });
    const failure = await m.chat({ model: 'sdk-first', messages: hello }).catch((e: unknown) => e);
    expect(failure).not.toBeInstanceOf(ProviderUnavailableError);
    expect(failure).toMatchObject({ statusCode: 502 });
    expect(fake.server.log.map((r) => r.model)).toEqual(['sdk-first']);

    // Loadable again: the same call falls back to Claude, which answers.
    failing.clear();
    fake.server.script('sdk-first', { status: 500 });
    const answered = await m.chat({ model: 'sdk-first', messages: hello });
    expect(answered).toMatchObject({ model: 'sdk-claude', text: 'Hello from the fake model.' });
  });

  it('a model whose package cannot be loaded falls to its fallback, which answers and is metered (chat and stream)', async () => {
    const { loader, failing } = countedLoader();
    const m = managerWith(loader);
    failing.add('anthropic');
    expect(await m.chat({ model: 'sdk-claude-first', messages: hello })).toMatchObject({ model: 'sdk-first', text: 'Hello from the fake model.' });
    expect((await m.stream({ model: 'sdk-claude-first', messages: hello }).result).model).toBe('sdk-first');
    expect(fake.server.log.map((r) => r.model)).toEqual(['sdk-first', 'sdk-first']);
    await eventually(async () => fake.records.length === 2);
    expect(fake.records.map((r) => [r.model, r.status])).toEqual([['sdk-first', 'success'], ['sdk-first', 'success']]);
  });

  it('a provider made an Anthropic one while a call to its model waits to try again: the try loads the package and is answered (not a 500)', async () => {
    const { loader, imports } = countedLoader();
    const m = managerWith(loader, 1);
    const registry = (m as unknown as { options: { providers: ProviderRegistry } }).options.providers;
    fake.server.script('sdk-swing', { status: 503, headers: { 'retry-after-ms': '300' } }, { text: 'Answered as Claude.' });
    const call = m.chat({ model: 'sdk-swing', messages: hello });
    await eventually(async () => fake.server.log.length === 1);
    // A superuser's change of its kind, while the call waits for its next try.
    registry.setRecords([...registry.current.values()].map((record): ProviderRecord => (record.id === 'swing' ? { ...record, kind: 'anthropic' } : record)));
    expect((await call).text).toBe('Answered as Claude.');
    expect(imports.anthropic).toBe(1);
  });

  it('says why a package could not be loaded to whoever the registry was given to tell (the log)', async () => {
    const { loader, failing } = countedLoader();
    failing.add('google');
    const told: [string, string, string][] = [];
    const registry = new ProviderRegistry(
      { OPENAI_API_KEY: undefined, OPENAI_BASE_URL: undefined, ANTHROPIC_API_KEY: undefined, GOOGLE_GENERATIVE_AI_API_KEY: undefined, MODEL_MAX_RESPONSE_BYTES: 1_000_000, SECRET_KEY: 'provider-test-secret-key-0123456789' },
      [{ id: 'gem', kind: 'google', base_url: fake.server.url, api_key: 'g-key-test' }],
      loader,
      (error, provider, kind) => told.push([String(error), provider, kind]),
    );
    await expect(registry.ready('gem')).rejects.toBeInstanceOf(ProviderUnavailableError);
    expect(told).toEqual([[expect.stringMatching(/Cannot find package '@ai-sdk\/google'/), 'gem', 'google']]);
  });
});
