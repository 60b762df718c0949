/**
 * Cost of a model call in decimal (decimal.js, never binary floats): tokens by kind × the model's
 * prices per million tokens. The result is exact up to 12 decimal places (the database's
 * `numeric(_, 12)`); nothing is rounded before that.
 */
import { Decimal } from 'decimal.js';

import type { ModelPricing, TokenUsage } from './types.js';

/** 40 significant digits: far more than 10^12 credits with 12 decimals ever need. */
const D = Decimal.clone({ precision: 40, rounding: Decimal.ROUND_HALF_UP });
const MILLION = new D(1_000_000);
export const COST_DECIMAL_PLACES = 12;

/** The flat prices that apply to a call with `inputTokens` input tokens (long-context tiers). */
export function pricesFor(pricing: ModelPricing, inputTokens: number): Omit<ModelPricing, 'tiers'> {
  let applied: Omit<ModelPricing, 'tiers'> = pricing;
  for (const tier of pricing.tiers ?? []) if (inputTokens > tier.above_input_tokens) applied = tier;
  return applied;
}

function count(value: number, kind: string): Decimal {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`${kind} tokens must be a non-negative integer, got ${value}`);
  return new D(value);
}

/**
 * Cost of `usage` at `pricing` as a decimal string (e.g. `"0.000002500000"` → `"0.0000025"`:
 * trailing zeros dropped, never exponent notation). `input` counts cached reads and cache writes,
 * `output` counts reasoning tokens, as the providers report them.
 */
export function computeCost(pricing: ModelPricing, usage: TokenUsage): string {
  const p = pricesFor(pricing, usage.input);
  const input = count(usage.input, 'input');
  const cached = count(usage.cached_input, 'cached input');
  const cacheWrite = count(usage.cache_write, 'cache write');
  const output = count(usage.output, 'output');
  const reasoning = count(usage.reasoning, 'reasoning');
  const uncached = D.max(input.minus(cached).minus(cacheWrite), 0);
  const textOutput = D.max(output.minus(reasoning), 0);

  const inputPrice = new D(p.input_cost_per_million_tokens);
  const outputPrice = new D(p.output_cost_per_million_tokens);
  const total = uncached
    .times(inputPrice)
    .plus(cached.times(new D(p.cached_input_cost_per_million_tokens ?? inputPrice)))
    .plus(cacheWrite.times(new D(p.cache_write_cost_per_million_tokens ?? inputPrice)))
    .plus(textOutput.times(outputPrice))
    .plus(reasoning.times(new D(p.reasoning_cost_per_million_tokens ?? outputPrice)))
    .dividedBy(MILLION);
  return formatCost(total);
}

/** Worst-case cost of a call before it runs: every input token uncached, `maxOutputTokens` out. */
export function estimateCost(pricing: ModelPricing, inputTokens: number, maxOutputTokens: number): string {
  return computeCost(pricing, { input: inputTokens, cached_input: 0, cache_write: 0, output: maxOutputTokens, reasoning: 0 });
}

/** Sums decimal strings exactly. */
export function addCosts(...costs: string[]): string {
  return formatCost(costs.reduce((sum, c) => sum.plus(new D(c)), new D(0)));
}

function formatCost(value: Decimal): string {
  return value.toDecimalPlaces(COST_DECIMAL_PLACES, Decimal.ROUND_HALF_UP).toFixed();
}
