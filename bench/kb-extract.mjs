#!/usr/bin/env node
/* global process, console, setInterval, clearInterval, performance, Buffer */
// Knowledge-base extraction + chunking throughput and memory, on the built code (bench/built.mjs). Ingestion's target is >= 20 MB of text a minute end to end (excluding
// embedding latency); extraction and chunking are measured here without the database.
//
//   node bench/kb-extract.mjs          (TEXT_MB=20 BIG_TEXT_MB=50 PDF_PAGES=400 DOCX_PARAGRAPHS=8000)
//
// Each case runs in a fresh child process so its peak RSS is its own.
import { spawnSync } from 'node:child_process';
import { createWriteStream, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import { importBuilt } from './built.mjs';

const root = resolve(import.meta.dirname, '..');
const settings = { chunkTokens: 400, overlapTokens: 60 };
const limits = { maxTextChars: 200_000_000, timeoutMs: 600_000, maxMemoryMb: 256, maxTotalMemoryMb: 1024 };

// ==================== One case (child process) ====================

if (process.argv[2] === '--case') {
  const [, , , path, filename] = process.argv;
  const [{ extractDocument }, { chunkDocumentAsync }] = await importBuilt(root, 'modules/knowledge/extract', 'modules/knowledge/chunk');
  let peak = process.memoryUsage().rss;
  const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 20);
  const began = performance.now();
  const doc = await extractDocument({ path, filename }, limits);
  const extracted = performance.now();
  const chunks = await chunkDocumentAsync(doc, settings);
  const done = performance.now();
  clearInterval(sampler);
  peak = Math.max(peak, process.memoryUsage().rss);
  const textMb = Buffer.byteLength(doc.text) / 1e6;
  console.log(JSON.stringify({
    file: filename, fileMb: +(statSync(path).size / 1e6).toFixed(1), textMb: +textMb.toFixed(1), sections: doc.sections.length, chunks: chunks.length,
    extractS: +((extracted - began) / 1000).toFixed(2), chunkS: +((done - extracted) / 1000).toFixed(2),
    mbPerMin: +((textMb / ((done - began) / 1000)) * 60).toFixed(0), peakRssMb: Math.round(peak / 1e6),
  }));
  process.exit(0);
}

// ==================== Inputs ====================


let seed = 7;
const random = (n) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
const WORDS = 'the arm joint torque sensor calibration controller gripper firmware Keel operator payload axis within milliseconds safety stop grease maintenance schedule warranty replacement module bearing encoder voltage'.split(' ');
const sentence = () => {
  const words = Array.from({ length: 6 + random(20) }, () => WORDS[random(WORDS.length)]).join(' ');
  return `${words[0].toUpperCase()}${words.slice(1)}.`;
};
const paragraph = () => Array.from({ length: 2 + random(6) }, sentence).join(' ');

function writeMarkdown(path, megabytes) {
  const parts = [];
  let size = 0;
  let n = 0;
  while (size < megabytes * 1e6) {
    const part = n % 12 === 0 ? `${'#'.repeat(1 + (n % 3))} Section ${n}\n\n` : `${paragraph()}\n\n`;
    parts.push(part);
    size += part.length;
    n++;
  }
  writeFileSync(path, parts.join(''));
}

async function writePdf(path, pages) {
  const { default: PDFDocument } = await import('pdfkit');
  const pdf = new PDFDocument({ compress: true });
  const written = new Promise((r) => pdf.pipe(createWriteStream(path)).on('finish', r));
  for (let page = 0; page < pages; page++) {
    if (page > 0) pdf.addPage();
    pdf.fontSize(18).text(`Chapter ${page + 1}`);
    for (let i = 0; i < 6; i++) pdf.fontSize(10).text(paragraph()).moveDown(0.5);
  }
  pdf.end();
  await written;
}

async function writeDocx(path, paragraphs) {
  const { Document, HeadingLevel, Packer, Paragraph } = await import('docx');
  const children = Array.from({ length: paragraphs }, (_, i) => (i % 20 === 0 ? new Paragraph({ text: `Part ${i}`, heading: HeadingLevel.HEADING_1 }) : new Paragraph({ text: paragraph() })));
  writeFileSync(path, await Packer.toBuffer(new Document({ sections: [{ children }] })));
}

// ==================== Run ====================

const dir = mkdtempSync(join(tmpdir(), 'keel-bench-kb-'));
try {
  const textMb = Number(process.env.TEXT_MB ?? 20);
  const bigTextMb = Number(process.env.BIG_TEXT_MB ?? 50);
  const inputs = [];
  writeMarkdown(join(dir, 'text.md'), textMb);
  inputs.push(['text.md']);
  writeMarkdown(join(dir, 'big.txt'), bigTextMb);
  inputs.push(['big.txt']);
  await writePdf(join(dir, 'doc.pdf'), Number(process.env.PDF_PAGES ?? 400));
  inputs.push(['doc.pdf']);
  await writeDocx(join(dir, 'doc.docx'), Number(process.env.DOCX_PARAGRAPHS ?? 8000));
  inputs.push(['doc.docx']);
  console.log(`node ${process.version}, chunks of ${settings.chunkTokens} tokens with ${settings.overlapTokens} overlap`);
  for (const [name] of inputs) {
    const result = spawnSync(process.execPath, [import.meta.filename, '--case', join(dir, name), name], { encoding: 'utf8', cwd: root });
    process.stdout.write(result.status === 0 ? result.stdout : `${name}: failed\n${result.stderr}\n`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
