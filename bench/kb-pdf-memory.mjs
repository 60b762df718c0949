#!/usr/bin/env node
/* global process, console, setInterval, clearInterval, performance, Buffer */
// Memory and speed of PDF extraction + chunking alone (no database, no HTTP), on a checkout's built code (bench/built.mjs):
// extractDocument (its worker thread included) then the chunks cut one by one (documentChunks
// where the build has it, else chunkDocument), RSS of this process sampled every 20 ms.
//
//   node bench/kb-pdf-memory.mjs <checkout> <file.pdf>     e.g. . /tmp/big.pdf, then /tmp/keel-base
//
// Make the PDF with `PARTS=rss npx tsx bench/kb.ts` (its writeBigPdf) or any PDF at hand.
import { loadavg } from 'node:os';
import { resolve } from 'node:path';

import { importBuilt } from './built.mjs';

const [checkout = '.', path] = process.argv.slice(2);
if (!path) {
  console.error('usage: node bench/kb-pdf-memory.mjs <checkout> <file.pdf>');
  process.exit(1);
}
const [{ extractDocument }, chunk] = await importBuilt(resolve(checkout), 'modules/knowledge/extract', 'modules/knowledge/chunk');
const mb = (n) => Math.round(n / 1048576);
const show = (label, m) => console.log(`${label.padEnd(10)} rss ${mb(m.rss)} heapUsed ${mb(m.heapUsed)} external ${mb(m.external)} arrayBuffers ${mb(m.arrayBuffers)}`);
let peak = process.memoryUsage();
const sampler = setInterval(() => {
  const m = process.memoryUsage();
  if (m.rss > peak.rss) peak = m;
}, 20);
show('before', process.memoryUsage());
const began = performance.now();
const doc = await extractDocument({ path, filename: 'big.pdf' }, { maxTextChars: 200_000_000, timeoutMs: 1_200_000, maxMemoryMb: 256, maxTotalMemoryMb: 1024 });
const extracted = performance.now();
const options = { chunkTokens: 400, overlapTokens: 60 };
let chunks = 0;
if (chunk.documentChunks) for (const _ of chunk.documentChunks(doc, options)) chunks++;
else chunks = chunk.chunkDocument(doc, options).length;
const done = performance.now();
clearInterval(sampler);
show('peak', peak);
const textMb = Buffer.byteLength(doc.text) / 1e6;
console.log(
  `text ${textMb.toFixed(1)} MB, ${chunks} chunks; extract ${((extracted - began) / 1000).toFixed(1)} s, chunk ${((done - extracted) / 1000).toFixed(1)} s; ` +
    `${((textMb / ((done - began) / 1000)) * 60).toFixed(1)} MB/min; load ${loadavg().map((x) => x.toFixed(1)).join(' ')}`,
);
