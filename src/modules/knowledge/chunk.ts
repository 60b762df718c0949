import type { Settings } from '../../core/config.js';

import { pairSafeEnd } from '../../utils/text.js';
import { countTokens, decode, encode } from './tokenizer.js';
import type { DocumentChunk, DocumentSection, ExtractedDocument } from './types.js';

export interface ChunkOptions {
  /** Most tokens in one chunk (overlap included). */
  chunkTokens: number;
  /** Tokens of the previous chunk's end repeated at the start of the next one in the same section. */
  overlapTokens: number;
}

/** Tokens as the embedding and chat models of the o200k family count them (the same encoding as `countTokens` callers expect). */
export { countTokens };

interface Unit {
  /** The text with the whitespace that follows it, so units join back into the original exactly. */
  text: string;
  tokens: number;
}

/**
 * How a too-long piece is cut, coarsest first: paragraphs (blank lines), lines, sentences, words.
 * Each pattern matches the separator; the separator stays with the text before it.
 */
const SEPARATORS = [/\n[ \t\r]*\n\s*/g, /\n\s*/g, /(?<=[.!?;:。！？])["'”’)\]]*\s+/g, /\s+/g];

/** Pieces far longer than a chunk are split without being counted (counting is the costly part). */
const CHARS_PER_TOKEN_CEILING = 8;

/**
 * The pieces of `text`, each ending after a match of `separator`, found as they are asked for: a
 * long section of short pieces (megabytes of words on one line) was split whole into an array of
 * millions of strings, hundreds of MB and seconds of blocked event loop before its first chunk.
 * matchAll runs a copy of the pattern: the generators of nested levels interleave, and would
 * otherwise move each other's `lastIndex`.
 */
function* splitAt(text: string, separator: RegExp): Generator<string> {
  let start = 0;
  for (const match of text.matchAll(separator)) {
    if (match[0].length === 0) continue;
    const end = match.index + match[0].length;
    if (end > start) yield text.slice(start, end);
    start = end;
  }
  if (start < text.length) yield text.slice(start);
}

/** The last resort for text with no separators (a long URL, base64): cut by characters, never inside a surrogate pair. */
function* hardSplit(text: string, maxTokens: number): Generator<Unit> {
  let start = 0;
  while (start < text.length) {
    let length = Math.min(text.length - start, maxTokens * 4);
    for (;;) {
      let end = start + length;
      if (end - 1 > start) end = pairSafeEnd(text, end);
      const piece = text.slice(start, end);
      const tokens = countTokens(piece);
      if (tokens <= maxTokens || end - start <= 1) {
        yield { text: piece, tokens };
        start = end;
        break;
      }
      length = Math.max(1, Math.floor(((end - start) * maxTokens) / tokens * 0.95));
    }
  }
}

/** Cuts `text` into units of at most `maxTokens`, at the coarsest separator that gets there, lazily (a 50 MB section is never cut all at once). */
function* units(text: string, maxTokens: number, level: number): Generator<Unit> {
  if (text.length <= maxTokens * CHARS_PER_TOKEN_CEILING) {
    const tokens = countTokens(text);
    if (tokens <= maxTokens) {
      yield { text, tokens };
      return;
    }
  }
  for (let next = level; next < SEPARATORS.length; next++) {
    const pieces = splitAt(text, SEPARATORS[next]!);
    const first = pieces.next();
    // The whole text in one piece: this separator does not cut it; a finer one may.
    if (first.done || first.value.length === text.length) continue;
    yield* units(first.value, maxTokens, next);
    for (const piece of pieces) yield* units(piece, maxTokens, next);
    return;
  }
  yield* hardSplit(text, maxTokens);
}

/**
 * The end of `text` holding at most `maxTokens` tokens, starting at a word, so the next chunk
 * begins with the words that led into it.
 */
function tail(text: string, maxTokens: number): string {
  if (maxTokens <= 0) return '';
  const encoded = encode(text.slice(-maxTokens * CHARS_PER_TOKEN_CEILING));
  if (encoded.length === 0) return '';
  let piece = decode(encoded.slice(-maxTokens));
  // The first token may be the end of a word (or of a character): start at the next word. Cut on
  // its own, the text can count a token or two more than it did inside the chunk: drop words
  // until it fits.
  for (;;) {
    const wordStart = piece.search(/\s\S/);
    if (wordStart < 0) return '';
    piece = piece.slice(wordStart + 1);
    if (countTokens(piece) <= maxTokens) return piece;
  }
}

/**
 * The chunks of one section, as they are packed: units added while their counts fit the budget,
 * each chunk led by the end of the one before. Counts of separate units can fall a few tokens
 * short of the joined text's (BPE merges across a join), so each chunk is counted as a whole, and
 * one over the budget gives its last units back to the next chunk.
 */
function* sectionChunks(section: DocumentSection, chunkTokens: number, overlapTokens: number): Generator<Omit<DocumentChunk, 'index'>> {
  const source = units(section.text, chunkTokens, 0);
  const givenBack: Unit[] = [];
  const nextUnit = (): Unit | undefined => {
    if (givenBack.length > 0) return givenBack.pop();
    const next = source.next();
    return next.done ? undefined : next.value;
  };
  let lead = '';
  let leadTokens = 0;
  let parts: Unit[] = [];
  let partTokens = 0;
  /** The previous chunk's text, and the whitespace that separated it from what follows. */
  let previous = '';
  let previousGap = '';

  /** The chunk of `lead` + `parts`, made to fit: units it cannot hold go back, then the lead. */
  const pack = (): Omit<DocumentChunk, 'index'> | null => {
    for (;;) {
      const raw = lead + parts.map((part) => part.text).join('');
      const text = raw.trim();
      const tokenCount = countTokens(text);
      if (tokenCount > chunkTokens && parts.length > 1) givenBack.push(parts.pop()!);
      else if (tokenCount > chunkTokens && lead.length > 0) lead = '';
      else {
        previous = raw.trimEnd();
        previousGap = raw.slice(previous.length);
        const trimmedFromStart = raw.length - raw.trimStart().length;
        const leadLength = Math.min(text.length, Math.max(0, lead.length - trimmedFromStart));
        return text.length > 0 ? { text, headingPath: section.headingPath, tokenCount, leadLength } : null;
      }
    }
  };

  for (;;) {
    const unit = nextUnit();
    if (unit && (parts.length === 0 || leadTokens + partTokens + unit.tokens <= chunkTokens)) {
      if (parts.length === 0) {
        // The overlap ends where the previous chunk ended; the separator trimmed from it comes back.
        const overlap = previous ? tail(previous, Math.min(overlapTokens, chunkTokens - unit.tokens)) : '';
        lead = overlap.length > 0 ? overlap + previousGap : '';
        leadTokens = lead.length > 0 ? countTokens(lead) : 0;
      }
      parts.push(unit);
      partTokens += unit.tokens;
      continue;
    }
    if (unit) givenBack.push(unit);
    if (parts.length === 0) return;
    const chunk = pack();
    if (chunk) yield chunk;
    parts = [];
    partTokens = 0;
  }
}

/**
 * Cuts a document's sections into chunks as the sections come (in document order), numbering the
 * chunks across them: the chunks of a document read and indexed at the same time.
 */
export class ChunkCutter {
  private readonly chunkTokens: number;
  private readonly overlapTokens: number;
  private next = 0;

  constructor(opts: ChunkOptions) {
    this.chunkTokens = Math.max(8, Math.floor(opts.chunkTokens));
    // More than half a chunk of overlap would make most of the index repeated text.
    this.overlapTokens = Math.max(0, Math.min(Math.floor(opts.overlapTokens), Math.floor(this.chunkTokens / 2)));
  }

  *cut(sections: Iterable<DocumentSection>): Generator<DocumentChunk> {
    for (const section of sections) {
      for (const chunk of sectionChunks(section, this.chunkTokens, this.overlapTokens)) yield { index: this.next++, ...chunk };
    }
  }
}

/** The chunks of `chunkDocument` one at a time, as they are cut: a caller that stores them as it goes never holds them all. */
export function documentChunks(doc: ExtractedDocument, opts: ChunkOptions): Generator<DocumentChunk> {
  return new ChunkCutter(opts).cut(doc.sections);
}

/**
 * Passages to index: each section on its own (a chunk never spans two sections, so its heading
 * path is true of all its text), cut at paragraphs, then lines, sentences and words, packed up to
 * `chunkTokens` tokens (o200k), each starting with about `overlapTokens` tokens of the previous
 * chunk of its section. Every character of every section is in some chunk, in order, and each
 * chunk's text is a piece of its section's text as it is.
 */
export function chunkDocument(doc: ExtractedDocument, opts: ChunkOptions): DocumentChunk[] {
  return [...documentChunks(doc, opts)];
}

/**
 * `chunkDocument` in slices of `sliceMs` of work with the event loop let in between: counting the
 * tokens of a large document takes seconds, which a process that also answers requests and
 * streams runs must not spend in one go.
 */
export async function chunkDocumentAsync(doc: ExtractedDocument, opts: ChunkOptions, sliceMs = 20): Promise<DocumentChunk[]> {
  const chunks: DocumentChunk[] = [];
  let sliceEnd = performance.now() + sliceMs;
  for (const chunk of documentChunks(doc, opts)) {
    chunks.push(chunk);
    if (performance.now() >= sliceEnd) {
      await new Promise((resolve) => setImmediate(resolve));
      sliceEnd = performance.now() + sliceMs;
    }
  }
  return chunks;
}

/** The chunk sizes a deployment configured. */
export function chunkOptionsFrom(settings: Pick<Settings, 'KB_CHUNK_TOKENS' | 'KB_CHUNK_OVERLAP_TOKENS'>): ChunkOptions {
  return { chunkTokens: settings.KB_CHUNK_TOKENS, overlapTokens: settings.KB_CHUNK_OVERLAP_TOKENS };
}

/**
 * The UTF-8 bytes of a chunk's own text, its lead (the overlap with the chunk before) left out: the
 * chunks of a document add up to its text once. Not what the quota counts: see `chargedChunkBytes`.
 */
export const ownTextBytes = (chunk: Pick<DocumentChunk, 'text' | 'leadLength'>): number => Buffer.byteLength(chunk.text.slice(chunk.leadLength));

/**
 * The least a chunk counts for against KB_MAX_BYTES_PER_USER, however little text it holds. A chunk
 * never spans two sections, so a document of one-character sections (`# h\nx\n` over and over)
 * made a chunk per 6 bytes of file: a 1 MB upload stored 166,666 rows (+43 MB, and as many
 * embedding inputs) while the quota counted 1 MB. What a chunk costs whatever its text, measured
 * on PGlite (pgvector 0.8): ~260 bytes of row and index entries (primary key, entry and place,
 * owner, the tsvector's GIN), and with an embedding of 1536 dimensions ~16.8 KB more (dims × 4
 * bytes in the table and again in the HNSW index, with the graph's links).
 *
 * 512 covers the row twice over, and lets a quota pay for at most one chunk (one embedding input,
 * one vector) per 512 bytes: within ~3x of what ordinary text makes, ~1.4 KB of a chunk's own text
 * at the default 400/60 tokens. The vector's own bytes are not covered for a tiny chunk, as they
 * are not for an ordinary one: the quota counts text, and bounding chunks per byte of it is what
 * bounds the vectors. Not 1024, which moves ordinary documents: with the default chunking, the
 * kb-eval corpus's entries count exactly as before at 512 (their chunks are short, but each entry
 * stays within the 4 KiB it counts for at least) and 15 of its 33 count 25-75 % more at 1024; this
 * repository's README and decisions count +0.7 % and +0.5 % at 512 (+10.7 %, +3.0 % at 1024);
 * reference manuals of many short sections (Node's API docs, a heading and a line or two each)
 * +8-17 % at 512, which they do cost in rows, and +32-57 % at 1024.
 */
export const MIN_CHUNK_CHARGE_BYTES = 512;

/**
 * What a chunk counts for against KB_MAX_BYTES_PER_USER (an entry's `text_bytes` is the sum over
 * its chunks): the UTF-8 bytes of its own text (`ownTextBytes`: the overlap it repeats from the
 * chunk before is counted there, once), at least MIN_CHUNK_CHARGE_BYTES.
 */
export const chargedChunkBytes = (chunk: Pick<DocumentChunk, 'text' | 'leadLength'>): number => Math.max(ownTextBytes(chunk), MIN_CHUNK_CHARGE_BYTES);
