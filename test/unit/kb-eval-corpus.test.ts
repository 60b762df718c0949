import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { chargedBytes } from '../../src/crud/knowledge.js';
import { chargedChunkBytes, chunkDocument, ownTextBytes } from '../../src/modules/knowledge/chunk.js';
import { extractDocument } from '../../src/modules/knowledge/extract.js';
import { DOCUMENT_FORMATS, type DocumentChunk, type ExtractedDocument } from '../../src/modules/knowledge/types.js';
import { type EvalDocument, type EvalQuestion, loadQuestions, normalizeSpace, prepareCorpus } from '../helpers/kb-eval-corpus.js';

/** The retrieval corpus stays usable: every question's passage is in its document, whole in one chunk. */
describe('knowledge-base evaluation corpus', () => {
  let dir: string;
  let documents: EvalDocument[];
  let questions: EvalQuestion[];
  const extracted = new Map<string, { doc: ExtractedDocument; chunks: DocumentChunk[] }>();

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'keel-kb-eval-'));
    documents = await prepareCorpus(dir);
    questions = await loadQuestions();
    for (const { filename, path } of documents) {
      const doc = await extractDocument({ path, filename }, { maxTextChars: 1_000_000, timeoutMs: 30_000, maxMemoryMb: 128, maxTotalMemoryMb: 512 });
      extracted.set(filename, { doc, chunks: chunkDocument(doc, { chunkTokens: 400, overlapTokens: 60 }) });
    }
  }, 120_000);
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('has at least 30 documents in every format and 60 questions with distinct ids', () => {
    expect(documents.length).toBeGreaterThanOrEqual(30);
    expect(new Set([...extracted.values()].map(({ doc }) => doc.format))).toEqual(new Set(DOCUMENT_FORMATS));
    expect(questions.length).toBeGreaterThanOrEqual(60);
    expect(new Set(questions.map((q) => q.id)).size).toBe(questions.length);
  });

  it('finds each passage in its document and whole in one of its chunks', () => {
    const problems: string[] = [];
    for (const question of questions) {
      const entry = extracted.get(question.document);
      if (!entry) {
        problems.push(`${question.id}: no document ${question.document}`);
        continue;
      }
      const passage = normalizeSpace(question.passage);
      if (!normalizeSpace(entry.doc.text).includes(passage)) problems.push(`${question.id}: passage not in ${question.document}`);
      else if (!entry.chunks.some((chunk) => normalizeSpace(chunk.text).includes(passage))) problems.push(`${question.id}: passage split across chunks`);
    }
    expect(problems).toEqual([]);
  });

  it('counts each document against the quota as its text alone would: short chunks rounded up to the minimum change no entry', async () => {
    // The corpus's documents are ordinary ones, of short sections (~170 bytes of text a chunk at
    // the median): each chunk counting for at least MIN_CHUNK_CHARGE_BYTES leaves every entry at
    // what its file, or the least an entry counts for, made it count already.
    const changed: string[] = [];
    for (const { filename, path } of documents) {
      const { chunks } = extracted.get(filename)!;
      const { size } = await stat(path);
      const asText = chargedBytes(size, chunks.reduce((sum, chunk) => sum + ownTextBytes(chunk), 0));
      const counted = chargedBytes(size, chunks.reduce((sum, chunk) => sum + chargedChunkBytes(chunk), 0));
      if (counted !== asText) changed.push(`${filename}: ${asText} -> ${counted}`);
    }
    expect(changed).toEqual([]);
  });

  it('asks about every document', () => {
    const asked = new Set(questions.map((q) => q.document));
    expect(documents.filter((d) => !asked.has(d.filename)).map((d) => d.filename)).toEqual([]);
  });
});
