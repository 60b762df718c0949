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

interface ParsedPrices {
  input: Decimal;
  cachedInput: Decimal;
  cacheWrite: Decimal;
  output: Decimal;
  reasoning: Decimal;
}

/** Prices parsed once per pricing object (a catalog entry's, or a tier's): parsing decimals was most of a call's cost arithmetic. */
const parsedPrices = new WeakMap<object, ParsedPrices>();

function parsed(p: Omit<ModelPricing, 'tiers'>): ParsedPrices {
  let prices = parsedPrices.get(p);
  if (!prices) {
    const input = new D(p.input_cost_per_million_tokens);
    const output = new D(p.output_cost_per_million_tokens);
    prices = {
      input,
      cachedInput: new D(p.cached_input_cost_per_million_tokens ?? input),
      cacheWrite: new D(p.cache_write_cost_per_million_tokens ?? input),
      output,
      reasoning: new D(p.reasoning_cost_per_million_tokens ?? output),
    };
    parsedPrices.set(p, prices);
  }
  return prices;
}

/** `tokens` × `price`, added to `sum` (tokens: a checked count; zero adds nothing). */
function addPriced(sum: Decimal, tokens: Decimal, price: Decimal): Decimal {
  return tokens.isZero() ? sum : sum.plus(tokens.times(price));
}

/**
 * Cost of `usage` at `pricing` as a decimal string (e.g. `"0.000002500000"` → `"0.0000025"`:
 * trailing zeros dropped, never exponent notation). `input` counts cached reads and cache writes,
 * `output` counts reasoning tokens, as the providers report them.
 */
export function computeCost(pricing: ModelPricing, usage: TokenUsage): string {
  const p = parsed(pricesFor(pricing, usage.input));
  const input = count(usage.input, 'input');
  const cached = count(usage.cached_input, 'cached input');
  const cacheWrite = count(usage.cache_write, 'cache write');
  const output = count(usage.output, 'output');
  const reasoning = count(usage.reasoning, 'reasoning');
  const uncached = D.max(input.minus(cached).minus(cacheWrite), 0);
  const textOutput = D.max(output.minus(reasoning), 0);

  let total = new D(0);
  total = addPriced(total, uncached, p.input);
  total = addPriced(total, cached, p.cachedInput);
  total = addPriced(total, cacheWrite, p.cacheWrite);
  total = addPriced(total, textOutput, p.output);
  total = addPriced(total, reasoning, p.reasoning);
  return formatCost(total.dividedBy(MILLION));
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
