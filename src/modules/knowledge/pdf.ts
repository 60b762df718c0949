import { createInflate } from 'node:zlib';

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

/**
 * Refuses a PDF whose compressed streams unpack past the bounds, before pdf.js sees it: pdf.js
 * decodes a content stream whole into typed arrays, memory outside the V8 heap that the worker's
 * limit does not cover (a 300 KB PDF whose page unpacks to 300 MB took the process to 1.1 GB).
 * Every stream is unpacked as Flate whatever its dictionary declares (data that is not zlib fails
 * at its first bytes), so no spelling of the filter hides one; only images are skipped (text
 * extraction never decodes them), when their own dictionary says so outside comments and strings.
 * A page compressed otherwise (LZW, run-length) is left to the memory watch of extract.ts.
 */
export async function checkPdfStreams(data: Uint8Array, maxStreamBytes: number): Promise<void> {
  const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  let total = 0;
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
    const from = Math.max(searched, at - MAX_DICTIONARY_CHARS);
    searched = end < 0 ? bytes.length : end + 9;
    // The dictionary runs from its object's `obj` (a string could say `obj` too, or `/Subtype
    // /Image`: a page may as well declare itself an image, which pdf.js ignores; the memory watch
    // of extract.ts bounds what these checks let through).
    const objectAt = bytes.subarray(from, at).lastIndexOf('obj');
    if (objectAt >= 0 && /\/Subtype\s*\/Image(?![^\s/<>[\]()%{}])/.test(streamDictionary(bytes.toString('latin1', from + objectAt + 3, at)))) continue;
    const size = await inflatedSize(beforeFlate(bytes.subarray(start, end < 0 ? bytes.length : end)), Math.min(maxStreamBytes, MAX_TOTAL_INFLATED_BYTES - total));
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
