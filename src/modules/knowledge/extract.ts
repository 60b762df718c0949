import { stat } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';

import type { Settings } from '../../core/config.js';
import { ServiceUnavailableError } from '../../core/errors.js';

import { type DrainedText, type ExtractedSpans, materialize, PieceAssembler } from './document-builder.js';
import type { WorkerInput, WorkerOutput } from './extract-worker.js';
import { markdownSpans } from './markdown.js';
import { sniffFile } from './sniff.js';
import { readText } from './text-reader.js';
import { DocumentRejectedError, type DocumentSection, type ExtractedDocument } from './types.js';

export interface ExtractInput {
  /** The stored file (a local path: the ingestion job copies a remote object to a temporary file first). */
  path: string;
  /** The name the user gave it: only chooses between text formats, never trusted for binaries. */
  filename: string;
  declaredMime?: string;
  /** Stops the extraction (the worker thread is terminated), e.g. when the process shuts down. */
  signal?: AbortSignal;
}

export interface ExtractLimits {
  /** Most characters of extracted text per document (KB_MAX_TEXT_CHARS). */
  maxTextChars: number;
  /** Time for parsing one document before it is abandoned (KB_EXTRACT_TIMEOUT_SECONDS). */
  timeoutMs: number;
  /** Heap of the parsing thread (KB_EXTRACT_MAX_MEMORY_MB). */
  maxMemoryMb: number;
  /** All the memory one document's reading may add to the process, heap and typed arrays (KB_EXTRACT_MAX_TOTAL_MEMORY_MB). */
  maxTotalMemoryMb: number;
}

// ==================== Memory outside the heap ====================

/**
 * How often the process's memory is sampled while a parsing thread runs: pdf.js and JSZip unpack
 * at hundreds of MB a second, so a bomb is stopped within a few dozen MB of the limit.
 */
const MEMORY_SAMPLE_MS = 25;

interface Watched {
  /** The process's resident memory when the thread started. */
  baseline: number;
  limit: number;
  /** Started after every watched thread with a smaller `order`. */
  order: number;
  /** Called once, when the process has grown past `limit` since `baseline`; `alone`: no other parsing thread ran meanwhile, so the growth was this one's. */
  onExceeded: (alone: boolean) => void;
  /** Another parsing thread was watched at some moment while this one was (its growth may be in this one's). */
  shared: boolean;
  exceeded: boolean;
}

const watched = new Set<Watched>();
let sampler: NodeJS.Timeout | null = null;
let started = 0;

/**
 * Whether a thread holds more memory than it may is told from outside it: what the parsers unpack
 * goes into typed arrays, outside the heap that resourceLimits caps, in long synchronous stretches
 * during which the thread itself runs nothing else; Node 20 has no way to read another thread's
 * memory, so the process's resident memory is what is sampled, against its value when the thread
 * started. When parsing threads run side by side, the growth each sees includes the others': the
 * one stopped is the newest of those past their limit (a thread that started earlier sees the same
 * growth and more), and none more until its memory is gone (its thread has exited).
 */
function sampleMemory(): void {
  for (const each of watched) if (each.exceeded) return;
  const rss = process.memoryUsage.rss();
  let culprit: Watched | null = null;
  for (const each of watched) {
    if (rss - each.baseline > each.limit && (!culprit || each.order > culprit.order)) culprit = each;
  }
  if (!culprit) return;
  culprit.exceeded = true;
  culprit.onExceeded(!culprit.shared);
}

/** Calls `onExceeded` if the process grows by more than `limit` bytes before the returned function is called (when the thread has exited). */
function watchMemory(limit: number, onExceeded: (alone: boolean) => void): () => void {
  const entry: Watched = { baseline: process.memoryUsage.rss(), limit, order: started++, onExceeded, exceeded: false, shared: watched.size > 0 };
  for (const each of watched) each.shared = true;
  watched.add(entry);
  // One timer for all the threads; it does not keep the process alive (the threads do).
  sampler ??= setInterval(sampleMemory, MEMORY_SAMPLE_MS).unref();
  return () => {
    watched.delete(entry);
    if (watched.size === 0 && sampler) {
      clearInterval(sampler);
      sampler = null;
    }
  };
}

// ==================== The parsing thread ====================

/**
 * How to start extract-worker next to this module: the compiled `.js` in dist/ directly; the
 * TypeScript source (tsx, vitest) through tsx's loader, registered inside the new thread first
 * because a worker does not inherit the loader of the thread that starts it.
 */
function workerEntry(): { entry: string | URL; eval: boolean } {
  const self = import.meta.url;
  if (!self.endsWith('.ts')) return { entry: new URL('./extract-worker.js', self), eval: false };
  const loader = import.meta.resolve('tsx/esm/api');
  const target = new URL('./extract-worker.ts', self).href;
  return { entry: `import(${JSON.stringify(loader)}).then((tsx) => { tsx.register(); return import(${JSON.stringify(target)}); });`, eval: true };
}

/**
 * The parsing thread's young generation. Parsers allocate short-lived objects at a high rate
 * (pdf.js per glyph), so V8 grows the young generation to its maximum, and what survives a
 * scavenge is promoted into an old generation sized after it: at 32 MB the thread of a 50 MB PDF
 * held 78 MB of heap for 35–50 MB in use; at 8 MB, 45 MB, with the same CPU time (bench/RESULTS.md).
 */
const YOUNG_GENERATION_MB = 8;

const duration = (ms: number) => (ms < 1000 ? `${ms} ms` : `${Math.round(ms / 100) / 10} s`);

/**
 * Parses in a worker thread with a capped heap and a hard time limit: a document built to hang or
 * to exhaust memory ends as a DocumentRejectedError; the process and its other jobs go on. The
 * text the parser hands on as it reads goes to `onPiece`; the outcome is what follows it.
 */
function runInWorker(input: WorkerInput, limits: ExtractLimits, onPiece: (piece: DrainedText) => void, signal?: AbortSignal): Promise<ExtractedSpans> {
  signal?.throwIfAborted();
  const { entry, eval: isEval } = workerEntry();
  return new Promise((resolve, reject) => {
    const worker = new Worker(entry, {
      eval: isEval,
      workerData: input,
      // The parser needs none of the process's settings or secrets, nor its command-line flags
      // (some are refused in a worker: `npm start` passes V8 flags, `node -e` --input-type).
      env: {},
      execArgv: [],
      stdout: true,
      stderr: true,
      resourceLimits: { maxOldGenerationSizeMb: limits.maxMemoryMb, maxYoungGenerationSizeMb: YOUNG_GENERATION_MB, stackSizeMb: 4 },
    });
    // pdf.js and friends print warnings about damaged files; the outcome says what matters.
    worker.stdout.resume();
    worker.stderr.resume();
    let settled = false;
    const settle = (outcome: () => void) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      void worker.terminate();
      outcome();
    };
    const timer = setTimeout(() => {
      settle(() => reject(new DocumentRejectedError(`reading the document took longer than ${duration(limits.timeoutMs)} (the limit); it may be damaged or too complex — split it or re-save it and upload again`)));
    }, limits.timeoutMs);
    // Released when the thread has exited: until then its memory is still the process's.
    const unwatch = watchMemory(limits.maxTotalMemoryMb * 1024 * 1024, (alone) => {
      // Read beside other documents, the growth may be theirs (the process's memory is all that
      // can be measured): tried again later (a 503 is retried, KB_INGEST_MAX_ATTEMPTS), not failed for good.
      const error = alone
        ? new DocumentRejectedError(`reading the document needed more than ${limits.maxTotalMemoryMb} MB of memory in all (the limit); it may be damaged or built to exhaust the reader — split it or re-save it and upload again`)
        : new ServiceUnavailableError(`reading the document was stopped when the process passed ${limits.maxTotalMemoryMb} MB more memory while other documents were read beside it; it is tried again`);
      settle(() => reject(error));
    });
    const onAbort = () => settle(() => reject(signal!.reason instanceof Error ? signal!.reason : new Error('the extraction was aborted')));
    signal?.addEventListener('abort', onAbort, { once: true });

    // The outcome is kept until the thread has stopped, so the pieces are joined (by the caller)
    // once the thread's memory (the file, the parser's heap) is gone rather than on top of it; the
    // time limit runs until then.
    let outcome: WorkerOutput | null = null;
    worker.on('message', (output: WorkerOutput) => {
      if ('piece' in output) {
        if (!settled) onPiece(output.piece);
        return;
      }
      outcome = output;
      void worker.terminate();
    });
    worker.on('error', (error: Error & { code?: string }) => {
      if (outcome) return; // the document was read; what the thread does after does not matter
      settle(() =>
        reject(
          error.code === 'ERR_WORKER_OUT_OF_MEMORY'
            ? new DocumentRejectedError(`reading the document needed more than ${limits.maxMemoryMb} MB of memory (the limit); split it into smaller files`)
            : new DocumentRejectedError(`could not read the document: ${error.message}`),
        ),
      );
    });
    worker.on('exit', (code) => {
      unwatch();
      const output: WorkerOutput | null = outcome;
      settle(() => {
        if (!output || 'piece' in output) reject(new DocumentRejectedError(`could not read the document: the reader stopped (exit code ${code})`));
        else if (!output.ok) reject(output.rejected ? new DocumentRejectedError(output.message) : new DocumentRejectedError(`could not read the document: ${output.message}`));
        else resolve(output.result);
      });
    });
  });
}

// ==================== Extraction ====================

/**
 * The text of an uploaded document and its sections, with the format sniffed from its bytes.
 * Plain text and Markdown are decoded here as they stream from disk (one copy of the text in
 * memory); binaries and the formats that need a parser run in a worker thread under `limits`.
 * Anything Keel cannot read ends in a DocumentRejectedError whose message tells the user why.
 *
 * `onSections` receives sections as soon as they are whole while a long document (PDF) is still
 * being read, in document order, so they can be indexed meanwhile; the returned document then
 * holds only the sections not handed over. Without it, the document holds them all.
 */
export async function extractDocument(input: ExtractInput, limits: ExtractLimits, onSections?: (sections: DocumentSection[]) => void): Promise<ExtractedDocument> {
  const { path, filename, declaredMime, signal } = input;
  signal?.throwIfAborted();
  if ((await stat(path)).size === 0) throw new DocumentRejectedError('the file is empty');
  const format = await sniffFile(path, filename, declaredMime);
  let document: ExtractedDocument;
  let handedOver = false;
  if (format === 'text') {
    const text = await readText(path, filename, limits.maxTextChars);
    document = materialize({ format, text, spans: [[[], 0, text.length]] });
  } else if (format === 'markdown') {
    document = materialize(await markdownSpans(await readText(path, filename, limits.maxTextChars)));
  } else {
    // pdf.js and JSZip (DOCX) unpack into typed arrays, outside the heap limit: a quarter of the
    // thread's memory per compressed part keeps the thread near its allowance.
    const maxStreamBytes = (limits.maxMemoryMb * 1024 * 1024) / 4;
    const pieces = new PieceAssembler(
      onSections &&
        ((sections) => {
          handedOver = true;
          onSections(sections);
        }),
    );
    const rest = await runInWorker({ path, filename, format, maxTextChars: limits.maxTextChars, maxStreamBytes }, limits, (piece) => pieces.add(piece), signal);
    document = pieces.finish(rest);
  }
  signal?.throwIfAborted();
  if (document.sections.length === 0 && !handedOver) throw new DocumentRejectedError('the document holds no text');
  return document;
}

/** The extraction limits a deployment configured. */
export function extractLimitsFrom(settings: Pick<Settings, 'KB_MAX_TEXT_CHARS' | 'KB_EXTRACT_TIMEOUT_SECONDS' | 'KB_EXTRACT_MAX_MEMORY_MB' | 'KB_EXTRACT_MAX_TOTAL_MEMORY_MB'>): ExtractLimits {
  return {
    maxTextChars: settings.KB_MAX_TEXT_CHARS,
    timeoutMs: settings.KB_EXTRACT_TIMEOUT_SECONDS * 1000,
    maxMemoryMb: settings.KB_EXTRACT_MAX_MEMORY_MB,
    maxTotalMemoryMb: settings.KB_EXTRACT_MAX_TOTAL_MEMORY_MB,
  };
}
