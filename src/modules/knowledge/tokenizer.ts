/**
 * The o200k tokenizer (the encoding of the embedding and chat models whose tokens the knowledge
 * base counts), built from the rank table gpt-tokenizer ships in tiktoken's text format rather than
 * from its `gpt-tokenizer/encoding/o200k_base` module. That module holds the ranks as a 2.4 MB
 * JavaScript array literal, whose parsed and compiled source stays in memory with the table:
 * loaded, it held 23 MB of heap and ~50 MB more resident memory once the process settled, against
 * 18 MB and ~27-33 MB for the same table read from the data file. The encoding itself is the
 * library's (`GptEncoding.getEncodingApi`), given the very rank array its own module holds, so
 * tokens are the same to the byte.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

import type { RawBytePairRanks } from 'gpt-tokenizer/BytePairEncodingCore';
import { GptEncoding } from 'gpt-tokenizer/GptEncoding';

/**
 * Merge results the library keeps per distinct pre-token that is not a token itself (a rare word
 * with its leading space, an identifier), least recently used dropped first. Its default of 100,000
 * entries is both bigger and slower: chunking 15 MB of varied generated text (~50,000 such
 * pre-tokens) left the cache holding 15.8 MB of heap for the life of the process and took 26 s,
 * against 1.8 MB and 12 s with 5,000 entries (10,000: 3.4 MB, 13-15 s; 2,000: 0.8 MB, 14 s; none:
 * 41 s). A large cache costs time as well as memory, probably in GC (a big long-lived Map whose
 * entries keep changing) and in the move-to-end of every hit; the hits that pay are a text's common
 * words, a few thousand.
 */
const MERGE_CACHE_ENTRIES = 5_000;

/** Where the package keeps the table; resolved through its exports map, so it holds from src/ (tsx) and dist/ alike. */
function rankFilePath(): string {
  return createRequire(import.meta.url).resolve('gpt-tokenizer/data/o200k_base.tiktoken');
}

const strictUtf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * A token's bytes as the library's generated rank module writes them (src/codegen/generateJsBpe.ts):
 * the string they decode to when they are valid UTF-8, otherwise the byte values. The generator
 * also keeps as bytes a token that starts with a byte-order mark (its decoder drops the mark, so the
 * string does not encode back to the same length).
 */
function rankEntry(bytes: Uint8Array): string | number[] {
  const startsWithByteOrderMark = bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf;
  if (!startsWithByteOrderMark) {
    try {
      return strictUtf8.decode(bytes);
    } catch {
      // Not valid UTF-8 (a piece of a multi-byte character): kept as bytes.
    }
  }
  return Array.from(bytes);
}

const NEWLINE = 0x0a;
const SPACE = 0x20;
const BASE64 = /^[A-Za-z0-9+/]+={0,2}$/;

function malformed(file: Buffer, lineStart: number, lineEnd: number): Error {
  return new Error(`o200k rank table: malformed line ${JSON.stringify(file.toString('latin1', lineStart, Math.min(lineEnd, lineStart + 80)))}`);
}

/**
 * The rank array of a `.tiktoken` file (lines of `<base64 bytes> <rank>`): index = rank. A rank
 * the file skips stays a hole, as in the library's generated module (the library counts the
 * vocabulary with Object.keys, which skips holes).
 *
 * It walks the file's bytes and decodes each token into one reused buffer: splitting the text
 * into 200,000 lines and a Buffer per token made enough short-lived garbage to grow the heap
 * (and the resident memory, which V8 does not give back) past what the bundled module costs.
 */
export function ranksFromTiktoken(bytes: Uint8Array): RawBytePairRanks {
  const file = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const ranks: (string | number[])[] = [];
  let tokenBytes = Buffer.alloc(256);
  for (let lineStart = 0; lineStart < file.length; ) {
    const newline = file.indexOf(NEWLINE, lineStart);
    const lineEnd = newline < 0 ? file.length : newline;
    if (lineEnd > lineStart) {
      const space = file.indexOf(SPACE, lineStart);
      const rankText = file.toString('latin1', space + 1, lineEnd);
      if (space <= lineStart || space >= lineEnd - 1 || !/^\d+$/.test(rankText)) throw malformed(file, lineStart, lineEnd);
      const base64 = file.toString('latin1', lineStart, space);
      if (!BASE64.test(base64)) throw malformed(file, lineStart, lineEnd);
      if (tokenBytes.length < base64.length) tokenBytes = Buffer.alloc(base64.length);
      const byteCount = tokenBytes.write(base64, 'base64');
      ranks[Number(rankText)] = rankEntry(tokenBytes.subarray(0, byteCount));
    }
    lineStart = lineEnd + 1;
  }
  return ranks;
}

const o200k = GptEncoding.getEncodingApi('o200k_base', () => ranksFromTiktoken(readFileSync(rankFilePath())));
o200k.setMergeCacheSize(MERGE_CACHE_ENTRIES);

/**
 * A document's text is counted as text: `<|endoftext|>` and the other special tokens' names are
 * ordinary characters in an uploaded file (documentation about language models holds them), not
 * markers — by default the library throws on them, which failed the whole document.
 */
const AS_TEXT = { disallowedSpecial: new Set<string>() };

// Functions rather than the encoding's own methods, which it binds but types as unbound.
export function countTokens(text: string): number {
  return o200k.countTokens(text, AS_TEXT);
}

export function encode(text: string): number[] {
  return o200k.encode(text, AS_TEXT);
}

export function decode(tokens: Iterable<number>): string {
  return o200k.decode(tokens);
}
