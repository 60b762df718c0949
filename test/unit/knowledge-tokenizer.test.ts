import { readdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { isDeepStrictEqual } from 'node:util';

import bundledRanks from 'gpt-tokenizer/bpeRanks/o200k_base';
import * as library from 'gpt-tokenizer/encoding/o200k_base';
import { describe, expect, it } from 'vitest';

import { countTokens, decode, encode, ranksFromTiktoken } from '../../src/modules/knowledge/tokenizer.js';

/** The first rank where two rank arrays differ (in value, in form, or one has a hole), for a readable failure. */
function firstDifference(ours: readonly unknown[], theirs: readonly unknown[]): { rank: number; ours: unknown; theirs: unknown } | undefined {
  for (let rank = 0; rank < Math.max(ours.length, theirs.length); rank++) {
    if (rank in ours !== rank in theirs || !isDeepStrictEqual(ours[rank], theirs[rank])) return { rank, ours: ours[rank], theirs: theirs[rank] };
  }
  return undefined;
}

/** Text with more distinct words than the merge cache holds, so entries are evicted while it is encoded. */
function manyDistinctWords(count: number): string {
  const syllables = ['ka', 'to', 're', 'mi', 'sen', 'lo', 'qu', 'an', 'ber', 'dix', 'ul', 'pra'];
  const words: string[] = [];
  for (let n = 0; n < count; n++) {
    let word = '';
    for (let rest = n + 1; rest > 0; rest = Math.floor(rest / syllables.length)) word += syllables[rest % syllables.length];
    words.push(word);
  }
  return words.join(' ');
}

const kbEvalFolder = new URL('../fixtures/kb-eval/documents/', import.meta.url);

const SAMPLES: Record<string, string> = {
  english: 'The quick brown fox jumps over the lazy dog. It\'s 3:45 p.m.; the robots\' firmware v2.10.3 shipped on 2026-07-01!',
  code: readFileSync(new URL('../../src/modules/knowledge/chunk.ts', import.meta.url), 'utf8'),
  cjk: '知识库把文档切成段落，再按标记计数。日本語のテキストも、한국어 문장도 같은 방식으로 처리됩니다。',
  emoji: 'Ship it 🚀🤖 — family 👨‍👩‍👧‍👦, flags 🇯🇵🇫🇷, skin tones 👍🏽, keycap 1️⃣, and U+FFFD �.',
  invalidSurrogates: 'lone high \uD800 then text, lone low \uDC00, reversed \uDC00\uD800, at the end \uDBFF',
  whitespaceRuns: `a${' '.repeat(5000)}b${'\n'.repeat(3000)}c${'\t'.repeat(2000)}d${' \n'.repeat(1500)}${'\u3000'.repeat(500)}e`,
  controlAndBom: '\uFEFFstarts with a BOM\u0000\u0007\u001B[31mred\u001B[0m\r\n',
  manyDistinctWords: manyDistinctWords(30_000),
  ...Object.fromEntries(readdirSync(kbEvalFolder).map((name) => [`kb-eval/${name}`, readFileSync(new URL(name, kbEvalFolder), 'utf8')])),
};

describe('o200k tokenizer built from the tiktoken data file', () => {
  it('holds the rank array the library bundles: same strings, same byte arrays, same holes', () => {
    const file = readFileSync(createRequire(import.meta.url).resolve('gpt-tokenizer/data/o200k_base.tiktoken'));
    const ranks = ranksFromTiktoken(file);
    expect(ranks.length).toBe(bundledRanks.length);
    expect(Object.keys(ranks).length).toBe(Object.keys(bundledRanks).length);
    expect(firstDifference(ranks, bundledRanks)).toBeUndefined();
    expect(isDeepStrictEqual(ranks, bundledRanks)).toBe(true);
  });

  it('reads a skipped rank as a hole and bytes that are not plain UTF-8 as byte values', () => {
    // ranks 0 "!", 2 a byte-order mark (bytes: the library's generator keeps it so), 3 a lone continuation byte, 4 "é"
    const ranks = ranksFromTiktoken(new TextEncoder().encode('IQ== 0\n77u/ 2\ngA== 3\nw6k= 4\n'));
    expect(ranks.length).toBe(5);
    expect(1 in ranks).toBe(false);
    expect([ranks[0], ranks[2], ranks[3], ranks[4]]).toEqual(['!', [0xef, 0xbb, 0xbf], [0x80], 'é']);
    expect(() => ranksFromTiktoken(new TextEncoder().encode('IQ== x\n'))).toThrow(/malformed line/);
  });

  it.each(Object.keys(SAMPLES))('encodes, counts and decodes %s as the library does', (name) => {
    const text = SAMPLES[name]!;
    const tokens = encode(text);
    expect(tokens).toEqual(library.encode(text));
    expect(countTokens(text)).toBe(library.countTokens(text));
    expect(decode(tokens)).toBe(library.decode(tokens));
    // Cut mid-character: the bytes of a split character decode the same way.
    expect(decode(tokens.slice(1))).toBe(library.decode(tokens.slice(1)));
  });

  it('decodes every token on its own as the library does', () => {
    // The library decodes bytes through one module-wide TextDecoder in streaming mode, so a token
    // that ends inside a character leaves its bytes pending for the next decode call (whichever
    // encoding makes it). Each token is followed by the byte 0xFF, never part of UTF-8, which ends
    // whatever is pending, so every call starts from a clean decoder.
    const endsPendingBytes = bundledRanks.findIndex((entry) => isDeepStrictEqual(entry, [0xff]));
    const specialTokens = [199_999, 200_000, 200_001, 200_002, 200_003, 200_004, 200_005, 200_006];
    for (const token of [...bundledRanks.keys(), ...specialTokens]) {
      if (decode([token, endsPendingBytes]) !== library.decode([token, endsPendingBytes])) expect.unreachable(`token ${token} decodes differently`);
    }
  });

  it('counts the names of special tokens in a document as ordinary text (the library would throw)', () => {
    const text = 'before <|endoftext|> after <|im_start|>';
    expect(() => library.encode(text)).toThrow(/Disallowed special token/);
    expect(encode(text)).toEqual(library.encode(text, { disallowedSpecial: new Set() }));
    expect(countTokens(text)).toBe(encode(text).length);
    expect(decode(encode(text))).toBe(text);
    expect(encode(text)).not.toContain(199_999);
  });
});
