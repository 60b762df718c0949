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

export function notText(filename: string, why: string): DocumentRejectedError {
  return new DocumentRejectedError(`not a text file: ${filename} ${why}; save it as UTF-8 text or upload it in one of the accepted formats`);
}

/**
 * The file's text in pieces as it is read, checked to be UTF-8 without NUL bytes, so a large text
 * file never sits in memory as bytes and text at once; stops at `maxTextChars` characters.
 */
export async function* readTextChunks(path: string, filename: string, maxTextChars: number): AsyncGenerator<string> {
  // fatal: invalid UTF-8 throws instead of turning into U+FFFD; a leading BOM is dropped.
  const decoder = new TextDecoder('utf-8', { fatal: true });
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
      return chunk ? decoder.decode(chunk, { stream: true }) : decoder.decode();
    } catch {
      const at = bytes + (chunk ? firstInvalidUtf8(chunk) : 0);
      throw notText(filename, `is not valid UTF-8 (near byte ${at.toLocaleString('en-US')})`);
    }
  };
  for await (const chunk of createReadStream(path, { highWaterMark: READ_CHUNK_BYTES }) as AsyncIterable<Buffer>) {
    const text = decode(chunk);
    bytes += chunk.length;
    if (text.length > 0) yield check(text);
  }
  const rest = decode();
  if (rest.length > 0) yield check(rest);
}

/** The whole file as one validated string (one copy of the text: the pieces are joined once). */
export async function readText(path: string, filename: string, maxTextChars: number): Promise<string> {
  const pieces: string[] = [];
  for await (const piece of readTextChunks(path, filename, maxTextChars)) pieces.push(piece);
  return pieces.join('');
}
