/**
 * `npm run eval:kb`: retrieval quality over the labelled corpus (test/fixtures/kb-eval) on a fresh
 * embedded Keel (PGlite in a temporary directory): recall@5 and MRR for full-text and hybrid search
 * (the fake server's lexical embedder). Prints a Markdown table and exits 1 when a figure is below
 * the recorded one (test/helpers/kb-eval.ts, KB_EVAL_RECORDED). `--record` appends a dated section
 * to bench/RESULTS.md.
 */
import { appendFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import pino from 'pino';

import { loadSettings } from '../src/core/config.js';
import { openDatabase } from '../src/core/db.js';
import { migrateUp } from '../src/core/migrate.js';

import { formatReport, regressions, runKbEval } from '../test/helpers/kb-eval.js';

const dir = mkdtempSync(join(tmpdir(), 'keel-kb-eval-db-'));
try {
  const database = await openDatabase(loadSettings({ ENVIRONMENT: 'local', SECRET_KEY: 'x'.repeat(40), PGLITE_DATA_DIR: dir }));
  await migrateUp(database, pino({ level: 'silent' }));
  const report = await runKbEval(database);
  await database.close();
  const table = formatReport(report);
  console.log(table);
  if (process.argv.includes('--record')) {
    const day = new Date().toISOString().slice(0, 10);
    appendFileSync(
      new URL('../bench/RESULTS.md', import.meta.url),
      `\n## ${day}: knowledge-base retrieval quality (\`npm run eval:kb\`)\n\nEmbedded (PGlite), default chunking (KB_CHUNK_TOKENS 400, overlap 60), top_k 5; hybrid uses the fake server's lexical embedder (hashed words + character trigrams, 256 dimensions). A hit: a returned chunk of the question's document contains its answer passage.\n\n${table}\n`,
    );
  }
  const failed = regressions(report);
  if (failed.length) {
    console.error(`below the recorded figures:\n${failed.join('\n')}`);
    process.exitCode = 1;
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
