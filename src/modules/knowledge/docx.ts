import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';

import mammoth from 'mammoth';
import yauzl from 'yauzl';

import { type ExtractedSpans, TextBuilder } from './document-builder.js';
import { HtmlTextReader } from './html.js';
import { DocumentRejectedError } from './types.js';

/** Everything in the archive, pictures included, unpacked: far past any real document. */
const MAX_TOTAL_BYTES = 1024 * 1024 * 1024;
const MAX_ENTRIES = 10_000;
/** Markup per character of text: Word's XML rarely takes more than a few dozen bytes per character. */
const XML_BYTES_PER_TEXT_CHAR = 20;

const megabytes = (bytes: number) => `${Math.ceil(bytes / (1024 * 1024)).toLocaleString('en-US')} MB`;

function expandsTooMuch(what: string, bytes: number, limit: number): DocumentRejectedError {
  return new DocumentRejectedError(`the document expands to more than ${megabytes(limit)} when unpacked (${what}: ${megabytes(bytes)}); it is damaged or built to exhaust the reader`);
}

function unreadable(error: unknown): DocumentRejectedError {
  // The XML parser's messages run on with positions over several lines: the first says it.
  const reason = ((error as Error).message || String(error)).split('\n', 1)[0]!.replace(/\s+/g, ' ').trim();
  return new DocumentRejectedError(`could not read the Word document: ${reason}; it may be damaged — re-save it as .docx and upload again`);
}

/** The parts the converter unpacks by their names (XML and relationships), as opposed to pictures and embedded files. */
const isMarkup = (name: string) => /\.(xml|rels)$/i.test(name);

interface MammothZip {
  exists(name: string): boolean;
}
const require = createRequire(import.meta.url);
// Not mammoth's public API (it has none for this): the very function it finds its parts with, so
// the parts checked are the ones it reads, whatever the relationships say.
const mammothZip = require('mammoth/lib/zipfile') as { openArrayBuffer(buffer: Buffer): Promise<MammothZip> };
const mammothReader = require('mammoth/lib/docx/docx-reader') as { _findPartPaths(zip: MammothZip): Promise<Record<string, string>> };

/**
 * The parts the converter reads as markup besides those named .xml or .rels: the main document and
 * the parts it relates to (styles, numbering, notes, comments) are wherever the relationships point,
 * under any name (`_rels/.rels` may name `word/main.bin`). Only the relationships are unpacked here.
 */
async function namedParts(path: string): Promise<string[]> {
  const zip = await mammothZip.openArrayBuffer(await readFile(path));
  const parts = await mammothReader._findPartPaths(zip);
  return Object.values(parts).filter((name) => zip.exists(name));
}

function openZip(path: string): Promise<yauzl.ZipFile> {
  return new Promise((resolve, reject) => {
    yauzl.open(path, { lazyEntries: true, autoClose: false, validateEntrySizes: true, strictFileNames: false }, (error, zip) => (error ? reject(error) : resolve(zip)));
  });
}

/** Unpacks one entry and drops the bytes: yauzl fails the stream when it holds more than the directory declares. */
function drain(zip: yauzl.ZipFile, entry: yauzl.Entry): Promise<void> {
  return new Promise((resolve, reject) => {
    zip.openReadStream(entry, (error, stream) => {
      if (error) return reject(error);
      stream.on('data', () => {});
      stream.on('end', () => resolve());
      stream.on('error', reject);
    });
  });
}

/**
 * Checks a DOCX before the converter unpacks it (JSZip inflates whole entries in memory, with no
 * bound): the sizes in the zip's central directory must stay within bounds, and every markup entry
 * (every part the converter reads, whatever its name) is inflated once, streaming, to prove it
 * holds no more than it declares — a zip bomb, whether it declares its size or lies about it, is
 * refused before it costs memory.
 */
export async function checkDocxArchive(path: string, maxTextChars: number, maxStreamBytes: number): Promise<void> {
  let zip: yauzl.ZipFile;
  try {
    zip = await openZip(path);
  } catch (error) {
    throw unreadable(error);
  }
  // JSZip unpacks into typed arrays, outside the thread's heap limit, like pdf.js: the markup is
  // also held to the share of memory a PDF's parts get.
  const maxMarkupBytes = Math.min(Math.max(XML_BYTES_PER_TEXT_CHAR * maxTextChars, 16 * 1024 * 1024), maxStreamBytes);
  try {
    if (zip.entryCount > MAX_ENTRIES) throw new DocumentRejectedError(`the Word document holds ${zip.entryCount.toLocaleString('en-US')} parts (at most ${MAX_ENTRIES.toLocaleString('en-US')} are read); it is damaged or not a real document`);
    const entries: yauzl.Entry[] = [];
    const markup: yauzl.Entry[] = [];
    let total = 0;
    let markupTotal = 0;
    /** Counts a part the converter reads; what it costs past the bounds, as the refusal. */
    const addMarkup = (entry: yauzl.Entry): DocumentRejectedError | null => {
      markup.push(entry);
      markupTotal += entry.uncompressedSize;
      if (entry.uncompressedSize > maxMarkupBytes) return expandsTooMuch(entry.fileName, entry.uncompressedSize, maxMarkupBytes);
      if (markupTotal > maxMarkupBytes) return expandsTooMuch('its text and layout', markupTotal, maxMarkupBytes);
      return null;
    };
    await new Promise<void>((resolve, reject) => {
      zip.on('entry', (entry: yauzl.Entry) => {
        entries.push(entry);
        total += entry.uncompressedSize;
        const refused = isMarkup(entry.fileName) ? addMarkup(entry) : null;
        if (refused) return reject(refused);
        if (total > MAX_TOTAL_BYTES) return reject(expandsTooMuch('everything in it', total, MAX_TOTAL_BYTES));
        zip.readEntry();
      });
      zip.on('end', resolve);
      zip.on('error', reject);
      zip.readEntry();
    });
    if (!entries.some((entry) => entry.fileName === 'word/document.xml')) throw new DocumentRejectedError('not a Word document: the archive has no word/document.xml; save it as .docx from a word processor');
    // The relationships are proved first: the converter's own reading of them unpacks them whole.
    for (const entry of markup) await drain(zip, entry);
    const drained = markup.length;
    for (const name of await namedParts(path)) {
      const named = entries.filter((entry) => entry.fileName === name);
      // The converter and yauzl read names alike except one neither UTF-8 nor flagged as such: a part
      // this check cannot find is one it cannot bound.
      if (named.length === 0) throw new DocumentRejectedError(`could not read the Word document: the name of its part ${name} is not valid UTF-8; it may be damaged — re-save it as .docx and upload again`);
      for (const entry of named) {
        const refused = isMarkup(entry.fileName) ? null : addMarkup(entry);
        if (refused) throw refused;
      }
    }
    for (const entry of markup.slice(drained)) await drain(zip, entry);
  } catch (error) {
    if (error instanceof DocumentRejectedError) throw error;
    throw unreadable(error);
  } finally {
    zip.close();
  }
}

/** A DOCX as HTML (mammoth maps Word's heading styles to h1–h6), read like any HTML page. */
export async function docxSpans(path: string, maxTextChars: number, maxStreamBytes: number): Promise<ExtractedSpans> {
  await checkDocxArchive(path, maxTextChars, maxStreamBytes);
  let html: string;
  try {
    const result = await mammoth.convertToHtml(
      { path },
      {
        // Pictures are never unpacked (there is no text in them), and a picture linked to a file
        // outside the document is never read.
        convertImage: mammoth.images.imgElement(() => Promise.resolve({ src: '' })),
        externalFileAccess: false,
      },
    );
    html = result.value;
  } catch (error) {
    throw unreadable(error);
  }
  const reader = new HtmlTextReader(new TextBuilder('docx', maxTextChars));
  reader.write(html);
  return reader.finish();
}
