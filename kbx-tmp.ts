import { extractDocument } from './src/modules/knowledge/extract.ts';
import { chunkDocument } from './src/modules/knowledge/chunk.ts';
for (const f of process.argv.slice(2)) {
  const t = performance.now();
  try {
    const doc = await extractDocument({ path: f, filename: f.split('/').pop()! }, { maxTextChars: 1e7, timeoutMs: 10000, maxMemoryMb: 128 });
    console.log(f, doc.format, (performance.now() - t).toFixed(0), 'ms');
    console.log(JSON.stringify(doc.text));
    console.log(doc.sections);
    console.log(chunkDocument(doc, { chunkTokens: 20, overlapTokens: 5 }).slice(0, 4));
  } catch (e) { console.log(f, 'ERR', (e as Error).name, (e as Error).message); }
}
