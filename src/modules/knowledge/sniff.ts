import { open } from 'node:fs/promises';
import { extname } from 'node:path';

import { fileTypeFromBuffer, fileTypeFromFile } from 'file-type';

import { byteOrderMark, strictDecoder, textEncodingOf } from './text-reader.js';
import { type DocumentFormat, DocumentRejectedError } from './types.js';

/** How much of the start of a file `sniffFormat` looks at (file-type needs ~4 KB; text checks like more). */
export const SNIFF_HEAD_BYTES = 16 * 1024;

export const ACCEPTED_FORMATS = 'plain text (.txt), Markdown (.md), HTML (.html), PDF (.pdf), Word (.docx), CSV (.csv) and JSON (.json)';

const DOCX_MIME = 'application/vnd.openxmlformats-officedocument.wordprocessingml.document';

const TEXT_EXTENSIONS: Record<string, Exclude<DocumentFormat, 'pdf' | 'docx'>> = {
  '.md': 'markdown',
  '.markdown': 'markdown',
  '.mdown': 'markdown',
  '.mkd': 'markdown',
  '.html': 'html',
  '.htm': 'html',
  '.xhtml': 'html',
  '.csv': 'csv',
  '.tsv': 'csv',
  '.json': 'json',
};

const TEXT_MIMES: Record<string, Exclude<DocumentFormat, 'pdf' | 'docx'>> = {
  'text/markdown': 'markdown',
  'text/x-markdown': 'markdown',
  'text/html': 'html',
  'application/xhtml+xml': 'html',
  'text/csv': 'csv',
  'text/tab-separated-values': 'csv',
  'application/json': 'json',
};

/** Binary types people try to upload, with what to do instead. */
const BINARY_ADVICE: Record<string, string> = {
  cfb: 'an old Word .doc or a password-protected Office file; save it as an unprotected .docx',
  doc: 'an old Word .doc; save it as .docx',
  rtf: 'an RTF document; save it as .docx',
  xlsx: 'an Excel workbook; save the sheet as .csv',
  xls: 'an Excel workbook; save the sheet as .csv',
  pptx: 'a PowerPoint presentation; export it as .pdf',
  odt: 'an OpenDocument text; save it as .docx',
  epub: 'an EPUB book; export it as .pdf',
};

function unsupported(what: string): DocumentRejectedError {
  return new DocumentRejectedError(`${what} is not supported; accepted formats: ${ACCEPTED_FORMATS}`);
}

function mimeOf(declaredMime: string | undefined): string {
  return (declaredMime ?? '').split(';')[0]!.trim().toLowerCase();
}

/**
 * The start of a file as text (UTF-8, or UTF-16 with its byte-order mark), or why it is not text.
 * Control characters other than tab, line and page breaks are rare in text and common in binaries
 * that happen to decode (a file of zeros is valid UTF-8).
 */
function headText(head: Uint8Array): { text: string } | { reason: string } {
  const encoding = textEncodingOf(head);
  let text: string;
  try {
    // stream: a character cut by the end of the head is not an error.
    text = strictDecoder(encoding).decode(head, { stream: true });
  } catch {
    return { reason: `holds binary data (it is not ${encoding.label} text)` };
  }
  if (text.includes('\0')) return { reason: 'holds binary data (NUL bytes)' };
  let controls = 0;
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    if ((code < 0x20 && code !== 0x09 && code !== 0x0a && code !== 0x0c && code !== 0x0d) || code === 0x7f) controls++;
  }
  return controls > text.length / 50 ? { reason: 'holds binary data (control characters)' } : { text };
}

/** Whether the start of a text file looks like its claimed format (a `.json` that starts with prose does not). */
function looksLike(format: DocumentFormat, head: string): boolean {
  const start = head.trimStart();
  if (format === 'json') return /^[[{"\d-]|^(true|false|null)\b/.test(start);
  if (format === 'html') return /<[a-z!?/]/i.test(start);
  return true;
}

/**
 * The document's format, from its bytes first: binaries by their signature (file-type), text only
 * when the start is UTF-8 (or UTF-16 with its byte-order mark); the name and the client's type
 * only choose between text formats. Throws DocumentRejectedError with what to do for anything
 * Keel cannot read.
 */
export async function sniffFormat(head: Uint8Array, filename: string, declaredMime?: string): Promise<DocumentFormat> {
  if (head.length === 0) throw new DocumentRejectedError('the file is empty');
  const extension = extname(filename).toLowerCase();
  const mime = mimeOf(declaredMime);
  // A byte-order mark says text, which the decoding below checks: file-type takes UTF-16's FF FE
  // followed by ASCII for an MP3 frame.
  const detected = byteOrderMark(head) ? undefined : await fileTypeFromBuffer(head);
  if (detected) {
    if (detected.ext === 'pdf') return 'pdf';
    if (detected.ext === 'docx') return 'docx';
    // A .docx whose first entries do not show it (file-type reads only the head): the extractor
    // checks for word/document.xml in the archive's directory.
    if (detected.ext === 'zip' && (extension === '.docx' || mime === DOCX_MIME)) return 'docx';
    // file-type recognises some text (XML, SVG): those go on to the text checks.
    if (!detected.mime.startsWith('text/') && detected.ext !== 'xml' && detected.ext !== 'svg') {
      const advice = BINARY_ADVICE[detected.ext];
      if (advice) throw new DocumentRejectedError(`${filename} is ${advice}`);
      if (extension in TEXT_EXTENSIONS || extension === '.txt') {
        throw new DocumentRejectedError(`not a text file: ${filename} holds ${detected.mime} data; accepted formats: ${ACCEPTED_FORMATS}`);
      }
      throw unsupported(`${filename} is of type ${detected.mime}, which`);
    }
  }
  const decoded = headText(head);
  if ('reason' in decoded) {
    if (extension === '.pdf' || extension === '.docx') throw new DocumentRejectedError(`${filename} is not a ${extension === '.pdf' ? 'PDF' : 'Word document'}: its content does not match its name`);
    throw new DocumentRejectedError(`not a text file: ${filename} ${decoded.reason}; accepted formats: ${ACCEPTED_FORMATS}`);
  }
  const claimed = TEXT_EXTENSIONS[extension] ?? TEXT_MIMES[mime];
  const start = decoded.text.slice(0, 1024);
  if (claimed && looksLike(claimed, start)) return claimed;
  if (claimed === 'json') throw new DocumentRejectedError(`${filename} is not valid JSON: it does not start with a JSON value`);
  // A page saved without an .html name is still a page.
  if (!claimed && /^\s*(<!doctype html|<html[\s>])/i.test(start)) return 'html';
  return 'text';
}

/**
 * `sniffFormat` on the start of a stored file. A zip is first looked into as far as file-type
 * needs (its entries name a Word document), so a .docx is known by its content, whatever its name.
 */
export async function sniffFile(path: string, filename: string, declaredMime?: string): Promise<DocumentFormat> {
  if ((await fileTypeFromFile(path))?.ext === 'docx') return 'docx';
  const file = await open(path, 'r');
  try {
    const head = new Uint8Array(SNIFF_HEAD_BYTES);
    const { bytesRead } = await file.read(head, 0, SNIFF_HEAD_BYTES, 0);
    return await sniffFormat(head.subarray(0, bytesRead), filename, declaredMime);
  } finally {
    await file.close();
  }
}
