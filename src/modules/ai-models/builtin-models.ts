/**
 * The built-in catalog, read from the pinned `@pydantic/genai-prices` package (its bundled data;
 * nothing is fetched at run time: `updatePrices` is never called). See docs/decisions.md.
 *
 * The package holds prices, context windows, names and the ids each entry matches. It has no
 * capabilities, so those follow from the model family (rules below, one place to adjust).
 */
import { findProvider, type ModelInfo as PriceModel, type ModelPrice, type TieredPrices } from '@pydantic/genai-prices';

import type { Capability, ModelInfo, ModelPricing } from './types.js';

interface ProviderRules {
  /** Families of current chat and embedding models. */
  include: RegExp;
  /** Entries that are not chat models (audio, images, realtime, search...). */
  exclude: RegExp;
  /** Chat models without reasoning (thinking) support. */
  noReasoning: RegExp;
  /** Chat models without image input. */
  noVision: RegExp;
}

const NON_CHAT = /audio|realtime|image|tts|transcribe|search|deep-research|computer|live|omni|moderation|instruct|:|(^|\.)ft-/;

const RULES: Record<'openai' | 'anthropic' | 'google', ProviderRules> = {
  openai: {
    // gpt-4o and gpt-4o-mini: still sold, and the models most clients and examples name.
    include: /^(gpt-4o|gpt-4\.1|gpt-[5-9]|o[3-9]|text-embedding-3-)/,
    exclude: NON_CHAT,
    noReasoning: /^gpt-4(o|\.1)/,
    noVision: /^o3-mini/,
  },
  anthropic: {
    include: /^claude-((opus|sonnet|haiku)-[4-9]|fable-)/,
    exclude: NON_CHAT,
    noReasoning: /^$/,
    noVision: /^$/,
  },
  google: {
    include: /^gemini-(2\.5|[3-9]|embedding-)/,
    exclude: NON_CHAT,
    noReasoning: /^$/,
    noVision: /^$/,
  },
};

const PRICE_KEYS = {
  input_mtok: 'input_cost_per_million_tokens',
  output_mtok: 'output_cost_per_million_tokens',
  cache_read_mtok: 'cached_input_cost_per_million_tokens',
  cache_write_mtok: 'cache_write_cost_per_million_tokens',
} as const satisfies Record<string, keyof ModelPricing>;

type FlatPricing = Omit<ModelPricing, 'tiers'>;

/** A JS number from the data as the decimal string it was written as (`0.075`, not 0.07499...). */
function decimalString(value: number): string {
  return String(value);
}

/** The price set in force `at` (entries with a start date replace earlier ones; clock-time ones are skipped). */
function currentPrices(prices: PriceModel['prices'], at: Date): ModelPrice | undefined {
  if (!Array.isArray(prices)) return prices;
  let chosen: ModelPrice | undefined;
  for (const entry of prices) {
    const constraint = entry.constraint as { type: string; start_date?: string } | undefined;
    if (!constraint) chosen ??= entry.prices;
    else if (constraint.type === 'start_date' && constraint.start_date && new Date(constraint.start_date) <= at) chosen = entry.prices;
  }
  return chosen;
}

/** The data holds tiers as plain `{base, tiers}` objects (TieredPrices' shape, not always instances). */
function isTiered(value: ModelPrice[string]): value is TieredPrices {
  return typeof value === 'object' && value !== null && 'base' in value && Array.isArray(value.tiers);
}

function priceAt(value: ModelPrice[string], inputTokens: number): number | undefined {
  if (isTiered(value)) {
    let price = value.base;
    for (const tier of value.tiers) if (inputTokens > tier.start) price = tier.price;
    return price;
  }
  return value;
}

function flatPricing(prices: ModelPrice, inputTokens: number): FlatPricing | undefined {
  const out: Partial<Record<keyof FlatPricing, string>> = {};
  for (const [from, to] of Object.entries(PRICE_KEYS)) {
    const price = priceAt(prices[from], inputTokens);
    if (price !== undefined) out[to] = decimalString(price);
  }
  return out.input_cost_per_million_tokens === undefined ? undefined : (out as FlatPricing);
}

function toPricing(prices: ModelPrice, embedding: boolean): ModelPricing | undefined {
  const base = flatPricing(prices, 0);
  if (!base) return undefined;
  if (embedding) return { ...base, output_cost_per_million_tokens: base.output_cost_per_million_tokens ?? '0' };
  if (base.output_cost_per_million_tokens === undefined) return undefined;
  const starts = new Set<number>();
  for (const value of Object.values(prices)) if (isTiered(value)) for (const t of value.tiers) starts.add(t.start);
  const tiers = [...starts]
    .sort((a, b) => a - b)
    .map((start) => ({ ...(flatPricing(prices, start + 1) as FlatPricing), above_input_tokens: start }));
  return tiers.length ? { ...base, tiers } : base;
}

/** Exact ids an entry answers to besides its own (its `equals` matches). */
function aliasesOf(model: PriceModel): string[] {
  const found = new Set<string>();
  const walk = (logic: unknown): void => {
    if (!logic || typeof logic !== 'object') return;
    const node = logic as Record<string, unknown>;
    if (typeof node.equals === 'string') found.add(node.equals);
    if (Array.isArray(node.or)) node.or.forEach(walk);
  };
  walk(model.match);
  found.delete(model.id);
  return [...found].sort();
}

/**
 * `gpt-5.4-mini` → family `gpt-*-mini`, version 5.4; `claude-opus-4-7` → `claude-opus-*`, 4.7;
 * `gpt-4o-mini` → `gpt-*-mini`, 4 (the `o` of `4o` is no family of its own: gpt-5-mini supersedes it).
 */
function familyAndVersion(id: string): { family: string; version: number } {
  const found = /(\d+(?:[.-]\d+)?)(o(?=-|$))?/.exec(id);
  if (!found) return { family: id, version: 0 };
  const version = Number(found[1]!.replace('-', '.'));
  return { family: id.replace(found[0], '*'), version: Number.isFinite(version) ? version : 0 };
}

function capabilitiesOf(id: string, rules: ProviderRules): Capability[] {
  if (id.includes('embedding')) return ['embedding'];
  const caps: Capability[] = ['chat', 'tools'];
  if (!rules.noVision.test(id)) caps.push('vision');
  if (!rules.noReasoning.test(id)) caps.push('reasoning');
  return caps;
}

/**
 * Current OpenAI, Anthropic and Google chat and embedding models with the prices in force `at`.
 * Priority follows the model generation; the newest non-preview model of each family is recommended.
 */
export function loadBuiltinModels(at: Date = new Date()): ModelInfo[] {
  const models: ModelInfo[] = [];
  for (const [providerId, rules] of Object.entries(RULES)) {
    const provider = findProvider({ providerId });
    if (!provider) throw new Error(`@pydantic/genai-prices has no provider ${providerId}`);
    for (const entry of provider.models) {
      if (entry.deprecated || !rules.include.test(entry.id) || rules.exclude.test(entry.id)) continue;
      const prices = currentPrices(entry.prices, at);
      const capabilities = capabilitiesOf(entry.id, rules);
      const pricing = prices && toPricing(prices, capabilities.includes('embedding'));
      if (!pricing) continue;
      const { version } = familyAndVersion(entry.id);
      models.push({
        id: entry.id,
        name: entry.name ?? entry.id,
        provider: providerId,
        aliases: aliasesOf(entry),
        context_window: entry.context_window ?? null,
        // The price data has no output limits: a superuser sets one where the default is too high.
        max_output_tokens: null,
        capabilities,
        pricing,
        enabled: true,
        recommended: false,
        priority: Math.round(version * 100),
        fallbacks: [],
      });
    }
  }
  markRecommended(models);
  return models;
}

function markRecommended(models: ModelInfo[]): void {
  const best = new Map<string, ModelInfo>();
  for (const model of models) {
    // Previews, specialised variants, and dated snapshots (`gpt-4o-2024-05-13`): never the one to pick.
    if (/preview|codex|pro\b|-pro$|\d{4}-\d{2}-\d{2}/.test(model.id)) continue;
    const key = `${model.provider}:${familyAndVersion(model.id).family}`;
    const current = best.get(key);
    if (!current || model.priority > current.priority) best.set(key, model);
  }
  for (const model of best.values()) model.recommended = true;
}
