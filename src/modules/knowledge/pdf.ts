import { createInflate } from 'node:zlib';

import { getDocumentProxy } from 'unpdf';

import { type ExtractedSpans, TextBuilder } from './document-builder.js';
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

/**
 * Refuses a PDF whose Flate streams unpack past the bounds, before pdf.js sees it: pdf.js decodes
 * a content stream whole into typed arrays, memory outside the V8 heap that the worker's limit
 * does not cover (a 300 KB PDF whose page unpacks to 300 MB took the process to 1.1 GB). Images
 * are skipped: text extraction never decodes them.
 */
export async function checkPdfStreams(data: Uint8Array, maxStreamBytes: number): Promise<void> {
  const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  let total = 0;
  for (let at = bytes.indexOf('stream'); at >= 0; at = bytes.indexOf('stream', at + 6)) {
    // `endstream` contains `stream`; a stream's data starts after `stream` and its end of line.
    if (at >= 3 && bytes.toString('latin1', at - 3, at) === 'end') continue;
    let start = at + 6;
    if (bytes[start] === 0x0d) start++;
    if (bytes[start] !== 0x0a) continue;
    start++;
    const before = bytes.toString('latin1', Math.max(0, at - 2048), at);
    const dictionary = before.slice(before.lastIndexOf(' obj') + 1);
    if (!dictionary.includes('/FlateDecode') || /\/Subtype\s*\/Image/.test(dictionary)) continue;
    const end = bytes.indexOf('endstream', start);
    const size = await inflatedSize(bytes.subarray(start, end < 0 ? bytes.length : end), Math.min(maxStreamBytes, MAX_TOTAL_INFLATED_BYTES - total));
    if (size > maxStreamBytes) {
      throw new DocumentRejectedError(`the PDF expands to more than ${megabytes(maxStreamBytes)} when one of its parts is unpacked (the limit per part); it is damaged or built to exhaust the reader`);
    }
    total += size;
    if (total >= MAX_TOTAL_INFLATED_BYTES) {
      throw new DocumentRejectedError(`the PDF expands to more than ${megabytes(MAX_TOTAL_INFLATED_BYTES)} when unpacked; split it into smaller files`);
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
 * The text of a PDF page by page (pdf.js through unpdf), in lines rebuilt from the positioned
 * text items. PDFs have no headings as such: a short line set clearly larger than the body text
 * is taken as one, its level by the rank of its size, which is how the documents people upload
 * (exported from Word, LaTeX, Google Docs) mark them. A PDF without a text layer (a scan) is
 * refused: there is nothing to search.
 */
export async function pdfSpans(data: Uint8Array, maxTextChars: number, maxStreamBytes: number): Promise<ExtractedSpans> {
  await checkPdfStreams(data, maxStreamBytes);
  let pdf: Awaited<ReturnType<typeof getDocumentProxy>>;
  try {
    pdf = await getDocumentProxy(data, { isEvalSupported: false, useSystemFonts: false, disableFontFace: true, verbosity: 0 });
  } catch (error) {
    throw pdfError(error);
  }
  const lines: Line[] = [];
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
          lines.push(current);
          current = null;
        }
        if (item.str.length > 0) {
          if (!current) current = { text: '', size, y, page: pageNumber };
          current.text += item.str;
          if (item.str.trim().length > 0) current.size = Math.max(current.size, size);
          chars += item.str.length;
          if (chars > maxTextChars) throw new DocumentRejectedError(`the document holds more than ${maxTextChars.toLocaleString('en-US')} characters of text (the limit per document); split it into smaller files`);
        }
        if (item.hasEOL && current) {
          lines.push(current);
          current = null;
        }
      }
      if (current) lines.push(current);
      page.cleanup();
    }
  } catch (error) {
    if (error instanceof DocumentRejectedError) throw error;
    throw pdfError(error);
  } finally {
    await pdf.destroy();
  }

  const textLines = lines.filter((line) => line.text.trim().length > 0);
  if (textLines.length === 0) {
    throw new DocumentRejectedError('the PDF has no text layer (it may be scanned images); run it through OCR and upload the result');
  }
  const body = bodySize(textLines);
  const isHeading = (line: Line) => line.size >= body * 1.15 && line.text.trim().length <= 200 && /\p{L}/u.test(line.text);
  const headingSizes = [...new Set(textLines.filter(isHeading).map((line) => line.size))].sort((a, b) => b - a);

  const out = new TextBuilder('pdf', maxTextChars);
  let previous: Line | null = null;
  let pendingHeading: Line | null = null;
  const flushHeading = () => {
    if (pendingHeading) out.heading(Math.min(6, headingSizes.indexOf(pendingHeading.size) + 1), pendingHeading.text);
    pendingHeading = null;
  };
  for (const line of textLines) {
    if (isHeading(line)) {
      // A heading wrapped over two lines of the same size is one heading.
      if (pendingHeading && pendingHeading.size === line.size && pendingHeading.page === line.page && Math.abs(pendingHeading.y - line.y) < line.size * 1.6) {
        pendingHeading = { ...line, text: `${pendingHeading.text.trim()} ${line.text.trim()}` };
      } else {
        flushHeading();
        pendingHeading = line;
      }
      previous = line;
      continue;
    }
    flushHeading();
    if (previous && (previous.page !== line.page || previous.y - line.y > line.size * 1.8 || previous.y < line.y)) out.separate('paragraph');
    else out.separate('line');
    out.write(line.text.trim());
    previous = line;
  }
  flushHeading();
  return out.finish();
}
