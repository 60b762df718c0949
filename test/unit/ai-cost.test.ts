import { Decimal } from 'decimal.js';
import { describe, expect, it } from 'vitest';

import { addCosts, computeCost, costUnits, estimateCost, unitsCost } from '../../src/modules/ai-models/cost.js';
import type { ModelPricing, TokenUsage } from '../../src/modules/ai-models/types.js';

const usage = (u: Partial<TokenUsage>): TokenUsage => ({ input: 0, cached_input: 0, cache_write: 0, output: 0, reasoning: 0, ...u });

// gpt-5-mini's published prices: 0.25 in, 2 out, 0.025 cached (USD per million tokens).
const withCache: ModelPricing = {
  input_cost_per_million_tokens: '0.25',
  output_cost_per_million_tokens: '2',
  cached_input_cost_per_million_tokens: '0.025',
};
// No cached-input price: cached tokens cost the input price.
const withoutCache: ModelPricing = { input_cost_per_million_tokens: '3', output_cost_per_million_tokens: '15' };

describe('computeCost', () => {
  it('prices one input token exactly (0.25 / 10^6)', () => {
    expect(computeCost(withCache, usage({ input: 1 }))).toBe('0.00000025');
  });

  it('prices one output token exactly (2 / 10^6)', () => {
    expect(computeCost(withCache, usage({ output: 1 }))).toBe('0.000002');
  });

  it('prices one cached token at the cached price: 0.025 / 10^6 = 0.000000025', () => {
    expect(computeCost(withCache, usage({ input: 1, cached_input: 1 }))).toBe('0.000000025');
  });

  it('prices 10^9 tokens of each kind without float error', () => {
    // 10^9 input → 1000 × 0.25 = 250; 10^9 output → 1000 × 2 = 2000.
    expect(computeCost(withCache, usage({ input: 1e9, output: 1e9 }))).toBe('2250');
    // 10^9 in of which 4×10^8 cached: 6×10^8 × 0.25/10^6 = 150, + 4×10^8 × 0.025/10^6 = 10.
    expect(computeCost(withCache, usage({ input: 1e9, cached_input: 4e8 }))).toBe('160');
  });

  it('a mixed call: 1234 in (1000 cached), 567 out (100 reasoning)', () => {
    // uncached 234 × 0.25 = 58.5; cached 1000 × 0.025 = 25; output 567 × 2 = 1134 → 1217.5 / 10^6.
    expect(computeCost(withCache, usage({ input: 1234, cached_input: 1000, output: 567, reasoning: 100 }))).toBe('0.0012175');
  });

  it('without a cached-input price, cached tokens cost the input price', () => {
    // 1000 in × 3 = 3000; 10 out × 15 = 150 → 3150 / 10^6, whatever part was cached.
    expect(computeCost(withoutCache, usage({ input: 1000, cached_input: 600, output: 10 }))).toBe('0.00315');
    expect(computeCost(withoutCache, usage({ input: 1000, output: 10 }))).toBe('0.00315');
  });

  it('prices reasoning tokens apart when the model has a reasoning price', () => {
    const pricing = { ...withoutCache, reasoning_cost_per_million_tokens: '60' };
    // 100 output of which 40 reasoning: 60 × 15 = 900, 40 × 60 = 2400 → 3300 / 10^6.
    expect(computeCost(pricing, usage({ output: 100, reasoning: 40 }))).toBe('0.0033');
  });

  it('prices cache writes at their own price', () => {
    const pricing = { ...withoutCache, cache_write_cost_per_million_tokens: '3.75' };
    // 1000 in of which 200 written: 800 × 3 = 2400, 200 × 3.75 = 750 → 3150 / 10^6.
    expect(computeCost(pricing, usage({ input: 1000, cache_write: 200 }))).toBe('0.00315');
  });

  it('applies a long-context tier to the whole call above its threshold', () => {
    const pricing: ModelPricing = {
      ...withoutCache,
      tiers: [{ input_cost_per_million_tokens: '6', output_cost_per_million_tokens: '22.5', above_input_tokens: 200_000 }],
    };
    expect(computeCost(pricing, usage({ input: 200_000, output: 1000 }))).toBe('0.615'); // 0.6 + 0.015
    expect(computeCost(pricing, usage({ input: 200_001, output: 1000 }))).toBe('1.222506'); // 1.200006 + 0.0225
  });

  it('keeps 12 decimal places and rounds only beyond them', () => {
    const tiny: ModelPricing = { input_cost_per_million_tokens: '0.0000001', output_cost_per_million_tokens: '0.00000123456789' };
    // 1 input × 0.0000001 / 10^6 = 10^-13: below the 12th place.
    expect(computeCost(tiny, usage({ input: 1 }))).toBe('0');
    // 1 output × 0.00000123456789 / 10^6 = 1.23456789e-12 → 0.000000000001 at 12 places.
    expect(computeCost(tiny, usage({ output: 1 }))).toBe('0.000000000001');
    // 10^6 output → 0.00000123456789, 14 places, kept to 12: 0.000001234568.
    expect(computeCost(tiny, usage({ output: 1e6 }))).toBe('0.000001234568');
  });

  it('zero usage costs zero', () => {
    expect(computeCost(withCache, usage({}))).toBe('0');
  });

  it('refuses negative or fractional token counts', () => {
    expect(() => computeCost(withCache, usage({ input: -1 }))).toThrow(/input tokens/);
    expect(() => computeCost(withCache, usage({ output: 1.5 }))).toThrow(/output tokens/);
  });
});

describe('estimateCost and addCosts', () => {
  it('estimates the worst case: every input token uncached plus the maximum output', () => {
    // 1000 × 0.25 + 4096 × 2 = 250 + 8192 = 8442 / 10^6.
    expect(estimateCost(withCache, 1000, 4096)).toBe('0.008442');
  });

  it('prices the maximum output as reasoning where reasoning costs more: a model may spend all of it thinking', () => {
    const thinking: ModelPricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '2', reasoning_cost_per_million_tokens: '3' };
    // 1000 × 1 + 100 × 3 = 1300 / 10^6; what such a call can cost, reported in full.
    expect(estimateCost(thinking, 1000, 100)).toBe('0.0013');
    expect(computeCost(thinking, { input: 1000, cached_input: 0, cache_write: 0, output: 100, reasoning: 100 })).toBe('0.0013');
    // Reasoning at or below the output's price: the output's.
    expect(estimateCost({ ...thinking, reasoning_cost_per_million_tokens: '1' }, 1000, 100)).toBe('0.0012');
  });

  it('adds decimal strings exactly (0.1 + 0.2 = 0.3)', () => {
    expect(addCosts('0.1', '0.2')).toBe('0.3');
    expect(addCosts('0.000000000001', '0.000000000002')).toBe('0.000000000003');
  });
});

describe('integer arithmetic against decimal.js', () => {
  // The reference: the formula in decimal.js, as computeCost did it before it used BigInts.
  const D = Decimal.clone({ precision: 40, rounding: Decimal.ROUND_HALF_UP });
  function reference(p: ModelPricing, u: TokenUsage): string {
    const input = new D(p.input_cost_per_million_tokens);
    const output = new D(p.output_cost_per_million_tokens);
    const uncached = D.max(new D(u.input).minus(u.cached_input).minus(u.cache_write), 0);
    const text = D.max(new D(u.output).minus(u.reasoning), 0);
    const total = uncached
      .times(input)
      .plus(new D(u.cached_input).times(p.cached_input_cost_per_million_tokens ?? input))
      .plus(new D(u.cache_write).times(p.cache_write_cost_per_million_tokens ?? input))
      .plus(text.times(output))
      .plus(new D(u.reasoning).times(p.reasoning_cost_per_million_tokens ?? output));
    return total.dividedBy(1_000_000).toDecimalPlaces(12, Decimal.ROUND_HALF_UP).toFixed();
  }

  it('gives the same strings for random prices and counts (rounding, half up, exponent-notation prices)', () => {
    let seed = 7;
    const rand = (n: number) => {
      seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31;
      return seed % n;
    };
    const price = () => ['0', '1e-7', '0.0000005', '2.5', '15', '0.075', '1.23456789012345', '60', '3.75', '0.00000123456789'][rand(10)]!;
    const tokens = () => [0, 1, 7, 999, 123_456, 1e9, 2 ** 53 - 1][rand(7)]!;
    for (let i = 0; i < 2_000; i++) {
      const pricing: ModelPricing = {
        input_cost_per_million_tokens: price(),
        output_cost_per_million_tokens: price(),
        ...(rand(2) ? { cached_input_cost_per_million_tokens: price() } : {}),
        ...(rand(2) ? { cache_write_cost_per_million_tokens: price() } : {}),
        ...(rand(2) ? { reasoning_cost_per_million_tokens: price() } : {}),
      };
      const input = tokens();
      const output = tokens();
      const u = usage({ input, output, cached_input: Math.min(input, tokens()), reasoning: Math.min(output, tokens()) });
      expect(computeCost(pricing, u), JSON.stringify({ pricing, u })).toBe(reference(pricing, u));
    }
  });

  it('rounds half up at the 12th place', () => {
    // 5 × 10^-13 per token: half a unit of the 12th place rounds up; 4 × 10^-13 rounds down.
    expect(computeCost({ input_cost_per_million_tokens: '0.0000005', output_cost_per_million_tokens: '0.0000004' }, usage({ input: 1 }))).toBe('0.000000000001');
    expect(computeCost({ input_cost_per_million_tokens: '0.0000005', output_cost_per_million_tokens: '0.0000004' }, usage({ output: 1 }))).toBe('0');
  });

  it('costUnits and unitsCost convert a cost to 10^-12 credits and back', () => {
    expect(costUnits('0.0000025')).toBe(BigInt(2_500_000));
    expect(costUnits('12')).toBe(BigInt(12) * BigInt(10) ** BigInt(12));
    expect(costUnits('-0.000000000001')).toBe(BigInt(-1));
    expect(costUnits('1e-6')).toBe(BigInt(1_000_000));
    for (const cost of ['0', '0.0000025', '1234.5', '0.000000000001', '-3.25', '999999999.999999999999']) expect(unitsCost(costUnits(cost))).toBe(cost);
  });
});
