import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { constants, createBrotliDecompress, createInflate } from 'node:zlib';

import { getDocumentProxy } from 'unpdf';

import { type DrainedText, type ExtractedSpans, TextBuilder, tooMuchText } from './document-builder.js';
import { DocumentRejectedError } from './types.js';

interface Line {
  text: string;
  /** Font size (the text matrix's vertical scale), the largest on the line. */
  size: number;
  /** Baseline height on the page; a larger gap than usual to the previous line starts a paragraph. */
  y: number;
  page: number;
}

interface PdfTextItem {
  str: string;
  transform: number[];
  hasEOL: boolean;
}

/** A positioned run of text (the other items are marked-content markers). */
function textItem(item: unknown): PdfTextItem | null {
  const candidate = item as PdfTextItem;
  return typeof candidate.str === 'string' && Array.isArray(candidate.transform) ? candidate : null;
}

/** What pdf.js threw, as a sentence a user can act on. */
function pdfError(error: unknown): DocumentRejectedError {
  const { name, message } = error as { name?: string; message?: string };
  if (name === 'PasswordException') return new DocumentRejectedError('the PDF is encrypted (password-protected); upload a copy without a password');
  return new DocumentRejectedError(`could not read the PDF: ${message || String(error)}; it may be damaged — re-export or re-save it and upload again`);
}

// ==================== Compressed streams ====================

/** All the compressed streams of one PDF, unpacked: bounds the time a check takes. */
const MAX_TOTAL_INFLATED_BYTES = 1024 * 1024 * 1024;

const megabytes = (bytes: number) => `${Math.ceil(bytes / (1024 * 1024)).toLocaleString('en-US')} MB`;

/** How many bytes a zlib stream unpacks to, counted as it inflates (nothing kept), stopping past `limit`. */
function inflatedSize(data: Uint8Array, limit: number): Promise<number> {
  return new Promise((resolve) => {
    // A truncated or damaged stream is pdf.js's to judge: count what inflates and stop there.
    const inflate = createInflate({ finishFlush: 2 /* Z_SYNC_FLUSH */ });
    let size = 0;
    inflate.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        inflate.destroy();
        resolve(size);
      }
    });
    inflate.on('end', () => resolve(size));
    inflate.on('error', () => resolve(size));
    inflate.on('close', () => resolve(size));
    inflate.end(data);
  });
}

/** The longest stream dictionary read: a real one is a few hundred bytes; past this, nothing in it is trusted. */
const MAX_DICTIONARY_CHARS = 64 * 1024;

/**
 * The entries of a stream's own dictionary as pdf.js reads them (`text` runs from its object's
 * `obj` to `stream`): comments, strings and nested dictionaries blanked (what they say is not the
 * stream's), names with #xx escapes decoded (`/Flate#44ecode` is /FlateDecode).
 */
function streamDictionary(text: string): string {
  let out = '';
  let depth = 0;
  for (let at = 0; at < text.length; at++) {
    const c = text[at]!;
    if (c === '%') {
      while (at + 1 < text.length && text[at + 1] !== '\n' && text[at + 1] !== '\r') at++;
    } else if (c === '(') {
      // Literal strings nest balanced parentheses; a backslash escapes the next character.
      for (let open = 1; open > 0 && at + 1 < text.length; ) {
        const d = text[++at];
        if (d === '\\') at++;
        else if (d === '(') open++;
        else if (d === ')') open--;
      }
    } else if (c === '<' && text[at + 1] === '<') {
      depth++;
      at++;
    } else if (c === '>' && text[at + 1] === '>') {
      depth--;
      at++;
    } else if (c === '<') {
      const end = text.indexOf('>', at);
      at = end < 0 ? text.length : end;
    } else if (depth === 1) {
      out += c;
      continue;
    }
    out += ' ';
  }
  return out.replace(/#([0-9A-Fa-f]{2})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)));
}

/**
 * The bytes a Flate filter would get: ASCIIHexDecode's output when the data is hex digits (the
 * chain [/ASCIIHexDecode /FlateDecode]), else the data itself.
 */
function beforeFlate(data: Buffer): Buffer {
  if (!/^[\s0-9A-Fa-f]+(>|$)/.test(data.toString('latin1', 0, 64))) return data;
  const end = data.indexOf('>');
  return Buffer.from(data.toString('latin1', 0, end < 0 ? data.length : end).replace(/\s+/g, ''), 'hex');
}

// ==================== Declared filter chains (LZW, ASCII85, run-length, Brotli) ====================

/** A filter of a declared chain, as pdf.js names them (abbreviations included). */
type Filter = 'flate' | 'lzw' | 'a85' | 'ahx' | 'rl' | 'brotli';

const FILTERS: Record<string, Filter> = {
  FlateDecode: 'flate',
  Fl: 'flate',
  LZWDecode: 'lzw',
  LZW: 'lzw',
  ASCII85Decode: 'a85',
  A85: 'a85',
  ASCIIHexDecode: 'ahx',
  AHx: 'ahx',
  RunLengthDecode: 'rl',
  RL: 'rl',
  BrotliDecode: 'brotli',
};

/** The filters whose output the Flate pass alone does not bound: a chain with one (or with two Flates) is decoded along it. */
const DECODED: ReadonlySet<Filter> = new Set(['lzw', 'a85', 'rl', 'brotli']);

/**
 * The chains tried when a stream's filters cannot be read from the file as written (an indirect
 * array inside a compressed object stream): every way LZW, ASCII85 and run-length can lead to a
 * large output. Not Brotli: no ratio bounds it, so every such stream would be decoded, and a try
 * costs ~1 ms (20,000 small streams behind references took 12 s to check, 60 s with Brotli
 * guessed); a Brotli page behind such a reference is left to the memory watch of extract.ts.
 */
const GUESSED_CHAINS: Filter[][] = [
  ['lzw'],
  ['lzw', 'flate'],
  ['a85', 'flate'],
  ['a85', 'lzw'],
  ['a85', 'lzw', 'flate'],
  ['ahx', 'lzw'],
  ['rl'],
  ['flate', 'rl'],
  ['a85', 'rl'],
  // Run-length around a Flate stream: its literal runs hide the Flate data from the Flate pass.
  ['rl', 'flate'],
  ['a85', 'rl', 'flate'],
  ['ahx', 'rl'],
];

/** Bytes handed from one stage of a chain to the next. */
const CHUNK_BYTES = 64 * 1024;

type Stage = (input: AsyncIterable<Buffer>) => AsyncGenerator<Buffer>;

async function* chunksOf(data: Buffer): AsyncGenerator<Buffer> {
  for (let at = 0; at < data.length; at += CHUNK_BYTES) yield data.subarray(at, at + CHUNK_BYTES);
}

/** Collects output bytes and hands them on in chunks of CHUNK_BYTES. */
class Output {
  private buffer = Buffer.allocUnsafe(CHUNK_BYTES);
  private length = 0;

  /** Adds a byte; a full chunk when one is ready. */
  push(byte: number): Buffer | null {
    this.buffer[this.length++] = byte;
    return this.length === CHUNK_BYTES ? this.take() : null;
  }

  take(): Buffer {
    const full = this.buffer.subarray(0, this.length);
    this.buffer = Buffer.allocUnsafe(CHUNK_BYTES);
    this.length = 0;
    return full;
  }

  get pending(): boolean {
    return this.length > 0;
  }
}

/** pdf.js's ASCII85Decode: whitespace skipped, `z` four zeros, `~` (or the end) ends it, a short last group padded with `u`. */
async function* ascii85(input: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  const out = new Output();
  const group: number[] = [];
  const emit = function* (count: number) {
    let value = 0;
    for (let i = 0; i < 5; i++) value = value * 85 + ((group[i] ?? 117) - 33);
    for (let i = 0; i < count; i++) {
      const full = out.push(Math.floor(value / 256 ** (3 - i)) & 255);
      if (full) yield full;
    }
    group.length = 0;
  };
  ending: for await (const chunk of input) {
    for (const byte of chunk) {
      if (byte === 32 || byte === 9 || byte === 13 || byte === 10) continue;
      if (byte === 126) break ending;
      if (byte === 122 && group.length === 0) {
        for (let i = 0; i < 4; i++) {
          const full = out.push(0);
          if (full) yield full;
        }
        continue;
      }
      group.push(byte);
      if (group.length === 5) yield* emit(4);
    }
  }
  if (group.length > 0) yield* emit(group.length - 1);
  if (out.pending) yield out.take();
}

/** pdf.js's ASCIIHexDecode: hex digits read in pairs, anything else skipped, `>` ends it. */
async function* asciiHex(input: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  const out = new Output();
  let first = -1;
  ending: for await (const chunk of input) {
    for (const byte of chunk) {
      let digit;
      if (byte >= 48 && byte <= 57) digit = byte & 15;
      else if ((byte >= 65 && byte <= 70) || (byte >= 97 && byte <= 102)) digit = (byte & 15) + 9;
      else if (byte === 62) break ending;
      else continue;
      if (first < 0) first = digit;
      else {
        const full = out.push((first << 4) | digit);
        first = -1;
        if (full) yield full;
      }
    }
  }
  if (first >= 0) out.push(first << 4);
  if (out.pending) yield out.take();
}

/**
 * pdf.js's LZWDecode, step for step (its output is what pdf.js would hold): 9- to 12-bit codes,
 * 256 clears the table, 257 ends, a code past the table repeats the sequence's first byte.
 */
function lzw(earlyChange: number): Stage {
  return async function* (input) {
    const size = 4096;
    const values = new Uint8Array(size);
    const lengths = new Uint16Array(size);
    const prevCodes = new Uint16Array(size);
    const sequence = new Uint8Array(size);
    for (let i = 0; i < 256; i++) [values[i], lengths[i]] = [i, 1];
    let nextCode = 258;
    let codeLength = 9;
    let prevCode = 0;
    let sequenceLength = 0;
    let cached = 0;
    let bitsCached = 0;
    const out = new Output();
    for await (const chunk of input) {
      for (const byte of chunk) {
        cached = ((cached << 8) | byte) & 0xffffff;
        bitsCached += 8;
        while (bitsCached >= codeLength) {
          bitsCached -= codeLength;
          const code = (cached >>> bitsCached) & ((1 << codeLength) - 1);
          const had = sequenceLength > 0;
          if (code < 256) {
            sequence[0] = code;
            sequenceLength = 1;
          } else if (code >= 258) {
            if (code < nextCode) {
              sequenceLength = lengths[code]!;
              for (let at = sequenceLength - 1, c = code; at >= 0; at--) {
                sequence[at] = values[c]!;
                c = prevCodes[c]!;
              }
            } else {
              sequence[sequenceLength++] = sequence[0]!;
            }
          } else if (code === 256) {
            codeLength = 9;
            nextCode = 258;
            sequenceLength = 0;
            continue;
          } else {
            if (out.pending) yield out.take();
            return;
          }
          if (had) {
            prevCodes[nextCode] = prevCode;
            lengths[nextCode] = lengths[prevCode]! + 1;
            values[nextCode] = sequence[0]!;
            nextCode++;
            const n = nextCode + earlyChange;
            codeLength = n & (n - 1) ? codeLength : Math.min(Math.log(n) / Math.LN2 + 1, 12) | 0;
          }
          prevCode = code;
          for (let at = 0; at < sequenceLength; at++) {
            const full = out.push(sequence[at] ?? 0);
            if (full) yield full;
          }
        }
      }
    }
    if (out.pending) yield out.take();
  };
}

/**
 * pdf.js's RunLengthDecode: a length byte, then 1 + length bytes copied (below 128) or the next
 * byte repeated 257 - length times (above); 128, or a length byte with nothing after it, ends it.
 */
async function* runLength(input: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  const out = new Output();
  let length = -1;
  let copying = 0;
  ending: for await (const chunk of input) {
    for (const byte of chunk) {
      let full: Buffer | null = null;
      if (copying > 0) {
        copying--;
        full = out.push(byte);
      } else if (length < 0) {
        if (byte === 128) break ending;
        length = byte;
      } else if (length < 128) {
        copying = length;
        length = -1;
        full = out.push(byte);
      } else {
        for (let i = 257 - length; i > 0; i--) {
          const made = out.push(byte);
          if (made) yield made;
        }
        length = -1;
      }
      if (full) yield full;
    }
  }
  if (out.pending) yield out.take();
}

/** A zlib-module decompressor as a stage: what it unpacks before the data ends or is damaged (pdf.js's to judge). */
function decompressing(create: () => NodeJS.ReadWriteStream & { destroy(): void }): Stage {
  return async function* (input) {
    const decompress = create();
    const fed = pipeline(Readable.from(input), decompress).catch(() => undefined);
    try {
      for await (const chunk of decompress) yield chunk as Buffer;
    } catch {
      // the damage: counted up to it
    } finally {
      decompress.destroy();
      await fed;
    }
  };
}

/** FlateDecode: what inflates before the data ends or stops being zlib. */
const flate = decompressing(() => createInflate({ finishFlush: constants.Z_SYNC_FLUSH }));
/** BrotliDecode (pdf.js decodes it in JavaScript, whole): a few KB can unpack to gigabytes. */
const brotli = decompressing(() => createBrotliDecompress({ finishFlush: constants.BROTLI_OPERATION_FLUSH }));

const STAGES: Record<Filter, (earlyChange: number) => Stage> = {
  flate: () => flate,
  lzw,
  a85: () => ascii85,
  ahx: () => asciiHex,
  rl: () => runLength,
  brotli: () => brotli,
};

/** Counts each stage's output into `sizes[index]`; stops passing bytes on once one is past `limit`. */
async function* counted(input: AsyncIterable<Buffer>, sizes: number[], index: number, limit: number): AsyncGenerator<Buffer> {
  for await (const chunk of input) {
    sizes[index]! += chunk.length;
    yield chunk;
    if (sizes[index]! > limit) return;
  }
}

/**
 * The most bytes any stage of `chain` could produce from `bytes` of input, whatever they are: a
 * chain that cannot reach the limit is not decoded (most streams are small).
 */
function chainBound(bytes: number, chain: Filter[]): number {
  let size = bytes;
  let most = 0;
  for (const filter of chain) {
    if (filter === 'a85') size *= 4; // `z`: four bytes per character
    else if (filter === 'ahx') size = Math.ceil(size / 2);
    else if (filter === 'flate') size *= 1032; // zlib's largest ratio
    else if (filter === 'rl') size *= 64; // two bytes: a run of 128
    else if (filter === 'brotli') size = Infinity; // no useful bound: always decoded
    else {
      // A code's output is at most one byte longer than any before it (65,535 at most).
      const codes = Math.ceil((size * 8) / 9);
      size = codes <= 65_535 ? (codes * (codes + 1)) / 2 : codes * 65_535;
    }
    most = Math.max(most, size);
  }
  return most;
}

/**
 * The most bytes any stage of `chain` produces from `data` (pdf.js holds each stage's output
 * whole), stopping past `limit`: decoded as it goes, nothing kept.
 */
async function chainSize(data: Buffer, chain: Filter[], earlyChange: number, limit: number): Promise<number> {
  const sizes = chain.map(() => 0);
  let stream: AsyncIterable<Buffer> = chunksOf(data);
  chain.forEach((filter, index) => {
    stream = counted(STAGES[filter](earlyChange)(stream), sizes, index, limit);
  });
  for await (const chunk of stream) void chunk;
  return Math.max(0, ...sizes);
}

/** A PDF object as far as the check reads one: names, arrays, dictionaries, references; the rest is `other`. */
type PdfValue = { name: string } | { array: PdfValue[] } | { dict: Map<string, PdfValue> } | { ref: string } | { number: number } | { other: true };

const DELIMITER = /[\s/<>[\]()%{}]/;

/** Reads PDF objects from `text` the way pdf.js's parser does, enough for a stream's filters: strings and comments skipped, #xx escapes decoded. */
class ObjectReader {
  at = 0;
  constructor(private readonly text: string) {}

  private skipSpace(): void {
    for (;;) {
      while (this.at < this.text.length && /\s/.test(this.text[this.at]!)) this.at++;
      if (this.text[this.at] !== '%') return;
      while (this.at < this.text.length && this.text[this.at] !== '\n' && this.text[this.at] !== '\r') this.at++;
    }
  }

  private word(): string {
    const from = this.at;
    while (this.at < this.text.length && !DELIMITER.test(this.text[this.at]!)) this.at++;
    return this.text.slice(from, this.at);
  }

  /** The next value; null at the end, or at a `]` or `>>` (which it leaves unread). */
  value(depth = 0): PdfValue | null {
    this.skipSpace();
    const c = this.text[this.at];
    if (c === undefined || c === ']' || (c === '>' && this.text[this.at + 1] === '>')) return null;
    if (depth > 32) return null;
    if (c === '/') {
      this.at++;
      return { name: this.word().replace(/#([0-9A-Fa-f]{2})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16))) };
    }
    if (c === '<' && this.text[this.at + 1] === '<') {
      this.at += 2;
      const dict = new Map<string, PdfValue>();
      for (;;) {
        const key = this.value(depth + 1);
        if (key === null) break;
        const value = this.value(depth + 1);
        if ('name' in key && value !== null) dict.set(key.name, value);
        if (value === null) break;
      }
      this.skipSpace();
      if (this.text.startsWith('>>', this.at)) this.at += 2;
      return { dict };
    }
    if (c === '[') {
      this.at++;
      const array: PdfValue[] = [];
      for (let item = this.value(depth + 1); item !== null; item = this.value(depth + 1)) array.push(item);
      this.skipSpace();
      if (this.text[this.at] === ']') this.at++;
      return { array };
    }
    if (c === '(') {
      for (let open = 1; open > 0 && this.at + 1 < this.text.length; ) {
        const d = this.text[++this.at];
        if (d === '\\') this.at++;
        else if (d === '(') open++;
        else if (d === ')') open--;
      }
      this.at++;
      return { other: true };
    }
    if (c === '<') {
      const end = this.text.indexOf('>', this.at);
      this.at = end < 0 ? this.text.length : end + 1;
      return { other: true };
    }
    if (DELIMITER.test(c)) {
      this.at++;
      return { other: true };
    }
    const word = this.word();
    if (/^\d+$/.test(word)) {
      // `n g R`: a reference.
      const reference = /^\s+(\d+)\s+R(?![^\s/<>[\]()%{}])/.exec(this.text.slice(this.at, this.at + 32));
      if (reference) {
        this.at += reference[0].length;
        return { ref: `${word} ${reference[1]}` };
      }
    }
    return /^[+-]?(\d+\.?\d*|\.\d+)$/.test(word) ? { number: Number(word) } : { other: true };
  }
}

/** The longest object of an object stream whose value is kept: what a stream's entries refer to (a length, filters, parameters) is a few bytes. */
const MAX_PACKED_OBJECT_CHARS = 1024;

/**
 * The objects of a PDF as the check can read them: those written in it, found by their `n g obj`
 * (the last one written: an update's), read once; and the small ones of the object streams it has
 * unpacked (`pack`), which nothing in the file shows as written.
 */
class PdfObjects {
  private starts: Map<string, number> | undefined;
  private text: string | undefined;
  /** Objects read from object streams (always generation 0), by `n g`. */
  private readonly packed = new Map<string, PdfValue>();
  /** Whether an object was asked for that neither holds (one in an object stream not yet unpacked may be it). */
  missed = false;

  constructor(private readonly bytes: Buffer) {}

  /** Object `ref` (`n g`) as written, else as packed; null when the check has neither. */
  get(ref: string): PdfValue | null {
    const value = this.written(ref) ?? this.packed.get(key(ref)) ?? null;
    if (value === null) this.missed = true;
    return value;
  }

  /**
   * Every value the file gives object `ref`: pdf.js takes the one its cross-reference points to,
   * which the check does not read (a file may write an object and pack another of that number).
   */
  all(ref: string): PdfValue[] {
    const values = [this.written(ref), this.packed.get(key(ref))].filter((value) => value !== null && value !== undefined);
    if (values.length === 0) this.missed = true;
    return values;
  }

  /** An object read from an object stream. */
  pack(number: number, value: PdfValue): void {
    this.packed.set(`${number} 0`, value);
  }

  private written(ref: string): PdfValue | null {
    if (!this.starts) {
      this.text = this.bytes.toString('latin1');
      this.starts = new Map();
      for (const found of this.text.matchAll(/(?<![0-9])(\d+)\s+(\d+)\s+obj/g)) this.starts.set(`${Number(found[1])} ${Number(found[2])}`, found.index + found[0].length);
    }
    const at = this.starts.get(key(ref));
    return at === undefined ? null : new ObjectReader(this.text!.slice(at, at + MAX_DICTIONARY_CHARS)).value();
  }
}

/** `n g` as numbers write it (`007 0` is object 7). */
const key = (ref: string) => ref.split(' ').map(Number).join(' ');

/** The value itself, or the object it refers to (null: not found). */
function resolved(value: PdfValue | undefined, objects: PdfObjects): PdfValue | null | undefined {
  return value && 'ref' in value ? objects.get(value.ref) : value;
}

/** A stream's dictionary, from the text between its object's `obj` and `stream`; null when there is none. */
function dictionaryOf(text: string): Map<string, PdfValue> | null {
  const start = text.indexOf('<<');
  if (start < 0) return null;
  const dictionary = new ObjectReader(text.slice(start)).value();
  return dictionary && 'dict' in dictionary ? dictionary.dict : null;
}

/** A stream's filters and their parameters as pdf.js reads them: /F before /Filter, /DP before /DecodeParms, references followed. */
function filterEntries(dict: Map<string, PdfValue> | null, objects: PdfObjects): { filter: PdfValue | null | undefined; parms: PdfValue | null | undefined } {
  return { filter: resolved(dict?.get('F') ?? dict?.get('Filter'), objects), parms: resolved(dict?.get('DP') ?? dict?.get('DecodeParms'), objects) };
}

/**
 * Where pdf.js ends a stream's data (from `start`): at its /Length (references followed) when
 * `endstream` comes next there, past white space and comments; else at the first `endstream`
 * (`firstEnd`). The data may hold those bytes itself: cut there, the check saw a page's first
 * bytes and pdf.js unpacked the whole (a 20 KB file, 20 MB of page, not refused).
 */
function streamEnd(bytes: Buffer, start: number, firstEnd: number, text: string, file: PdfObjects): number {
  const declared = dictionaryOf(text)?.get('Length');
  // A reference the file answers twice (written, and packed in an object stream): the longer data
  // that ends where a /Length says is checked, which counts at least what the shorter holds.
  const lengths = declared && 'ref' in declared ? file.all(declared.ref) : declared ? [declared] : [];
  let found = -1;
  for (const length of lengths) {
    if (!('number' in length) || !Number.isInteger(length.number) || length.number < 0) continue;
    const end = start + length.number;
    if (end <= bytes.length && end > found && /^(?:\s|%[^\r\n]*)*endstream/.test(bytes.toString('latin1', end, end + 1024))) found = end;
  }
  return found >= 0 ? found : firstEnd;
}

/**
 * The chains to decode a stream with, from its dictionary (`text` from its object's `obj` to
 * `stream`), as pdf.js reads its filters (/F before /Filter, references followed): null when they
 * involve none of LZW, ASCII85, run-length and Brotli, nor Flate twice (the Flate check covers the
 * rest). Filters it cannot read (a reference to an object the check has not found) get every chain
 * those can start.
 */
function declaredChains(text: string, file: PdfObjects): { chains: Filter[][]; earlyChanges: number[] } | null {
  const dict = dictionaryOf(text);
  if (!dict) return null;
  const { filter, parms } = filterEntries(dict, file);
  if (filter === undefined) return null;
  let names: string[] | null = null;
  if (filter && 'name' in filter) names = [filter.name];
  else if (filter && 'array' in filter) {
    const items = filter.array.map((item) => resolved(item, file));
    names = items.every((item) => item && 'name' in item) ? items.map((item) => (item as { name: string }).name) : null;
  }
  const early = parms && 'dict' in parms ? resolved(parms.dict.get('EarlyChange'), file) : undefined;
  const earlyChanges = parms === undefined || (parms && 'dict' in parms && early === undefined) ? [1] : early && 'number' in early ? [early.number] : [0, 1];
  if (names === null) return { chains: GUESSED_CHAINS, earlyChanges };
  const chain: Filter[] = [];
  for (const name of names) {
    const known = FILTERS[name];
    // A filter the check does not decode (an image codec) ends what it checks.
    if (!known) break;
    chain.push(known);
  }
  // Flate after Flate: the Flate pass counts the first only (1.8 KB unpacked to 1 MB, then 1 GB).
  const flates = chain.filter((filter) => filter === 'flate').length;
  return flates > 1 || chain.some((filter) => DECODED.has(filter)) ? { chains: [chain], earlyChanges } : null;
}

/** An object stream found in the file: its data as written and its dictionary's text. */
interface ObjectStream {
  data: Buffer;
  dictionary: string;
}

/** What a pass over the streams found: the object streams, and where the streams are whose references the check could not follow. */
interface StreamsFound {
  objectStreams: ObjectStream[];
  missed: Set<number>;
}

const tooLarge = (maxStreamBytes: number) =>
  new DocumentRejectedError(`the PDF expands to more than ${megabytes(maxStreamBytes)} when one of its parts is unpacked (the limit per part); it is damaged or built to exhaust the reader`);

/** The data of every stream of a PDF (or of an unpacked object stream), checked one by one against the bounds; what the streams unpacked counts in `total`. */
class StreamCheck {
  total = 0;

  constructor(
    readonly objects: PdfObjects,
    private readonly maxStreamBytes: number,
  ) {}

  /**
   * Checks every stream in `bytes` (with `only`, those at these offsets) and tells what it found.
   * `objectStart` tells where the object holding a `stream` keyword at `at` starts, not before
   * `from` (-1: none there): its dictionary is read from there.
   */
  async streams(bytes: Buffer, objectStart: (from: number, at: number) => number, only?: Set<number>): Promise<StreamsFound> {
    const found: StreamsFound = { objectStreams: [], missed: new Set() };
    // Where the last stream's data ended: neither its bytes nor its dictionary are searched again,
    // so a file of `stream` keywords costs one pass.
    let searched = 0;
    for (let at = bytes.indexOf('stream'); at >= 0; at = bytes.indexOf('stream', Math.max(at + 6, searched))) {
      // `endstream` contains `stream`; a stream's data starts after `stream` and its end of line.
      if (at >= 3 && bytes.toString('latin1', at - 3, at) === 'end') continue;
      let start = at + 6;
      if (bytes[start] === 0x0d) start++;
      if (bytes[start] !== 0x0a) continue;
      start++;
      const end = bytes.indexOf('endstream', start);
      const from = objectStart(searched, at);
      searched = end < 0 ? bytes.length : end + 9;
      if (only && !only.has(at)) continue;
      const dictionary = from >= 0 ? bytes.toString('latin1', from, at) : '';
      if (/\/Subtype\s*\/Image(?![^\s/<>[\]()%{}])/.test(streamDictionary(dictionary))) continue;
      this.objects.missed = false;
      // `searched` stays at the first `endstream`: a stream a longer /Length spans is checked on its own too (pdf.js may read it by its own offset).
      const data = bytes.subarray(start, streamEnd(bytes, start, end < 0 ? bytes.length : end, dictionary, this.objects));
      await this.check(data, dictionary);
      if (this.objects.missed) found.missed.add(at);
      // pdf.js reads an object stream by its /N and /First alone (no /Type needed).
      const entries = dictionaryOf(dictionary);
      if (entries?.has('N') && entries.has('First')) found.objectStreams.push({ data, dictionary });
    }
    return found;
  }

  /**
   * An object stream's content, unpacked along its filters as pdf.js reads them, with the
   * predictors of their parameters (Flate when the filters cannot be read, as nearly every writer
   * packs them). A filter the check does not decode (an image codec) leaves what it unpacked, in
   * which the objects are then not found.
   */
  async unpack({ data, dictionary }: ObjectStream): Promise<Buffer> {
    const { filter, parms } = filterEntries(dictionaryOf(dictionary), this.objects);
    const names = filter === undefined ? [] : filter && 'name' in filter ? [filter] : filter && 'array' in filter ? filter.array.map((item) => resolved(item, this.objects)) : [null];
    let stream: AsyncIterable<Buffer> = chunksOf(data);
    for (const [index, name] of names.entries()) {
      const known = name && 'name' in name ? FILTERS[name.name] : 'flate';
      if (!known) break;
      // pdf.js reads one dictionary of parameters for a lone filter, an array of them for a chain.
      const each = filter && 'array' in filter ? (parms && 'array' in parms ? resolved(parms.array[index], this.objects) : null) : parms;
      const params = each && 'dict' in each ? each.dict : null;
      const early = params ? resolved(params.get('EarlyChange'), this.objects) : null;
      stream = STAGES[known](early && 'number' in early ? early.number : 1)(stream);
      const predicted = params && (known === 'flate' || known === 'lzw') ? predictor(params, this.objects) : null;
      if (predicted) stream = predicted(stream);
    }
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of stream) {
      size += chunk.length;
      this.total += chunk.length;
      // Checked already as a stream: only a decoding the check did not make could pass here.
      if (size > this.maxStreamBytes) throw tooLarge(this.maxStreamBytes);
      chunks.push(chunk);
    }
    this.checkTotal();
    return Buffer.concat(chunks);
  }

  private async check(data: Buffer, dictionary: string): Promise<void> {
    const { maxStreamBytes } = this;
    const limit = () => Math.min(maxStreamBytes, MAX_TOTAL_INFLATED_BYTES - this.total - work);
    let work = 0;
    let size = await inflatedSize(beforeFlate(data), limit());
    work += size;
    // Streams declared LZW, ASCII85, run-length or Brotli are decoded along their chain too;
    // every decoding counts toward the total (it bounds the time the check takes).
    const declared = size > limit() ? null : declaredChains(dictionary, this.objects);
    for (const chain of declared?.chains ?? []) {
      // EarlyChange is LZW's: another chain is decoded once.
      for (const earlyChange of chain.includes('lzw') ? declared!.earlyChanges : [1]) {
        if (size > maxStreamBytes || this.total + work >= MAX_TOTAL_INFLATED_BYTES) break;
        if (chainBound(data.length, chain) <= limit()) break;
        const decoded = await chainSize(data, chain, earlyChange, limit());
        size = Math.max(size, decoded);
        work += decoded;
      }
    }
    if (size > maxStreamBytes) throw tooLarge(maxStreamBytes);
    this.total += work;
    this.checkTotal();
  }

  private checkTotal(): void {
    if (this.total >= MAX_TOTAL_INFLATED_BYTES) {
      throw new DocumentRejectedError(`the PDF expands to more than ${megabytes(MAX_TOTAL_INFLATED_BYTES)} when unpacked; split it into smaller files`);
    }
  }
}

/**
 * pdf.js's predictors after Flate or LZW (their /DecodeParms): PNG's (10-15; each row tells its own
 * by its first byte) and TIFF's (2) at 8 bits a component; null for none. A predictor it rejects,
 * or TIFF's at other depths, passes the bytes on as they are.
 */
function predictor(params: Map<string, PdfValue>, objects: PdfObjects): Stage | null {
  const number = (name: string, fallback: number) => {
    const value = resolved(params.get(name), objects);
    return value && 'number' in value && Number.isInteger(value.number) && value.number > 0 ? value.number : fallback;
  };
  const kind = number('Predictor', 1);
  const colors = number('Colors', 1);
  const bits = number('BitsPerComponent', 8);
  const pixelBytes = (colors * bits + 7) >> 3;
  const rowBytes = (number('Columns', 1) * colors * bits + 7) >> 3;
  if (!(kind >= 10 && kind <= 15) && !(kind === 2 && bits === 8)) return null;
  // pdf.js counts a row's bytes in 32 bits, as above: a width past them is none or negative, and
  // pdf.js reads no rows at all (nor can a buffer be made that wide).
  if (rowBytes <= 0) return async function* () {};
  const png = kind >= 10;
  return async function* (input) {
    let prior = Buffer.alloc(rowBytes);
    // The bytes of a row not yet whole, joined once it is: joined at each chunk, a row of 30 MB
    // (/Columns is the file's to say) was copied anew every 64 KB, 34 s for a 58 KB file.
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    /** One row from its raw bytes (a last one may be short), as pdf.js's readBlockPng and readBlockTiff make it. */
    const decode = (raw: Buffer): Buffer => {
      const body = png ? raw.subarray(1) : raw;
      const row = Buffer.alloc(rowBytes);
      const type = png ? raw[0] : -1;
      for (let i = 0; i < body.length; i++) {
        const left = i >= pixelBytes ? row[i - pixelBytes]! : 0;
        const up = prior[i]!;
        const upLeft = i >= pixelBytes ? prior[i - pixelBytes]! : 0;
        let add = 0;
        if (type === -1) add = i >= colors ? row[i - colors]! : 0;
        else if (type === 1) add = left;
        else if (type === 2) add = up;
        else if (type === 3) add = (left + up) >> 1;
        else if (type === 4) {
          const p = left + up - upLeft;
          const [pa, pb, pc] = [Math.abs(p - left), Math.abs(p - up), Math.abs(p - upLeft)];
          add = pa <= pb && pa <= pc ? left : pb <= pc ? up : upLeft;
        }
        row[i] = (body[i]! + add) & 0xff;
      }
      prior = row;
      return row.subarray(0, body.length);
    };
    const size = png ? rowBytes + 1 : rowBytes;
    for await (const chunk of input) {
      pending.push(chunk);
      pendingBytes += chunk.length;
      if (pendingBytes < size) continue;
      const joined = Buffer.concat(pending);
      const rows: Buffer[] = [];
      let at = 0;
      for (; at + size <= joined.length; at += size) rows.push(decode(joined.subarray(at, at + size)));
      pending = [joined.subarray(at)];
      pendingBytes = joined.length - at;
      yield Buffer.concat(rows);
    }
    if (pendingBytes > (png ? 1 : 0)) yield decode(Buffer.concat(pending));
  };
}

/**
 * The most objects read from the object streams of one PDF. A real one packs a few hundred per
 * stream, a few hundred thousand in all; /N is the file's to say, and 58 KB that unpacked to 15
 * million pairs of numbers took 15 s and 1 GB to read. Past it the PDF is refused: an object not
 * read could be a /Length or filter the check then does not follow.
 */
export const MAX_PACKED_OBJECTS = 1_000_000;

const tooManyPacked = () =>
  new DocumentRejectedError(`the PDF packs more than ${MAX_PACKED_OBJECTS.toLocaleString('en-US')} objects in its object streams; it is damaged or built to exhaust the reader`);

/**
 * The objects packed in an object stream's unpacked `content`, as pdf.js reads them: /N pairs of
 * object number and offset from the start, then each object from /First plus its offset to the
 * next one's. At most `most` + 1 are read (the caller refuses past `most`). An offset below the one
 * before ends them: pdf.js refuses the whole stream there ("Invalid offset"), and read on, offsets
 * going back and forth had each object span the same 1 KB again (480 KB of file: 15 s, 2 GB).
 */
function packedObjects(content: Buffer, dictionary: string, objects: PdfObjects, most: number): { number: number; start: number; end: number }[] {
  const dict = dictionaryOf(dictionary);
  const count = resolved(dict?.get('N'), objects);
  const first = resolved(dict?.get('First'), objects);
  if (!count || !first || !('number' in count) || !('number' in first) || !Number.isInteger(count.number) || !Number.isInteger(first.number) || first.number < 0) return [];
  const header = new ObjectReader(content.toString('latin1', 0, Math.min(content.length, first.number)));
  const found: { number: number; start: number; end: number }[] = [];
  for (let i = 0; i < count.number && found.length <= most; i++) {
    const number = header.value();
    const offset = header.value();
    if (!number || !offset || !('number' in number) || !('number' in offset)) break;
    const start = first.number + offset.number;
    if (found.length > 0 && start < found[found.length - 1]!.start) break;
    found.push({ number: number.number, start, end: content.length });
  }
  found.forEach((object, i) => {
    if (i + 1 < found.length) object.end = found[i + 1]!.start;
  });
  return found;
}

/**
 * Refuses a PDF whose compressed streams unpack past the bounds, before pdf.js sees it: pdf.js
 * decodes a content stream whole into typed arrays, memory outside the V8 heap that the worker's
 * limit does not cover (a 300 KB PDF whose page unpacks to 300 MB took the process to 1.1 GB).
 * Every stream is unpacked as Flate whatever its dictionary declares (data that is not zlib fails
 * at its first bytes), so no spelling of the filter hides one; only images are skipped (text
 * extraction never decodes them), when their own dictionary says so outside comments and strings.
 * A stream whose filters (as pdf.js reads them: references followed) include LZWDecode,
 * ASCII85Decode, RunLengthDecode or BrotliDecode is also decoded along that chain, pdf.js's way,
 * each stage counted and bounded alike.
 *
 * Object streams (PDF 1.5) are unpacked too, and what they hold is read as the file's own: their
 * small objects answer the references of other streams' /Length and filters (pdf.js follows them
 * there; unanswered, a page whose data holds the bytes `endstream` was checked only up to them),
 * and the streams packed in them (the standard forbids it; pdf.js reads them: a 1 KB file's page
 * packed there unpacked to 40 MB past every check) are checked as any other. An object stream
 * inside another is refused. What these checks let through (a page that calls itself an image,
 * Brotli behind an unreadable reference, an object stream behind a filter it does not decode) is
 * left to the memory watch of extract.ts.
 */
export async function checkPdfStreams(data: Uint8Array, maxStreamBytes: number): Promise<void> {
  const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const check = new StreamCheck(new PdfObjects(bytes), maxStreamBytes);
  // A stream's dictionary runs from its object's `obj` (a string could say `obj` too, or
  // `/Subtype /Image`: a page may as well declare itself an image, which pdf.js ignores; the
  // memory watch of extract.ts bounds what these checks let through).
  const written = (searched: number, at: number) => {
    const from = Math.max(searched, at - MAX_DICTIONARY_CHARS);
    const objectAt = bytes.subarray(from, at).lastIndexOf('obj');
    return objectAt >= 0 ? from + objectAt + 3 : -1;
  };
  const { objectStreams, missed } = await check.streams(bytes, written);
  if (objectStreams.length === 0) return;
  let packedCount = 0;
  for (const objectStream of objectStreams) {
    const content = await check.unpack(objectStream);
    const packedHere = packedObjects(content, objectStream.dictionary, check.objects, MAX_PACKED_OBJECTS - packedCount);
    packedCount += packedHere.length;
    if (packedCount > MAX_PACKED_OBJECTS) throw tooManyPacked();
    for (const { number, start, end } of packedHere) {
      if (end - start > MAX_PACKED_OBJECT_CHARS) continue;
      const value = new ObjectReader(content.toString('latin1', start, end)).value();
      if (value && !('other' in value)) check.objects.pack(number, value);
    }
  }
  // The streams whose references no written object answered, again: the packed ones may.
  if (missed.size > 0) await check.streams(bytes, written, missed);
  for (const objectStream of objectStreams) {
    // One object stream's content at a time: unpacked again rather than kept.
    const content = await check.unpack(objectStream);
    // In order already: offsets that go back end the list.
    const starts = packedObjects(content, objectStream.dictionary, check.objects, MAX_PACKED_OBJECTS).map((object) => object.start);
    /** The start of the packed object holding `at` (the last to start before it), unless before `searched`. */
    const packed = (searched: number, at: number) => {
      let low = 0;
      let high = starts.length;
      while (low < high) {
        const middle = (low + high) >> 1;
        if (starts[middle]! <= at) low = middle + 1;
        else high = middle;
      }
      const start = low > 0 ? starts[low - 1]! : -1;
      return start >= searched ? start : -1;
    };
    if ((await check.streams(content, packed)).objectStreams.length > 0) {
      throw new DocumentRejectedError('the PDF packs an object stream inside another (the standard forbids it); it is damaged or built to exhaust the reader');
    }
  }
}

// ==================== Text ====================

/** The size most of the text is set in (weighted by characters): anything clearly larger is a heading. */
function bodySize(lines: Line[]): number {
  const chars = new Map<number, number>();
  for (const line of lines) chars.set(line.size, (chars.get(line.size) ?? 0) + line.text.length);
  let best = 0;
  let bestChars = -1;
  for (const [size, count] of chars) if (count > bestChars) [best, bestChars] = [size, count];
  return best;
}

/**
 * Characters of lines held back before the body size is settled: a document up to this size is
 * judged on all its lines; a larger one on its first pages (~100 pages of a book: its body text
 * does not change size after them), so its text is written, and can leave the thread, as it is read
 * — and indexed meanwhile (what comes before this is indexed only once it has been read).
 */
const SAMPLE_CHARS = 250_000;

/**
 * Text handed on from the parsing thread in pieces of about this many characters: small enough
 * that indexing follows the reading closely, large enough that a piece costs nothing to post.
 */
const PIECE_CHARS = 128_000;

/**
 * Writes a PDF's lines as text: headings by size (see pdfSpans), paragraphs by the gaps between
 * lines. Lines are held only until the body size is known (SAMPLE_CHARS), then written as they come.
 */
class PdfTextWriter {
  private readonly out: TextBuilder;
  private held: Line[] | null = [];
  private heldChars = 0;
  private body = 0;
  /** Heading sizes, largest first: a heading's level is its size's rank. */
  private headingSizes: number[] = [];
  private previous: Line | null = null;
  private pendingHeading: Line | null = null;
  private any = false;

  constructor(maxTextChars: number) {
    this.out = new TextBuilder('pdf', maxTextChars);
  }

  add(line: Line): void {
    if (line.text.trim().length === 0) return;
    this.any = true;
    if (!this.held) return this.write(line);
    this.held.push(line);
    this.heldChars += line.text.length;
    if (this.heldChars >= SAMPLE_CHARS) this.settle();
  }

  /** The text written since the last piece, once there is enough of it, with the sections it completes. */
  drain(): DrainedText | null {
    return this.out.drain(PIECE_CHARS);
  }

  finish(): ExtractedSpans {
    if (!this.any) throw new DocumentRejectedError('the PDF has no text layer (it may be scanned images); run it through OCR and upload the result');
    this.settle();
    this.flushHeading();
    return this.out.finish();
  }

  private settle(): void {
    const held = this.held;
    if (!held) return;
    this.held = null;
    this.body = bodySize(held);
    this.headingSizes = [...new Set(held.filter((line) => this.isHeading(line)).map((line) => line.size))].sort((a, b) => b - a);
    for (const line of held) this.write(line);
  }

  private isHeading(line: Line): boolean {
    return line.size >= this.body * 1.15 && line.text.trim().length <= 200 && /\p{L}/u.test(line.text);
  }

  private flushHeading(): void {
    const heading = this.pendingHeading;
    if (!heading) return;
    this.pendingHeading = null;
    let rank = this.headingSizes.indexOf(heading.size);
    if (rank < 0) {
      // A size first met after the sample: ranked among those known from here on.
      this.headingSizes = [...this.headingSizes, heading.size].sort((a, b) => b - a);
      rank = this.headingSizes.indexOf(heading.size);
    }
    this.out.heading(Math.min(6, rank + 1), heading.text);
  }

  private write(line: Line): void {
    const { previous, pendingHeading } = this;
    this.previous = line;
    if (this.isHeading(line)) {
      // A heading wrapped over two lines of the same size is one heading.
      if (pendingHeading && pendingHeading.size === line.size && pendingHeading.page === line.page && Math.abs(pendingHeading.y - line.y) < line.size * 1.6) {
        this.pendingHeading = { ...line, text: `${pendingHeading.text.trim()} ${line.text.trim()}` };
      } else {
        this.flushHeading();
        this.pendingHeading = line;
      }
      return;
    }
    this.flushHeading();
    if (previous && (previous.page !== line.page || previous.y - line.y > line.size * 1.8 || previous.y < line.y)) this.out.separate('paragraph');
    else this.out.separate('line');
    this.out.write(line.text.trim());
  }
}

/**
 * The most pages a PDF may have. A page tree may name one page object any number of times, so a
 * file of 1.4 KB declares a million pages, and reading them (~0.5 ms each, text or not) held a
 * thread for the whole KB_EXTRACT_TIMEOUT_SECONDS before failing. Asked before any page is read.
 */
export const MAX_PDF_PAGES = 10_000;

/**
 * The text of a PDF page by page (pdf.js through unpdf), in lines rebuilt from the positioned
 * text items. PDFs have no headings as such: a short line set clearly larger than the body text
 * is taken as one, its level by the rank of its size, which is how the documents people upload
 * (exported from Word, LaTeX, Google Docs) mark them. A PDF without a text layer (a scan) is
 * refused: there is nothing to search.
 *
 * `onText` receives the text in pieces as pages are read, each with the sections it completes (the
 * returned text and spans are then only the rest), so a large document's text is never whole in
 * this thread and can be indexed while it is read; spans count from the start of the first piece.
 * pdf.js takes `data` over (it is detached when this returns).
 */
export async function pdfSpans(data: Uint8Array, maxTextChars: number, maxStreamBytes: number, onText?: (piece: DrainedText) => void): Promise<ExtractedSpans> {
  await checkPdfStreams(data, maxStreamBytes);
  let pdf: Awaited<ReturnType<typeof getDocumentProxy>>;
  try {
    // Text only: no fonts loaded for drawing, no eval, no system fonts, no warnings printed.
    pdf = await getDocumentProxy(data, { isEvalSupported: false, useSystemFonts: false, disableFontFace: true, verbosity: 0 });
  } catch (error) {
    throw pdfError(error);
  }
  if (pdf.numPages > MAX_PDF_PAGES) {
    await pdf.destroy();
    throw new DocumentRejectedError(`the PDF has ${pdf.numPages.toLocaleString('en-US')} pages (at most ${MAX_PDF_PAGES.toLocaleString('en-US')} are read); split it into smaller files`);
  }
  const out = new PdfTextWriter(maxTextChars);
  let chars = 0;
  try {
    for (let pageNumber = 1; pageNumber <= pdf.numPages; pageNumber++) {
      const page = await pdf.getPage(pageNumber);
      const content = await page.getTextContent();
      let current: Line | null = null;
      for (const each of content.items) {
        const item = textItem(each);
        if (!item) continue;
        const size = Math.round(Math.hypot(item.transform[2] ?? 0, item.transform[3] ?? 0) * 10) / 10;
        const y = item.transform[5] ?? 0;
        if (current && Math.abs(current.y - y) > Math.max(1, current.size / 2)) {
          out.add(current);
          current = null;
        }
        if (item.str.length > 0) {
          if (!current) current = { text: '', size, y, page: pageNumber };
          current.text += item.str;
          if (item.str.trim().length > 0) current.size = Math.max(current.size, size);
          chars += item.str.length;
          if (chars > maxTextChars) throw tooMuchText(maxTextChars);
        }
        if (item.hasEOL && current) {
          out.add(current);
          current = null;
        }
      }
      if (current) out.add(current);
      page.cleanup();
      const piece = onText && out.drain();
      if (piece) onText(piece);
    }
  } catch (error) {
    if (error instanceof DocumentRejectedError) throw error;
    throw pdfError(error);
  } finally {
    await pdf.destroy();
  }
  return out.finish();
}
