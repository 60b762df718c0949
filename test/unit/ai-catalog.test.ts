import { describe, expect, it } from 'vitest';

import { loadBuiltinModels } from '../../src/modules/ai-models/builtin-models.js';
import { ModelCatalog, ModelConfigError } from '../../src/modules/ai-models/catalog.js';
import { ProviderRegistry, ProviderUnavailableError } from '../../src/modules/ai-models/providers.js';

const builtins = loadBuiltinModels(new Date('2026-12-01T00:00:00Z'));

describe('built-in catalog (from @pydantic/genai-prices)', () => {
  it('holds current OpenAI, Anthropic and Google chat and embedding models with decimal prices', () => {
    const providers = new Set(builtins.map((m) => m.provider));
    expect([...providers].sort()).toEqual(['anthropic', 'google', 'openai']);
    for (const model of builtins) {
      expect(model.pricing.input_cost_per_million_tokens).toMatch(/^\d+(\.\d+)?$/);
      expect(model.pricing.output_cost_per_million_tokens).toMatch(/^\d+(\.\d+)?$/);
      expect(model.capabilities.length).toBeGreaterThan(0);
    }
    const gpt41mini = builtins.find((m) => m.id === 'gpt-4.1-mini');
    expect(gpt41mini).toMatchObject({
      provider: 'openai',
      context_window: 1_000_000,
      capabilities: ['chat', 'tools', 'vision'],
      pricing: { input_cost_per_million_tokens: '0.4', output_cost_per_million_tokens: '1.6', cached_input_cost_per_million_tokens: '0.1' },
    });
    expect(gpt41mini?.aliases).toContain('gpt-4.1-mini-2025-04-14');
    expect(builtins.find((m) => m.id === 'claude-haiku-4-5')?.capabilities).toEqual(['chat', 'tools', 'vision', 'reasoning']);
    expect(builtins.find((m) => m.id === 'text-embedding-3-small')).toMatchObject({
      capabilities: ['embedding'],
      pricing: { input_cost_per_million_tokens: '0.02' },
    });
    expect(builtins.some((m) => m.provider === 'google' && m.capabilities.includes('embedding'))).toBe(true);
    // Still sold, and the model most clients and examples name.
    expect(builtins.find((m) => m.id === 'gpt-4o-mini')).toMatchObject({
      provider: 'openai',
      capabilities: ['chat', 'tools', 'vision'],
      pricing: { input_cost_per_million_tokens: '0.15', output_cost_per_million_tokens: '0.6', cached_input_cost_per_million_tokens: '0.075' },
    });
    expect(builtins.find((m) => m.id === 'gpt-4o')?.aliases).toContain('gpt-4o-2024-08-06');
  });

  it('leaves out old, deprecated and non-chat models', () => {
    const ids = builtins.map((m) => m.id);
    for (const old of ['gpt-3.5-turbo', 'gpt-4', 'claude-2', 'claude-3-haiku', 'gemini-1.5-pro', 'gpt-realtime', 'gpt-image-1', 'whisper-1', 'gemini-2.5-flash-preview', 'gpt-4o-mini-2024-07-18.ft-', 'gpt-4o-audio-preview', 'gpt-4o-mini-tts']) {
      expect(ids).not.toContain(old);
    }
  });

  it('keeps long-context tiers and recommends the newest model of each family', () => {
    const sonnet45 = builtins.find((m) => m.id === 'claude-sonnet-4-5');
    expect(sonnet45?.pricing.tiers?.[0]).toMatchObject({ above_input_tokens: 200_000, input_cost_per_million_tokens: '6' });
    expect(builtins.filter((m) => m.recommended).length).toBeGreaterThan(2);
    expect(builtins.find((m) => m.id === 'gpt-4.1-mini')?.recommended).toBe(false);
    // gpt-4o-mini is of gpt-5-mini's family (the `o` is no family of its own); a dated snapshot is never recommended.
    for (const id of ['gpt-4o', 'gpt-4o-mini', 'gpt-4o-2024-05-13']) expect(builtins.find((m) => m.id === id)?.recommended, id).toBe(false);
  });
});

describe('ModelCatalog with overrides', () => {
  it('resolves ids and aliases, hides disabled models unless asked, and applies overrides', () => {
    const catalog = new ModelCatalog(builtins, [
      { id: 'gpt-4.1-mini', enabled: false },
      { id: 'gpt-4.1', pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '4' }, fallbacks: ['gpt-5-mini'] },
      { id: 'claude-opus-4-1', deleted: true },
      { id: 'llama3', provider: 'ollama', pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '0' }, aliases: ['local'] },
    ]);
    expect(catalog.getModel('gpt-4.1-mini-2025-04-14')?.id).toBe('gpt-4.1-mini');
    expect(catalog.listModels().map((m) => m.id)).not.toContain('gpt-4.1-mini');
    expect(catalog.listModels({ includeDisabled: true }).map((m) => m.id)).toContain('gpt-4.1-mini');
    expect(catalog.getModel('gpt-4.1')?.pricing.input_cost_per_million_tokens).toBe('1');
    expect(catalog.getModel('gpt-4.1')?.fallbacks).toEqual(['gpt-5-mini']);
    expect(catalog.getModel('claude-opus-4-1')).toBeUndefined();
    expect(catalog.getModel('local')).toMatchObject({ id: 'llama3', provider: 'ollama', capabilities: ['chat'], enabled: true });
    catalog.setOverrides([]);
    expect(catalog.getModel('llama3')).toBeUndefined();
    expect(catalog.getModel('gpt-4.1')?.pricing.input_cost_per_million_tokens).toBe('2');
  });

  it('refuses a custom model without provider or pricing', () => {
    expect(() => new ModelCatalog(builtins, [{ id: 'x', provider: 'ollama' }])).toThrow(ModelConfigError);
    expect(() => new ModelCatalog(builtins, [{ id: 'x', pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' } }])).toThrow(/provider/);
  });
});

describe('ProviderRegistry credentials', () => {
  const none = { OPENAI_API_KEY: undefined, OPENAI_BASE_URL: undefined, ANTHROPIC_API_KEY: undefined, GOOGLE_GENERATIVE_AI_API_KEY: undefined, MODEL_MAX_RESPONSE_BYTES: 16_777_216, SECRET_KEY: 'provider-test-secret-key-0123456789' };

  it('names the missing setting for each built-in provider, in the status and in the error', () => {
    const registry = new ProviderRegistry(none);
    expect(registry.status('openai')).toEqual({ available: false, reason: 'OPENAI_API_KEY is not set', missing: 'OPENAI_API_KEY' });
    expect(registry.status('anthropic').reason).toBe('ANTHROPIC_API_KEY is not set');
    expect(registry.status('google').reason).toBe('GOOGLE_GENERATIVE_AI_API_KEY is not set');
    expect(() => registry.languageModel('anthropic', 'claude-haiku-4-5')).toThrow(ProviderUnavailableError);
    try {
      registry.languageModel('google', 'gemini-2.5-flash');
    } catch (error) {
      expect(error).toMatchObject({ statusCode: 503, missing: 'GOOGLE_GENERATIVE_AI_API_KEY', detail: 'GOOGLE_GENERATIVE_AI_API_KEY is not set' });
    }
  });

  it('takes keys from settings and from provider records', () => {
    const registry = new ProviderRegistry({ ...none, OPENAI_API_KEY: 'sk-test' }, [
      { id: 'anthropic', kind: 'anthropic', api_key: 'sk-ant' },
      { id: 'ollama', kind: 'openai-compatible', base_url: 'http://127.0.0.1:11434/v1' },
      { id: 'broken', kind: 'openai-compatible' },
      { id: 'keyless', kind: 'openai' },
      { id: 'off', kind: 'openai-compatible', base_url: 'http://x', enabled: false },
    ]);
    expect(registry.status('openai').available).toBe(true);
    expect(registry.status('anthropic').available).toBe(true);
    expect(registry.status('ollama').available).toBe(true);
    expect(registry.status('broken')).toMatchObject({ available: false, missing: 'base_url' });
    expect(registry.status('keyless')).toMatchObject({ available: false, missing: 'api_key', reason: 'Provider keyless has no api_key' });
    expect(registry.status('off')).toMatchObject({ available: false, reason: 'Provider off is disabled' });
    expect(registry.status('nowhere')).toMatchObject({ available: false, reason: 'Provider nowhere is not configured' });
    expect(registry.languageModel('ollama', 'llama3')).toMatchObject({ modelId: 'llama3', provider: 'ollama.chat' });
  });
});

describe('createModelManager', () => {
  it('takes keys and limits from the settings', async () => {
    const { loadSettings } = await import('../../src/core/config.js');
    const { createModelManager } = await import('../../src/modules/ai-models/index.js');
    const settings = loadSettings({ DATA_DIR: '/tmp/keel-models-test', OPENAI_API_KEY: 'sk-x', MODEL_TIMEOUT_MS: '5000' });
    const manager = createModelManager(settings, { overrides: [{ id: 'gpt-4.1', enabled: false }] });
    expect(manager.getModel('gpt-4.1-mini')).toMatchObject({ available: true, unavailable_reason: null });
    expect(manager.getModel('claude-haiku-4-5')).toMatchObject({ available: false, unavailable_reason: 'ANTHROPIC_API_KEY is not set' });
    expect(manager.listAvailableModels().map((m) => m.id)).not.toContain('gpt-4.1');
    expect(() => loadSettings({ DATA_DIR: '/tmp/keel-models-test', MODEL_MAX_RETRIES: '11' })).toThrow(/MODEL_MAX_RETRIES/);
    expect(() => loadSettings({ DATA_DIR: '/tmp/keel-models-test', OPENAI_BASE_URL: 'ftp://x' })).toThrow(/OPENAI_BASE_URL/);
    // As a provider record's base_url: the API paths are appended to it, and a password in it would be quoted in errors.
    for (const [url, words] of [
      ['http://127.0.0.1:8000/v1?api-version=1', /OPENAI_BASE_URL.*no query or fragment/s],
      ['http://127.0.0.1:8000/v1#x', /OPENAI_BASE_URL.*no query or fragment/s],
      ['http://user:hunter2@127.0.0.1:8000/v1', /OPENAI_BASE_URL.*no user:password@/s],
    ] as const) {
      expect(() => loadSettings({ DATA_DIR: '/tmp/keel-models-test', OPENAI_BASE_URL: url })).toThrow(words);
      expect(() => loadSettings({ DATA_DIR: '/tmp/keel-models-test', OPENAI_BASE_URL: url })).not.toThrow(/hunter2/);
    }
    expect(loadSettings({ DATA_DIR: '/tmp/keel-models-test', OPENAI_BASE_URL: 'http://[::1]:8000/v1/' }).OPENAI_BASE_URL).toBe('http://[::1]:8000/v1/');
  });
});
