import { createReadStream } from 'node:fs';

import { tooMuchText } from './document-builder.js';
import { DocumentRejectedError } from './types.js';

const READ_CHUNK_BYTES = 1024 * 1024;

/** Where the first byte that breaks UTF-8 is (a sequence cut by the end of `bytes` is not counted). */
export function firstInvalidUtf8(bytes: Uint8Array): number {
  let i = 0;
  while (i < bytes.length) {
    const lead = bytes[i]!;
    const length = lead < 0x80 ? 1 : lead >= 0xc2 && lead <= 0xdf ? 2 : lead >= 0xe0 && lead <= 0xef ? 3 : lead >= 0xf0 && lead <= 0xf4 ? 4 : 0;
    if (length === 0) return i;
    for (let k = 1; k < length; k++) {
      if (i + k >= bytes.length) return bytes.length;
      const next = bytes[i + k]!;
      // The second byte's range is narrower after E0, ED, F0 and F4 (overlong forms, surrogates, > U+10FFFF).
      const low = k === 1 && lead === 0xe0 ? 0xa0 : k === 1 && lead === 0xf0 ? 0x90 : 0x80;
      const high = k === 1 && lead === 0xed ? 0x9f : k === 1 && lead === 0xf4 ? 0x8f : 0xbf;
      if (next < low || next > high) return i;
    }
    i += length;
  }
  return bytes.length;
}

/** Where the first code unit that breaks UTF-16 is: a lone surrogate (a pair or unit cut by the end of `bytes` is not counted). */
export function firstInvalidUtf16(bytes: Uint8Array, littleEndian: boolean): number {
  const unit = (i: number) => (littleEndian ? bytes[i]! | (bytes[i + 1]! << 8) : (bytes[i]! << 8) | bytes[i + 1]!);
  let i = 0;
  while (i + 1 < bytes.length) {
    const code = unit(i);
    if (code >= 0xdc00 && code <= 0xdfff) return i;
    if (code >= 0xd800 && code <= 0xdbff) {
      if (i + 3 >= bytes.length) return bytes.length;
      const next = unit(i + 2);
      if (next < 0xdc00 || next > 0xdfff) return i;
      i += 4;
    } else i += 2;
  }
  return bytes.length;
}

/** A text encoding Keel reads: UTF-8, or UTF-16 when its byte-order mark says so. */
export interface TextEncoding {
  /** TextDecoder's name for it. */
  decoder: 'utf-8' | 'utf-16le' | 'utf-16be';
  /** What a message calls it. */
  label: 'UTF-8' | 'UTF-16';
  /** Where the first byte that breaks it is, in `bytes` (bytes cut by their end are not counted). */
  firstInvalid: (bytes: Uint8Array) => number;
}

const UTF8: TextEncoding = { decoder: 'utf-8', label: 'UTF-8', firstInvalid: firstInvalidUtf8 };
const UTF16LE: TextEncoding = { decoder: 'utf-16le', label: 'UTF-16', firstInvalid: (bytes) => firstInvalidUtf16(bytes, true) };
const UTF16BE: TextEncoding = { decoder: 'utf-16be', label: 'UTF-16', firstInvalid: (bytes) => firstInvalidUtf16(bytes, false) };

/**
 * The encoding whose byte-order mark starts `head` (UTF-16's FF FE, as Windows' "Unicode" text
 * files have it, or FE FF; UTF-8's EF BB BF), or null. The mark is no proof of text: the decoding
 * that follows is.
 */
export function byteOrderMark(head: Uint8Array): TextEncoding | null {
  if (head[0] === 0xff && head[1] === 0xfe) return UTF16LE;
  if (head[0] === 0xfe && head[1] === 0xff) return UTF16BE;
  if (head[0] === 0xef && head[1] === 0xbb && head[2] === 0xbf) return UTF8;
  return null;
}

/** The encoding of text starting with `head`: UTF-16 only with its byte-order mark, else UTF-8. */
export const textEncodingOf = (head: Uint8Array): TextEncoding => byteOrderMark(head) ?? UTF8;

/** A decoder that throws on invalid input instead of writing U+FFFD, and drops a leading byte-order mark. */
export const strictDecoder = (encoding: TextEncoding) => new TextDecoder(encoding.decoder, { fatal: true });

export function notText(filename: string, why: string): DocumentRejectedError {
  return new DocumentRejectedError(`not a text file: ${filename} ${why}; save it as UTF-8 text or upload it in one of the accepted formats`);
}

/**
 * The file's text in pieces as it is read, checked to be UTF-8 (or UTF-16 with its byte-order
 * mark) without NUL bytes, so a large text file never sits in memory as bytes and text at once;
 * stops at `maxTextChars` characters.
 */
export async function* readTextChunks(path: string, filename: string, maxTextChars: number): AsyncGenerator<string> {
  let encoding: TextEncoding | undefined;
  let decoder: ReturnType<typeof strictDecoder> | undefined;
  let bytes = 0;
  let chars = 0;
  const check = (text: string): string => {
    if (text.includes('\0')) throw notText(filename, 'holds binary data (NUL bytes)');
    chars += text.length;
    if (chars > maxTextChars) throw tooMuchText(maxTextChars);
    return text;
  };
  const decode = (chunk?: Buffer): string => {
    try {
      return chunk ? decoder!.decode(chunk, { stream: true }) : decoder!.decode();
    } catch {
      // Nothing wrong in the chunk itself: the bytes carried over from the one before are.
      const found = chunk ? encoding!.firstInvalid(chunk) : 0;
      const at = bytes + (chunk && found < chunk.length ? found : 0);
      throw notText(filename, `is not valid ${encoding!.label} (near byte ${at.toLocaleString('en-US')})`);
    }
  };
  for await (const chunk of createReadStream(path, { highWaterMark: READ_CHUNK_BYTES }) as AsyncIterable<Buffer>) {
    // The first chunk holds the byte-order mark (a read stream's chunks are full-size but the last).
    encoding ??= textEncodingOf(chunk);
    decoder ??= strictDecoder(encoding);
    const text = decode(chunk);
    bytes += chunk.length;
    if (text.length > 0) yield check(text);
  }
  if (!decoder) return;
  const rest = decode();
  if (rest.length > 0) yield check(rest);
}

/** The whole file as one validated string (one copy of the text: the pieces are joined once). */
export async function readText(path: string, filename: string, maxTextChars: number): Promise<string> {
  const pieces: string[] = [];
  for await (const piece of readTextChunks(path, filename, maxTextChars)) pieces.push(piece);
  return pieces.join('');
}
