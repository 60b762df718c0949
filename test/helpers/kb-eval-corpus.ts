/**
 * The retrieval-evaluation corpus (test/fixtures/kb-eval) ready to ingest: its documents copied to
 * a directory, with the PDF and DOCX made from their Markdown sources.
 */
import { copyFile, readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';

import { markdownBlocks, writeDocx, writePdf } from './documents.js';

export const KB_EVAL_DIR = new URL('../fixtures/kb-eval/', import.meta.url).pathname;

export interface EvalQuestion {
  id: string;
  question: string;
  /** The file name as ingested. */
  document: string;
  /** Answers the question; found in the document's text once whitespace runs are one space. */
  passage: string;
}

export interface EvalDocument {
  filename: string;
  path: string;
}

export async function loadQuestions(): Promise<EvalQuestion[]> {
  return JSON.parse(await readFile(join(KB_EVAL_DIR, 'questions.json'), 'utf8')) as EvalQuestion[];
}

/** Whitespace runs as one space: how passages are matched against extracted text and chunks. */
export const normalizeSpace = (text: string) => text.replace(/\s+/g, ' ').trim();

/** Writes every document of the corpus into `target` (PDF and DOCX generated) and lists them. */
export async function prepareCorpus(target: string): Promise<EvalDocument[]> {
  const source = join(KB_EVAL_DIR, 'documents');
  const documents: EvalDocument[] = [];
  for (const name of (await readdir(source)).sort()) {
    const generated = /^(.*\.(pdf|docx))\.md$/.exec(name);
    const filename = generated ? generated[1]! : name;
    const path = join(target, filename);
    if (generated) {
      const blocks = markdownBlocks(await readFile(join(source, name), 'utf8'));
      await (generated[2] === 'pdf' ? writePdf(path, blocks) : writeDocx(path, blocks));
    } else {
      await copyFile(join(source, name), path);
    }
    documents.push({ filename, path });
  }
  return documents;
}
