import { readdirSync, readFileSync } from 'node:fs';

import { countTokens } from 'gpt-tokenizer/encoding/o200k_base';
import { describe, expect, it } from 'vitest';

import { ConfigError, loadSettings } from '../../src/core/config.js';

import { chargedChunkBytes, chunkDocument, chunkDocumentAsync, chunkOptionsFrom, documentChunks, MIN_CHUNK_CHARGE_BYTES, ownTextBytes } from '../../src/modules/knowledge/chunk.js';
import type { DocumentChunk, DocumentSection, ExtractedDocument } from '../../src/modules/knowledge/types.js';

/** Deterministic prose: sentences of varied length in paragraphs of varied length. */
function prose(seed: number, paragraphs: number): string {
  let state = seed;
  const next = (n: number) => {
    state = (state * 1103515245 + 12345) % 2 ** 31;
    return state % n;
  };
  const words = ['arm', 'joint', 'torque', 'sensor', 'calibration', 'controller', 'gripper', 'firmware', 'Keel', 'operator', 'payload', 'axis', 'the', 'of', 'and', 'within', 'milliseconds', 'safety', 'stop', 'grease'];
  const out: string[] = [];
  for (let p = 0; p < paragraphs; p++) {
    const sentences: string[] = [];
    for (let s = 0, n = 1 + next(8); s < n; s++) {
      const sentence = Array.from({ length: 4 + next(25) }, () => words[next(words.length)]!).join(' ');
      sentences.push(`${sentence[0]!.toUpperCase()}${sentence.slice(1)}${['.', '!', '?', '.'][next(4)]}`);
    }
    out.push(sentences.join(' '));
  }
  return out.join('\n\n');
}

function doc(sections: DocumentSection[]): ExtractedDocument {
  return { format: 'text', text: sections.map((s) => s.text).join('\n\n'), sections };
}

/**
 * The invariants: every chunk is a piece of its own section's text (so it crosses no section and
 * changes nothing), within the token budget with an exact count, in order; together the chunks of
 * a section cover every non-space character of it; a chunk after the first in a section starts
 * with the end of the one before.
 */
function checkChunks(chunks: DocumentChunk[], sections: DocumentSection[], chunkTokens: number, overlapTokens: number) {
  expect(chunks.map((c) => c.index)).toEqual(chunks.map((_, i) => i));
  let at = 0;
  let overlaps = 0;
  for (const section of sections) {
    const covered = new Uint8Array(section.text.length);
    let searchFrom = 0;
    let previous: DocumentChunk | null = null;
    let previousStart = 0;
    while (at < chunks.length && chunks[at]!.headingPath === section.headingPath) {
      const chunk = chunks[at]!;
      expect(chunk.tokenCount).toBe(countTokens(chunk.text));
      expect(chunk.tokenCount).toBeLessThanOrEqual(chunkTokens);
      expect(chunk.text).toBe(chunk.text.trim());
      expect(chunk.text).not.toMatch(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/);
      // Where the chunk is: its text's first place after the previous chunk's start that overlaps
      // that chunk by at most the overlap (a short chunk's text, "it", may also occur inside the
      // chunk before, "unwritten", where it is not; a place further on leaves text uncovered).
      let start = section.text.indexOf(chunk.text, searchFrom);
      const previousEnd = previous ? previousStart + previous.text.length : 0;
      while (start >= 0 && start < previousEnd && countTokens(section.text.slice(start, previousEnd)) > overlapTokens) start = section.text.indexOf(chunk.text, start + 1);
      expect(start, `chunk ${chunk.index} is a piece of its section`).toBeGreaterThanOrEqual(0);
      covered.fill(1, start, start + chunk.text.length);
      if (previous) {
        if (start < previousEnd) {
          overlaps++;
          const overlap = section.text.slice(start, previousEnd);
          expect(previous.text.endsWith(overlap)).toBe(true);
          expect(countTokens(overlap)).toBeLessThanOrEqual(overlapTokens);
        }
      }
      searchFrom = start + 1;
      previousStart = start;
      previous = chunk;
      at++;
    }
    for (let i = 0; i < section.text.length; i++) {
      if (!covered[i] && /\S/.test(section.text[i]!)) expect.unreachable(`character ${i} of section "${section.headingPath.join(' > ')}" is in no chunk`);
    }
  }
  expect(at).toBe(chunks.length);
  return { overlaps };
}

describe('chunkDocument', () => {
  it('packs paragraphs into chunks within the budget, each overlapping the one before', () => {
    const sections = [{ headingPath: ['Manual'], text: prose(1, 120) }];
    const chunks = chunkDocument(doc(sections), { chunkTokens: 200, overlapTokens: 30 });
    expect(chunks.length).toBeGreaterThan(10);
    const { overlaps } = checkChunks(chunks, sections, 200, 30);
    expect(overlaps).toBe(chunks.length - 1);
    // Packed, not one paragraph a chunk: most chunks are well filled.
    const filled = chunks.filter((c) => c.tokenCount > 120).length;
    expect(filled / chunks.length).toBeGreaterThan(0.7);
  });

  it('never crosses a section and keeps each section\'s heading path', () => {
    const sections: DocumentSection[] = [
      { headingPath: ['Guide'], text: prose(2, 3) },
      { headingPath: ['Guide', 'Install'], text: prose(3, 30) },
      { headingPath: ['Guide', 'Install', 'Linux'], text: 'Use apt.' },
      { headingPath: ['Appendix'], text: prose(4, 12) },
    ];
    const chunks = chunkDocument(doc(sections), { chunkTokens: 120, overlapTokens: 20 });
    checkChunks(chunks, sections, 120, 20);
    expect(chunks.find((c) => c.text === 'Use apt.')?.headingPath).toEqual(['Guide', 'Install', 'Linux']);
    expect(new Set(chunks.map((c) => c.headingPath.join(' > ')))).toEqual(new Set(['Guide', 'Guide > Install', 'Guide > Install > Linux', 'Appendix']));
  });

  it('splits a paragraph too long for one chunk at sentences, then words, then characters', () => {
    const sentences = prose(5, 40).replace(/\n\n/g, ' ');
    const words = Array.from({ length: 3000 }, (_, i) => `word${i}`).join(' ');
    const blob = Buffer.from(Array.from({ length: 6000 }, (_, i) => i % 256)).toString('base64');
    // Numbered, so no stretch repeats and each chunk has one place in its section.
    const cjk = Array.from({ length: 200 }, (_, i) => `機械の腕${i}は十二の関節を持つ。`).join('');
    const emoji = Array.from({ length: 600 }, (_, i) => `🤖${i}🦾`).join('');
    const sections = [sentences, words, blob, cjk, emoji].map((text, i) => ({ headingPath: [`part ${i}`], text }));
    const chunks = chunkDocument(doc(sections), { chunkTokens: 64, overlapTokens: 8 });
    checkChunks(chunks, sections, 64, 8);
    // At a sentence end where one fits.
    const sentenceChunks = chunks.filter((c) => c.headingPath[0] === 'part 0');
    expect(sentenceChunks.slice(0, -1).filter((c) => /[.!?]$/.test(c.text)).length / (sentenceChunks.length - 1)).toBeGreaterThan(0.8);
  });

  it('without overlap, the chunks of a section are its text in order, once', () => {
    const sections = [{ headingPath: [], text: prose(6, 60) }];
    const chunks = chunkDocument(doc(sections), { chunkTokens: 100, overlapTokens: 0 });
    const { overlaps } = checkChunks(chunks, sections, 100, 0);
    expect(overlaps).toBe(0);
    expect(chunks.map((c) => c.text).join(' ').split(/\s+/)).toEqual(sections[0]!.text.split(/\s+/));
  });

  it("marks each chunk's lead: the chunks' own texts are the section's text once, the overlap left out", () => {
    for (const [text, chunkTokens, overlapTokens] of [
      [prose(10, 60), 100, 30],
      [prose(11, 40), 64, 32],
      // No white space to cut at: pieces of words, without a lead.
      ['x'.repeat(3_000), 50, 20],
      ['日本語のテキスト。'.repeat(300), 60, 20],
    ] as const) {
      const sections = [{ headingPath: [], text }];
      const chunks = chunkDocument(doc(sections), { chunkTokens, overlapTokens });
      // Text without white space has no word to start an overlap at (see `tail`).
      if (/\s/.test(text)) expect(chunks.filter((chunk) => chunk.leadLength > 0).length).toBeGreaterThan(chunks.length / 2);
      expect(chunks[0]!.leadLength).toBe(0);
      for (const chunk of chunks) expect(chunk.text.slice(0, chunk.leadLength)).toBe(chunk.text.slice(0, chunk.leadLength).trimStart());
      const own = chunks.map((chunk) => chunk.text.slice(chunk.leadLength)).join('');
      expect(own.replace(/\s+/g, '')).toBe(text.replace(/\s+/g, ''));
      expect(chunks.reduce((sum, chunk) => sum + ownTextBytes(chunk), 0)).toBeLessThanOrEqual(Buffer.byteLength(text));
    }
  });

  it('counts each chunk against the quota for its own text, at least MIN_CHUNK_CHARGE_BYTES: a section of one character is no cheaper a row', () => {
    expect(MIN_CHUNK_CHARGE_BYTES).toBe(512);
    // Markdown's `# h\nx\n` over and over: a section, and a chunk, per heading.
    const tiny = Array.from({ length: 1_000 }, (_, i) => ({ headingPath: [`h${i}`], text: 'x' }));
    const tinyChunks = chunkDocument(doc(tiny), { chunkTokens: 400, overlapTokens: 60 });
    expect(tinyChunks).toHaveLength(1_000);
    expect(tinyChunks.reduce((sum, chunk) => sum + chargedChunkBytes(chunk), 0)).toBe(1_000 * MIN_CHUNK_CHARGE_BYTES);
    // Long sections: every chunk but a section's last holds more than the minimum, and counts its own text, the lead left out.
    const long = [{ headingPath: [], text: prose(10, 60) }];
    const chunks = chunkDocument(doc(long), { chunkTokens: 400, overlapTokens: 60 });
    expect(chunks.length).toBeGreaterThan(3);
    for (const chunk of chunks.slice(0, -1)) expect(chargedChunkBytes(chunk)).toBe(ownTextBytes(chunk));
    for (const chunk of chunks.slice(1, -1)) expect(chargedChunkBytes(chunk)).toBeLessThan(Buffer.byteLength(chunk.text));
    expect(chargedChunkBytes(chunks.at(-1)!)).toBe(Math.max(MIN_CHUNK_CHARGE_BYTES, ownTextBytes(chunks.at(-1)!)));
  });

  it('keeps the overlap within half a chunk and drops it where the next piece fills the chunk', () => {
    const sections = [{ headingPath: [], text: prose(7, 40) }];
    checkChunks(chunkDocument(doc(sections), { chunkTokens: 80, overlapTokens: 500 }), sections, 80, 40);
  });

  it('stays within the budget on varied real text, where joined units count differently from their parts', () => {
    // Markdown lists, code, tables, CSV and JSON: BPE merges across a join, so the sum of the
    // units' counts can be short of the chunk's; such a chunk gives units back.
    const folder = new URL('../fixtures/kb-eval/documents/', import.meta.url);
    const texts = [...readdirSync(folder).map((name) => readFileSync(new URL(name, folder), 'utf8')), readFileSync(new URL('../../src/core/config.ts', import.meta.url), 'utf8')];
    for (const chunkTokens of [16, 23, 64]) {
      for (const overlapTokens of [0, Math.floor(chunkTokens / 2)]) {
        for (const text of texts) {
          const sections = [{ headingPath: [], text }];
          checkChunks(chunkDocument(doc(sections), { chunkTokens, overlapTokens }), sections, chunkTokens, overlapTokens);
        }
      }
    }
  });

  it('chunks the same in slices, letting the event loop run between them', async () => {
    const document = doc([{ headingPath: ['A'], text: prose(8, 400) }, { headingPath: ['B'], text: prose(9, 50) }]);
    let ticks = 0;
    const ticking = setInterval(() => ticks++, 0);
    try {
      expect(await chunkDocumentAsync(document, { chunkTokens: 100, overlapTokens: 10 }, 1)).toEqual(chunkDocument(document, { chunkTokens: 100, overlapTokens: 10 }));
    } finally {
      clearInterval(ticking);
    }
    expect(ticks).toBeGreaterThan(0);
  });

  it('cuts a section of short words lazily: its first chunk comes without the section split into all its words at once', () => {
    // 4 MB with no line or sentence break (a list on one line, a minified file): cut at words only.
    // Split whole, it was an array of 2 million strings (~110 MB; ~530 MB and 3 s of blocked event
    // loop for a 20 MB upload, the default KB_MAX_FILE_BYTES) before the first chunk came.
    const text = '- '.repeat(2_000_000);
    const chunks = documentChunks(doc([{ headingPath: [], text }]), { chunkTokens: 100, overlapTokens: 10 });
    const before = process.memoryUsage().heapUsed;
    const first = chunks.next();
    const grown = process.memoryUsage().heapUsed - before;
    expect(first.done).toBe(false);
    const head = first.value as DocumentChunk;
    expect(text.startsWith(head.text)).toBe(true);
    expect(grown).toBeLessThan(32 * 1024 * 1024);
    // And the rest as before: every chunk in the budget, their own texts (the overlap left out) every word once.
    const dashes = (chunk: DocumentChunk) => chunk.text.slice(chunk.leadLength).split('-').length - 1;
    let words = dashes(head);
    for (const chunk of chunks) {
      expect(chunk.tokenCount).toBeLessThanOrEqual(100);
      words += dashes(chunk);
    }
    expect(words).toBe(2_000_000);
  });

  it('chunks text that names special tokens (`<|endoftext|>`) like any other text', () => {
    const text = Array.from({ length: 40 }, (_, i) => `Step ${i}: the model stops at <|endoftext|> and <|im_end|> markers.`).join('\n\n');
    const chunks = chunkDocument(doc([{ headingPath: ['Tokens'], text }]), { chunkTokens: 64, overlapTokens: 8 });
    expect(chunks.length).toBeGreaterThan(5);
    expect(chunks.every((chunk) => chunk.tokenCount <= 64)).toBe(true);
    expect(chunks[0]!.text).toContain('<|endoftext|>');
  });

  it('returns nothing for a document without sections', () => {
    expect(chunkDocument(doc([]), { chunkTokens: 100, overlapTokens: 10 })).toEqual([]);
  });

  it('reads its sizes from the settings, which refuse an overlap over half a chunk', () => {
    const settings = loadSettings({ DATA_DIR: '/tmp/keel-chunk-test', SECRET_KEY: 'k'.repeat(40) });
    expect(chunkOptionsFrom(settings)).toEqual({ chunkTokens: 400, overlapTokens: 60 });
    expect(() => loadSettings({ DATA_DIR: '/tmp/keel-chunk-test', SECRET_KEY: 'k'.repeat(40), KB_CHUNK_TOKENS: '100', KB_CHUNK_OVERLAP_TOKENS: '60' })).toThrow(ConfigError);
  });
});
