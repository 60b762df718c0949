/**
 * The thread that parses one untrusted document (see runInWorker in extract.ts): its heap is
 * capped and it is terminated at the time limit, so a hostile file costs the thread, never the
 * process. Posts `{ok: true, result}` or `{ok: false, rejected, message}`.
 */
import { readFile } from 'node:fs/promises';
import { parentPort, workerData } from 'node:worker_threads';

import { type DrainedText, type ExtractedSpans, TextBuilder } from './document-builder.js';
import { readText, readTextChunks } from './text-reader.js';
import { DocumentRejectedError } from './types.js';

export interface WorkerInput {
  path: string;
  filename: string;
  format: 'pdf' | 'docx' | 'html' | 'csv' | 'json';
  maxTextChars: number;
  /** Most bytes one compressed part of a PDF or the markup of a DOCX may unpack to (memory the heap limit does not cover). */
  maxStreamBytes: number;
}

/**
 * Text as it is read (PDF), with the sections it completes, then the outcome: `{ok: true, result}`
 * whose text and spans are what follows the pieces, or `{ok: false, rejected, message}`.
 */
export type WorkerOutput = { piece: DrainedText } | { ok: true; result: ExtractedSpans } | { ok: false; rejected: boolean; message: string };

const port = parentPort!;

/** Each parser is loaded only for its format: a thread lives for one document, and pdf.js alone takes a good part of a second to load. */
async function parse({ path, filename, format, maxTextChars, maxStreamBytes }: WorkerInput): Promise<ExtractedSpans> {
  switch (format) {
    case 'pdf': {
      const { pdfSpans } = await import('./pdf.js');
      // The file's own bytes, not a copy (pdf.js copies a Buffer it is given); the text leaves
      // the thread as pages are read, so neither the text nor the file is held twice.
      const file = await readFile(path);
      return pdfSpans(new Uint8Array(file.buffer, file.byteOffset, file.byteLength), maxTextChars, maxStreamBytes, (piece) => port.postMessage({ piece } satisfies WorkerOutput));
    }
    case 'docx': {
      const { docxSpans } = await import('./docx.js');
      return docxSpans(path, maxTextChars, maxStreamBytes);
    }
    case 'html': {
      const { HtmlTextReader } = await import('./html.js');
      // The markup may be many times the text: the limit applies to the text, and the page is
      // parsed as it is read.
      const reader = new HtmlTextReader(new TextBuilder('html', maxTextChars));
      for await (const piece of readTextChunks(path, filename, Number.MAX_SAFE_INTEGER)) reader.write(piece);
      return reader.finish();
    }
    case 'csv': {
      const { csvSpans } = await import('./structured.js');
      return csvSpans(await readText(path, filename, maxTextChars), maxTextChars);
    }
    case 'json': {
      const { jsonSpans } = await import('./structured.js');
      return jsonSpans(await readText(path, filename, maxTextChars), maxTextChars);
    }
  }
}

parse(workerData as WorkerInput).then(
  (result) => port.postMessage({ ok: true, result } satisfies WorkerOutput),
  (error: unknown) => {
    const rejected = error instanceof DocumentRejectedError;
    port.postMessage({ ok: false, rejected, message: error instanceof Error ? error.message : String(error) } satisfies WorkerOutput);
  },
);
