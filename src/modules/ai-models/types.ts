/** Shapes shared by the catalog, the cost calculator, the providers and the model manager. */

export const CAPABILITIES = ['chat', 'tools', 'vision', 'embedding', 'reasoning'] as const;
export type Capability = (typeof CAPABILITIES)[number];

/** What a fallback must do when its model does: the operations a call makes (the others describe the model). */
export const STAND_IN_FOR: readonly Capability[] = ['chat', 'embedding'];

/** Kinds of provider Keel can call; a provider record names one of these. */
export const PROVIDER_KINDS = ['openai', 'anthropic', 'google', 'openai-compatible'] as const;
export type ProviderKind = (typeof PROVIDER_KINDS)[number];

/**
 * Prices in USD (= credits) per million tokens, as decimal strings (never binary floats).
 * `cached_input` prices tokens read from the provider's prompt cache (default: the input price),
 * `cache_write` tokens written to it (default: the input price), `reasoning` reasoning tokens where
 * the provider prices them apart (default: the output price).
 */
export interface ModelPricing {
  input_cost_per_million_tokens: string;
  output_cost_per_million_tokens: string;
  cached_input_cost_per_million_tokens?: string;
  cache_write_cost_per_million_tokens?: string;
  reasoning_cost_per_million_tokens?: string;
  /**
   * Long-context tiers: when a call's input tokens exceed `above_input_tokens`, the whole call is
   * priced with the tier's prices (the providers' rule). Sorted ascending.
   */
  tiers?: readonly (Omit<ModelPricing, 'tiers'> & { above_input_tokens: number })[];
}

export interface ModelInfo {
  /** The id sent to the provider and shown to clients. */
  id: string;
  name: string;
  /** Provider id: `openai`, `anthropic`, `google`, or a provider record's id. */
  provider: string;
  aliases: string[];
  context_window: number | null;
  /** The most output tokens the model writes in one answer, when known: a call without a maximum of its own is held for (and, when its hold holds credit, sent) the smaller of it and MODEL_DEFAULT_MAX_OUTPUT_TOKENS. */
  max_output_tokens: number | null;
  capabilities: Capability[];
  pricing: ModelPricing;
  enabled: boolean;
  recommended: boolean;
  /** Higher first in listings. */
  priority: number;
  /** Models tried, in order, when this one still fails after its retries. */
  fallbacks: string[];
}

/** A change to a built-in model or a whole custom model, e.g. a database row. */
export type ModelOverride = Partial<Omit<ModelInfo, 'id'>> & {
  id: string;
  /** Removes a built-in model from the catalog (a custom one is simply not passed). */
  deleted?: boolean;
};

/** Tokens of one call by kind. `input` includes cached reads and writes; `output` includes reasoning. */
export interface TokenUsage {
  input: number;
  cached_input: number;
  cache_write: number;
  output: number;
  reasoning: number;
}

export const ZERO_USAGE: Readonly<TokenUsage> = Object.freeze({ input: 0, cached_input: 0, cache_write: 0, output: 0, reasoning: 0 });
