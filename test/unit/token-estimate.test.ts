import { describe, expect, it } from 'vitest';

import { estimateTextTokens, estimateTokensOfSize } from '../../src/modules/ai-models/token-estimate.js';

describe('estimateTextTokens', () => {
  it('ASCII (English, code, JSON): 4 characters a token', () => {
    expect(estimateTextTokens('')).toBe(0);
    expect(estimateTextTokens('abcd')).toBe(1);
    expect(estimateTextTokens('{"role":"user"}')).toBe(15 / 4);
    expect(estimateTextTokens('x'.repeat(4_000))).toBe(1_000);
  });

  it('outside ASCII, half a token per UTF-8 byte beyond the first of each character', () => {
    // 2 bytes: ¾ of a token a letter.
    expect(estimateTextTokens('привет')).toBe(6 * 0.75);
    expect(estimateTextTokens('é')).toBe(0.75);
    // 3 bytes (CJK, Devanagari): 1¼ a character, five times what 4 characters a token counted.
    expect(estimateTextTokens('数据')).toBe(2.5);
    expect(estimateTextTokens('नमस्ते')).toBe(6 * 1.25);
    // 4 bytes, 2 UTF-16 units (an emoji): 1½.
    expect(estimateTextTokens('😀')).toBe(1.5);
  });

  it('mixed text adds up by character', () => {
    expect(estimateTextTokens('Hi 数据 😀')).toBe(estimateTextTokens('Hi ') + estimateTextTokens('数据') + estimateTextTokens(' ') + estimateTextTokens('😀'));
    expect(estimateTextTokens('Hi 数据 😀')).toBe(0.75 + 2.5 + 0.25 + 1.5);
  });

  it('a text known by its size (what the database sums up) counts as the text itself', () => {
    const text = 'Hi 数据 привет';
    expect(estimateTokensOfSize(text.length, Buffer.byteLength(text))).toBe(estimateTextTokens(text));
    expect(estimateTokensOfSize(0, 0)).toBe(0);
  });
});
