/**
 * Cost of a model call in decimal (decimal.js, never binary floats): tokens by kind × the model's
 * prices per million tokens. The result is exact up to 12 decimal places (the database's
 * `numeric(_, 12)`); nothing is rounded before that. Prices are parsed with decimal.js once, and
 * a call's arithmetic is done on BigInts at the prices' scale (exact).
 */
import { Decimal } from 'decimal.js';

import type { ModelPricing, TokenUsage } from './types.js';

/** 40 significant digits: far more than 10^12 credits with 12 decimals ever need. */
const D = Decimal.clone({ precision: 40, rounding: Decimal.ROUND_HALF_UP });
export const COST_DECIMAL_PLACES = 12;

/** The flat prices that apply to a call with `inputTokens` input tokens (long-context tiers). */
export function pricesFor(pricing: ModelPricing, inputTokens: number): Omit<ModelPricing, 'tiers'> {
  let applied: Omit<ModelPricing, 'tiers'> = pricing;
  for (const tier of pricing.tiers ?? []) if (inputTokens > tier.above_input_tokens) applied = tier;
  return applied;
}

/**
 * The most tokens of one kind a call is recorded with (a usage record's counts are 32-bit): a
 * provider that reports more is broken, and its call is still recorded and charged, at this count.
 */
export const MAX_TOKEN_COUNT = 2_147_483_647;

/** A token count as `computeCost` takes it: a non-negative safe integer. */
const isTokenCount = (value: number): boolean => Number.isSafeInteger(value) && value >= 0;

/** A token count as a usage record holds it: a whole number from 0 to MAX_TOKEN_COUNT. */
const isRecordedCount = (value: number): boolean => isTokenCount(value) && value <= MAX_TOKEN_COUNT;

function count(value: number, kind: string): bigint {
  if (!isTokenCount(value)) throw new RangeError(`${kind} tokens must be a non-negative integer, got ${value}`);
  return BigInt(value);
}

/**
 * A pricing object's prices as integers at one scale (price = mantissa / 10^scale), parsed once:
 * a call's cost is then integer arithmetic on BigInts — exact, as decimal.js is, without the
 * digit arrays and intermediate Decimals it allocated per call (most of a call's garbage after
 * the HTTP layers; see bench/RESULTS.md).
 */
interface ParsedPrices {
  scale: number;
  input: bigint;
  cachedInput: bigint;
  cacheWrite: bigint;
  output: bigint;
  reasoning: bigint;
}

/** Prices parsed once per pricing object (a catalog entry's, or a tier's). */
const parsedPrices = new WeakMap<object, ParsedPrices>();

/** `value` × 10^scale as an integer (exact: scale ≥ its decimal places). */
const scaled = (value: Decimal, scale: number): bigint => BigInt(value.times(new D(10).pow(scale)).toFixed(0));

function parsed(p: Omit<ModelPricing, 'tiers'>): ParsedPrices {
  let prices = parsedPrices.get(p);
  if (!prices) {
    const input = new D(p.input_cost_per_million_tokens);
    const output = new D(p.output_cost_per_million_tokens);
    const all = [
      input,
      new D(p.cached_input_cost_per_million_tokens ?? input),
      new D(p.cache_write_cost_per_million_tokens ?? input),
      output,
      new D(p.reasoning_cost_per_million_tokens ?? output),
    ] as const;
    const scale = Math.max(...all.map((price) => price.decimalPlaces()));
    const [i, c, w, o, r] = all.map((v) => scaled(v, scale)) as [bigint, bigint, bigint, bigint, bigint];
    prices = { scale, input: i, cachedInput: c, cacheWrite: w, output: o, reasoning: r };
    parsedPrices.set(p, prices);
  }
  return prices;
}

const ZERO = BigInt(0);
const TEN = BigInt(10);
const max0 = (value: bigint): bigint => (value > ZERO ? value : ZERO);
const powers: bigint[] = [];
/** 10^n as a BigInt (cached). */
function pow10(n: number): bigint {
  for (let i = powers.length; i <= n; i++) powers.push(i === 0 ? BigInt(1) : powers[i - 1]! * TEN);
  return powers[n]!;
}

/**
 * `mantissa` / 10^scale rounded half up (away from zero) to COST_DECIMAL_PLACES, in plain notation
 * with trailing zeros dropped: what `Decimal#toDecimalPlaces(12, ROUND_HALF_UP).toFixed()` gives.
 */
function formatScaled(mantissa: bigint, scale: number): string {
  const negative = mantissa < ZERO;
  let m = negative ? -mantissa : mantissa;
  if (scale > COST_DECIMAL_PLACES) {
    const divisor = pow10(scale - COST_DECIMAL_PLACES);
    m = (m + divisor / BigInt(2)) / divisor;
    scale = COST_DECIMAL_PLACES;
  }
  if (m === ZERO) return '0';
  let digits = m.toString();
  // Trailing zeros of the fraction go (Decimal's normal form).
  while (scale > 0 && digits.endsWith('0')) {
    digits = digits.slice(0, -1);
    scale--;
  }
  if (scale > 0) {
    digits = digits.padStart(scale + 1, '0');
    digits = `${digits.slice(0, -scale)}.${digits.slice(-scale)}`;
  }
  return negative ? `-${digits}` : digits;
}

/** A token count a provider reported as one: a whole number from 0 to MAX_TOKEN_COUNT (2.5 → 3, −1 or NaN → 0, 9e15 → MAX_TOKEN_COUNT). */
const tokenCount = (value: number): number => (isRecordedCount(value) ? value : Number.isFinite(value) ? Math.min(Math.max(0, Math.round(value)), MAX_TOKEN_COUNT) : value === Infinity ? MAX_TOKEN_COUNT : 0);

/**
 * Usage as a provider reported it, with every count made one `computeCost` takes: what a provider
 * reports is outside input, and a count it refused (a fraction, a negative) made the call's
 * settlement throw, so the call was never recorded or charged and its credit stayed held. The same
 * object when it was valid.
 */
export function countableUsage(usage: TokenUsage): TokenUsage {
  const { input, cached_input, cache_write, output, reasoning } = usage;
  if (isRecordedCount(input) && isRecordedCount(cached_input) && isRecordedCount(cache_write) && isRecordedCount(output) && isRecordedCount(reasoning)) return usage;
  return { input: tokenCount(input), cached_input: tokenCount(cached_input), cache_write: tokenCount(cache_write), output: tokenCount(output), reasoning: tokenCount(reasoning) };
}

/** A count a provider may have meant: a number, finite, not below zero (a fraction is rounded, a huge one capped: `countableUsage`). */
const isReportedCount = (value: unknown): boolean => typeof value === 'number' && Number.isFinite(value) && value >= 0;

/**
 * Usage a provider reported, as a call is charged for it: `countableUsage`, or undefined when its
 * input or output count is missing or no count at all (null, negative, a string): such usage is
 * unknown, not zero, so the call is charged from an estimate as one that reported none — a
 * negative count clamped to 0 made the call free. Its details (cached, reasoning) only split
 * those counts: one that is no count is 0.
 */
export function chargeableUsage(usage: TokenUsage | undefined): TokenUsage | undefined {
  if (!usage || !isReportedCount(usage.input) || !isReportedCount(usage.output)) return undefined;
  return countableUsage(usage);
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
  const uncached = max0(input - cached - cacheWrite);
  const textOutput = max0(output - reasoning);
  const total = uncached * p.input + cached * p.cachedInput + cacheWrite * p.cacheWrite + textOutput * p.output + reasoning * p.reasoning;
  // Per million tokens: six more decimal places.
  return formatScaled(total, p.scale + 6);
}

/**
 * Worst-case cost of a call before it runs: every input token uncached, `maxOutputTokens` out, all
 * of them reasoning where reasoning is priced above the output (a model may think to its limit: a
 * hold priced as text fell short, and calls in parallel spent past the balance and a key's budget).
 */
export function estimateCost(pricing: ModelPricing, inputTokens: number, maxOutputTokens: number): string {
  const p = parsed(pricesFor(pricing, inputTokens));
  const reasoning = p.reasoning > p.output ? maxOutputTokens : 0;
  return computeCost(pricing, { input: inputTokens, cached_input: 0, cache_write: 0, output: maxOutputTokens, reasoning });
}

const PLAIN_COST = /^(-?)(\d+)(?:\.(\d{1,12}))?$/;

/**
 * A cost string (at most COST_DECIMAL_PLACES decimals, as every cost here is) as an integer count
 * of 10^-12 credits, for arithmetic on the hot path without Decimals; other notations go through
 * decimal.js (rounded to 12 places as costs are).
 */
export function costUnits(cost: string): bigint {
  const m = PLAIN_COST.exec(cost);
  if (!m) return BigInt(new D(cost).toDecimalPlaces(COST_DECIMAL_PLACES, Decimal.ROUND_HALF_UP).times(new D(10).pow(COST_DECIMAL_PLACES)).toFixed(0));
  const units = BigInt(m[2]!) * pow10(COST_DECIMAL_PLACES) + BigInt((m[3] ?? '').padEnd(COST_DECIMAL_PLACES, '0'));
  return m[1] ? -units : units;
}

/** `costUnits`' inverse: the cost string (trailing zeros dropped). */
export const unitsCost = (units: bigint): string => formatScaled(units, COST_DECIMAL_PLACES);

/** Sums decimal strings exactly. */
export function addCosts(...costs: string[]): string {
  return formatCost(costs.reduce((sum, c) => sum.plus(new D(c)), new D(0)));
}

function formatCost(value: Decimal): string {
  return value.toDecimalPlaces(COST_DECIMAL_PLACES, Decimal.ROUND_HALF_UP).toFixed();
}
