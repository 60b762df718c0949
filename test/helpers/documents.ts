/**
 * Real documents made by the libraries people's tools use (pdfkit for PDF, docx for Word, yazl
 * for a raw zip), for ingestion tests and the retrieval-evaluation corpus: binaries are made at
 * test time, never committed.
 */
import { createWriteStream } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deflateRawSync, deflateSync } from 'node:zlib';

import { Document, HeadingLevel, Packer, Paragraph } from 'docx';
import PDFDocument from 'pdfkit';
import yazl from 'yazl';

/** A heading (level 1–6), a paragraph of body text, or (Word only) a bulleted item at a level from 0. */
export type Block = { heading: number; text: string } | { text: string; bullet?: number };

/** Blocks from a Markdown source: `#` lines are headings, blank-line separated runs are paragraphs. */
export function markdownBlocks(markdown: string): Block[] {
  const blocks: Block[] = [];
  for (const part of markdown.split(/\n\s*\n/)) {
    const lines = part.split('\n');
    const paragraph: string[] = [];
    for (const line of lines) {
      const heading = /^(#{1,6})\s+(.*)$/.exec(line);
      if (heading) {
        if (paragraph.length > 0) blocks.push({ text: paragraph.splice(0).join(' ') });
        blocks.push({ heading: heading[1]!.length, text: heading[2]!.trim() });
      } else if (line.trim()) paragraph.push(line.trim());
    }
    if (paragraph.length > 0) blocks.push({ text: paragraph.join(' ') });
  }
  return blocks;
}

const PDF_HEADING_SIZES = [24, 18, 15, 13, 12.5, 12.2];

/** A PDF with headings set larger than the body (as word processors export them); `newPageBefore` starts those headings on a new page. */
export async function writePdf(path: string, blocks: Block[], options: { userPassword?: string; newPageBefore?: string[] } = {}): Promise<void> {
  const pdf = new PDFDocument({
    compress: true,
    info: { Title: 'Keel test document' },
    ...(options.userPassword ? { userPassword: options.userPassword, ownerPassword: `${options.userPassword}-owner` } : {}),
  });
  const written = new Promise<void>((resolve, reject) => {
    pdf.pipe(createWriteStream(path)).on('finish', resolve).on('error', reject);
  });
  for (const block of blocks) {
    if ('heading' in block) {
      if (options.newPageBefore?.includes(block.text)) pdf.addPage();
      pdf.fontSize(PDF_HEADING_SIZES[block.heading - 1] ?? 12).text(block.text).moveDown(0.5);
    } else {
      pdf.fontSize(11).text(block.text).moveDown(1);
    }
  }
  pdf.end();
  await written;
}

const DOCX_HEADINGS = [HeadingLevel.HEADING_1, HeadingLevel.HEADING_2, HeadingLevel.HEADING_3, HeadingLevel.HEADING_4, HeadingLevel.HEADING_5, HeadingLevel.HEADING_6];

/** A Word document with real heading styles (Heading 1…6). */
export async function writeDocx(path: string, blocks: Block[]): Promise<void> {
  const children = blocks.map(
    (block) =>
      new Paragraph('heading' in block ? { text: block.text, heading: DOCX_HEADINGS[block.heading - 1]! } : { text: block.text, ...(block.bullet === undefined ? {} : { bullet: { level: block.bullet } }) }),
  );
  await writeFile(path, await Packer.toBuffer(new Document({ sections: [{ children }] })));
}

/** A zip with these entries (deflated), written with yazl. */
export async function writeZip(path: string, entries: Record<string, Buffer | string>): Promise<void> {
  const zip = new yazl.ZipFile();
  for (const [name, content] of Object.entries(entries)) zip.addBuffer(Buffer.isBuffer(content) ? content : Buffer.from(content), name, { compress: true });
  zip.end();
  await new Promise<void>((resolve, reject) => {
    zip.outputStream.pipe(createWriteStream(path)).on('finish', resolve).on('error', reject);
  });
}

const CONTENT_TYPES = '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>';

/**
 * A "DOCX" whose word/document.xml unpacks to `bytes` of markup (it deflates to about a
 * thousandth of that). `declare` rewrites the size its zip directory and local header declare
 * for that entry: larger (a bomb that admits it), or smaller (one that lies).
 */
export async function writeZipBomb(path: string, bytes: number, declare?: number): Promise<void> {
  const body = Buffer.alloc(bytes, 0x20);
  body.write('<w:document>', 0);
  await writeZip(path, { '[Content_Types].xml': CONTENT_TYPES, 'word/document.xml': body });
  if (declare === undefined) return;
  const zip = await readFile(path);
  const name = Buffer.from('word/document.xml');
  for (let at = zip.indexOf(name); at >= 0; at = zip.indexOf(name, at + 1)) {
    // Central directory entry: signature 46 bytes before the name, size at +24; local header: 30 before, size at +22.
    if (zip.readUInt32LE(at - 46) === 0x02014b50) zip.writeUInt32LE(declare, at - 46 + 24);
    else if (zip.readUInt32LE(at - 30) === 0x04034b50) zip.writeUInt32LE(declare, at - 30 + 22);
  }
  await writeFile(path, zip);
}

/**
 * A one-page PDF written by hand whose page is the stream `stream` with the dictionary entries
 * `dictionary` besides its /Length (what PDF libraries never let you write: a page that unpacks to
 * hundreds of megabytes, filters they do not offer, dictionaries that hide what they hold), and
 * object 6 when given. `compressed`: object 6 is written inside a compressed object stream (7),
 * indexed by a cross-reference stream (8), as PDF 1.5 writers do: nothing in the file reads `6 0 obj`.
 */
export function pdfWithStream(dictionary: string, stream: Buffer, object6?: string, { compressed = false } = {}): Buffer {
  const parts: Buffer[] = [Buffer.from(compressed ? '%PDF-1.5\n' : '%PDF-1.4\n')];
  const offsets: number[] = [];
  let length = parts[0]!.length;
  const add = (part: Buffer) => {
    parts.push(part);
    length += part.length;
  };
  const object = (number: number, body: Buffer) => {
    offsets[number] = length;
    add(Buffer.concat([Buffer.from(`${number} 0 obj\n`), body, Buffer.from('\nendobj\n')]));
  };
  const streamObject = (number: number, entries: string, data: Buffer) =>
    object(number, Buffer.concat([Buffer.from(`<< /Length ${data.length} ${entries} >>\nstream\n`), data, Buffer.from('\nendstream')]));
  object(1, Buffer.from('<< /Type /Catalog /Pages 2 0 R >>'));
  object(2, Buffer.from('<< /Type /Pages /Kids [3 0 R] /Count 1 >>'));
  object(3, Buffer.from('<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>'));
  streamObject(4, dictionary, stream);
  object(5, Buffer.from('<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>'));
  if (!compressed) {
    if (object6 !== undefined) object(6, Buffer.from(object6));
    const xref = length;
    const entries = offsets.slice(1).map((offset) => `${String(offset).padStart(10, '0')} 00000 n \n`).join('');
    const size = offsets.length;
    add(Buffer.from(`xref\n0 ${size}\n0000000000 65535 f \n${entries}trailer\n<< /Size ${size} /Root 1 0 R >>\nstartxref\n${xref}\n%%EOF\n`));
    return Buffer.concat(parts);
  }
  const header = '6 0 ';
  streamObject(7, `/Type /ObjStm /N 1 /First ${header.length}`, Buffer.from(header + (object6 ?? 'null')));
  offsets[8] = length;
  // Rows of [type, offset or object stream, generation or index] in 1 + 4 + 2 bytes (/W [1 4 2]).
  const rows = Buffer.alloc(9 * 7);
  for (let number = 1; number < 9; number++) {
    const row = number * 7;
    const inObjectStream = number === 6;
    rows.writeUInt8(inObjectStream ? 2 : 1, row);
    rows.writeUInt32BE(inObjectStream ? 7 : offsets[number]!, row + 1);
  }
  rows.writeUInt16BE(65535, 5); // object 0: free
  streamObject(8, '/Type /XRef /Size 9 /W [1 4 2] /Root 1 0 R', rows);
  add(Buffer.from(`startxref\n${offsets[8]}\n%%EOF\n`));
  return Buffer.concat(parts);
}


/**
 * A one-page PDF 1.5 written by hand whose page's content (object 4) is a stream with the
 * dictionary entries `entries` (its /Length among them: it may be a reference) and the data
 * `data`; `extra` are objects 6 and on (a Buffer's bytes as they are). The objects numbered in `inObjectStream` are written inside
 * one Flate-compressed object stream, indexed by a cross-reference stream, as PDF 1.5 writers do
 * (a stream among them too, which the standard forbids and pdf.js reads): nothing in the file shows
 * them as written. `columns`: the object stream's content goes through PNG's Up predictor in rows
 * of that many bytes before Flate (/Predictor 12), as cross-reference streams usually are.
 */
export function pdfWithObjectStream(entries: string, data: Buffer, { extra = [], inObjectStream = [], columns }: { extra?: (string | Buffer)[]; inObjectStream?: number[]; columns?: number }): Buffer {
  const bodies: Buffer[] = [
    Buffer.from('<< /Type /Catalog /Pages 2 0 R >>'),
    Buffer.from('<< /Type /Pages /Kids [3 0 R] /Count 1 >>'),
    Buffer.from('<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>'),
    Buffer.concat([Buffer.from(`<< ${entries} >>\nstream\n`), data, Buffer.from('\nendstream')]),
    Buffer.from('<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>'),
    ...extra.map((body) => Buffer.from(body)),
  ];
  const objectStream = bodies.length + 1;
  const xrefStream = objectStream + 1;
  const parts: Buffer[] = [Buffer.from('%PDF-1.5\n')];
  let length = parts[0]!.length;
  const offsets: number[] = [];
  const write = (number: number, body: Buffer) => {
    offsets[number] = length;
    const part = Buffer.concat([Buffer.from(`${number} 0 obj\n`), body, Buffer.from('\nendobj\n')]);
    parts.push(part);
    length += part.length;
  };
  const packed: number[] = [];
  bodies.forEach((body, i) => {
    if (inObjectStream.includes(i + 1)) packed.push(i + 1);
    else write(i + 1, body);
  });
  let header = '';
  let at = 0;
  for (const number of packed) {
    header += `${number} ${at} `;
    at += bodies[number - 1]!.length + 1;
  }
  let plain = Buffer.concat([Buffer.from(header), ...packed.map((number) => Buffer.concat([bodies[number - 1]!, Buffer.from('\n')]))]);
  let parms = '';
  if (columns) {
    // Each row: the tag 2 (Up), then each byte less the one above it.
    const rows: Buffer[] = [];
    for (let at = 0; at < plain.length; at += columns) {
      const row = Buffer.alloc(columns + 1);
      row[0] = 2;
      for (let i = 0; i < columns; i++) row[i + 1] = ((plain[at + i] ?? 0) - (at > 0 ? plain[at - columns + i]! : 0)) & 0xff;
      rows.push(row);
    }
    plain = Buffer.concat(rows);
    parms = ` /DecodeParms << /Predictor 12 /Columns ${columns} >>`;
  }
  const content = deflateSync(plain);
  write(objectStream, Buffer.concat([Buffer.from(`<< /Type /ObjStm /N ${packed.length} /First ${header.length} /Filter /FlateDecode${parms} /Length ${content.length} >>\nstream\n`), content, Buffer.from('\nendstream')]));
  offsets[xrefStream] = length;
  // Rows of [type, offset or object stream, generation or index] in 1 + 4 + 2 bytes (/W [1 4 2]).
  const rows = Buffer.alloc((xrefStream + 1) * 7);
  rows.writeUInt16BE(65535, 5); // object 0: free
  for (let number = 1; number <= xrefStream; number++) {
    const index = packed.indexOf(number);
    rows.writeUInt8(index >= 0 ? 2 : 1, number * 7);
    rows.writeUInt32BE(index >= 0 ? objectStream : offsets[number]!, number * 7 + 1);
    if (index >= 0) rows.writeUInt16BE(index, number * 7 + 5);
  }
  const xref = Buffer.concat([Buffer.from(`${xrefStream} 0 obj\n<< /Type /XRef /Size ${xrefStream + 1} /W [1 4 2] /Root 1 0 R /Length ${rows.length} >>\nstream\n`), rows, Buffer.from('\nendstream\nendobj\n')]);
  parts.push(xref, Buffer.from(`startxref\n${offsets[xrefStream]}\n%%EOF\n`));
  return Buffer.concat(parts);
}

/**
 * A PDF of `fan ** levels` pages from a few hundred bytes: a page tree whose every node lists one
 * child `fan` times, down to one page (with a line of text) that every leaf slot names.
 */
export function pdfPageTree(levels: number, fan: number): Buffer {
  const objects: string[] = ['<< /Type /Catalog /Pages 2 0 R >>'];
  for (let level = 0; level < levels; level++) {
    const id = level + 2;
    const parent = level > 0 ? ` /Parent ${id - 1} 0 R` : '';
    objects.push(`<< /Type /Pages /Kids [${Array<string>(fan).fill(`${id + 1} 0 R`).join(' ')}] /Count ${fan ** (levels - level)}${parent} >>`);
  }
  const page = levels + 2;
  const content = 'BT /F1 12 Tf 72 712 Td (Hello page) Tj ET';
  objects.push(
    `<< /Type /Page /Parent ${page - 1} 0 R /MediaBox [0 0 612 792] /Contents ${page + 1} 0 R /Resources << /Font << /F1 ${page + 2} 0 R >> >> >>`,
    `<< /Length ${content.length} >>\nstream\n${content}\nendstream`,
    '<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>',
  );
  let pdf = '%PDF-1.4\n';
  const offsets = objects.map((body, index) => {
    const offset = pdf.length;
    pdf += `${index + 1} 0 obj\n${body}\nendobj\n`;
    return offset;
  });
  const xref = pdf.length;
  const size = objects.length + 1;
  pdf += `xref\n0 ${size}\n0000000000 65535 f \n${offsets.map((offset) => `${String(offset).padStart(10, '0')} 00000 n \n`).join('')}`;
  pdf += `trailer\n<< /Size ${size} /Root 1 0 R >>\nstartxref\n${xref}\n%%EOF\n`;
  return Buffer.from(pdf);
}
/**
 * zlib data of `data` whose first `stored` bytes are written as they are (a stored block), the rest
 * compressed: what a stream's data holds can be chosen (the bytes `endstream`, say).
 */
export function deflateStoringFirst(data: Buffer, stored: number): Buffer {
  // A stored block that is not the last: its header, then its length and that length's complement.
  const block = Buffer.from([0, stored & 0xff, stored >> 8, ~stored & 0xff, (~stored >> 8) & 0xff]);
  let a = 1;
  let b = 0;
  for (const byte of data) {
    a = (a + byte) % 65521;
    b = (b + a) % 65521;
  }
  const adler32 = Buffer.alloc(4);
  adler32.writeUInt32BE(((b << 16) | a) >>> 0);
  return Buffer.concat([Buffer.from([0x78, 0x9c]), block, data.subarray(0, stored), deflateRawSync(data.subarray(stored), { level: 9 }), adler32]);
}

/** A one-page PDF whose page is `content`, Flate-compressed. */
export async function writePdfWithContent(path: string, content: Buffer): Promise<void> {
  await writeFile(path, pdfWithStream('/Filter /FlateDecode', deflateSync(content, { level: 9 })));
}

/**
 * A one-page PDF showing `lines` of text, Flate-compressed as writers store a page: text that
 * repeats itself unpacks to ~100× the file, as real documents' can. Fifty lines to a text object,
 * each from the top of the page (the reader drops lines past its foot), drawn over one another.
 */
export async function writeTextPdf(path: string, lines: string[]): Promise<void> {
  const objects: string[] = [];
  for (let first = 0; first < lines.length; first += 50) {
    const shown = lines.slice(first, first + 50).map((line) => `(${line.replace(/[\\()]/g, (c) => `\\${c}`)}) Tj T*`);
    objects.push(['BT /F1 10 Tf 12 TL 72 720 Td', ...shown, 'ET'].join('\n'));
  }
  await writePdfWithContent(path, Buffer.from(objects.join('\n')));
}

/** The bytes of a file `write` makes (in a temporary directory, removed after). */
export async function madeFile(name: string, write: (path: string) => Promise<void>): Promise<Buffer> {
  const dir = await mkdtemp(join(tmpdir(), 'keel-kb-doc-'));
  try {
    await write(join(dir, name));
    return await readFile(join(dir, name));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** `data` LZW-encoded as PDF's LZWDecode reads it (9- to 12-bit codes, a clear code before the table fills, 257 at the end). */
export function lzwEncode(data: Buffer, earlyChange = 1): Buffer {
  const out: number[] = [];
  let bits = 0;
  let bitCount = 0;
  let emitted = 0;
  const write = (code: number) => {
    // The width the decoder reads this code with: from its table's size after the previous code.
    const decoderNext = 258 + Math.max(0, emitted - 1);
    const width = Math.min(12, Math.floor(Math.log2(decoderNext + earlyChange)) + 1);
    bits = (bits << width) | code;
    bitCount += width;
    while (bitCount >= 8) {
      bitCount -= 8;
      out.push((bits >>> bitCount) & 255);
    }
    bits &= (1 << bitCount) - 1;
    emitted++;
  };
  let table = new Map<number, number>();
  let next = 258;
  let prefix = -1;
  for (const byte of data) {
    if (prefix < 0) {
      prefix = byte;
      continue;
    }
    const known = table.get(prefix * 256 + byte);
    if (known !== undefined) {
      prefix = known;
      continue;
    }
    write(prefix);
    table.set(prefix * 256 + byte, next++);
    prefix = byte;
    if (next >= 4000) {
      write(256);
      emitted = 0;
      table = new Map();
      next = 258;
    }
  }
  if (prefix >= 0) write(prefix);
  write(257);
  if (bitCount > 0) out.push((bits << (8 - bitCount)) & 255);
  return Buffer.from(out);
}

/** `data` in ASCII85 (`z` for four zero bytes), ended with `~>`. */
export function ascii85Encode(data: Buffer): Buffer {
  let out = '';
  for (let at = 0; at < data.length; at += 4) {
    const group = Buffer.alloc(4);
    data.copy(group, 0, at, at + 4);
    const count = Math.min(4, data.length - at);
    let value = group.readUInt32BE(0);
    if (value === 0 && count === 4) {
      out += 'z';
      continue;
    }
    const chars: string[] = [];
    for (let i = 0; i < 5; i++) {
      chars.unshift(String.fromCharCode((value % 85) + 33));
      value = Math.floor(value / 85);
    }
    out += chars.slice(0, count + 1).join('');
  }
  return Buffer.from(`${out}~>`);
}

/** `data` as PDF's RunLengthDecode reads it: runs of 2 to 128 equal bytes repeated, the rest copied 128 at most at a time, 128 at the end. */
export function runLengthEncode(data: Buffer): Buffer {
  const out: Buffer[] = [];
  let literal: number[] = [];
  const flush = () => {
    if (literal.length) out.push(Buffer.from([literal.length - 1, ...literal]));
    literal = [];
  };
  for (let at = 0; at < data.length; ) {
    let run = 1;
    while (run < 128 && at + run < data.length && data[at + run] === data[at]) run++;
    if (run > 1) {
      flush();
      out.push(Buffer.from([257 - run, data[at]!]));
    } else {
      literal.push(data[at]!);
      if (literal.length === 128) flush();
    }
    at += run;
  }
  flush();
  out.push(Buffer.from([128]));
  return Buffer.concat(out);
}
