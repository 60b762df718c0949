import { describe, expect, it } from 'vitest';

import { addCosts, computeCost, estimateCost } from '../../src/modules/ai-models/cost.js';
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

  it('adds decimal strings exactly (0.1 + 0.2 = 0.3)', () => {
    expect(addCosts('0.1', '0.2')).toBe('0.3');
    expect(addCosts('0.000000000001', '0.000000000002')).toBe('0.000000000003');
  });
});
