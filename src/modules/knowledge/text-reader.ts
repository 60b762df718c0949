import { createReadStream } from 'node:fs';

import { tooMuchText } from './document-builder.js';
import { DocumentRejectedError } from './types.js';

const READ_CHUNK_BYTES = 1024 * 1024;

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
      throw notText(filename, `is not valid UTF-8 (near byte ${bytes.toLocaleString('en-US')})`);
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
