/**
 * EXPLAIN ANALYZE of the knowledge-base full-text statement (src/services/knowledge/search.ts) for
 * every eval question on a seeded database (bench/kb.ts makes them): per-question execution time
 * and rows, and the plan of the slowest.
 *
 *   DATABASE_URL=… npx tsx bench/kb-explain.ts        (or PGLITE_DATA_DIR=…)
 */
import { sql } from 'drizzle-orm';

import { loadSettings } from '../src/core/config.js';
import { openDatabase } from '../src/core/db.js';

import { users } from '../src/models/index.js';

import { queryRows } from '../src/crud/owned.js';
import { fullTextStatement } from '../src/services/knowledge/search.js';
import { loadQuestions } from '../test/helpers/kb-eval-corpus.js';

const where = process.env.DATABASE_URL ? { DATABASE_URL: process.env.DATABASE_URL } : { PGLITE_DATA_DIR: process.env.PGLITE_DATA_DIR! };
const settings = loadSettings({ ENVIRONMENT: 'local', SECRET_KEY: 'x'.repeat(40), ...where });
const database = await openDatabase(settings);
try {
  const [admin] = await database.db.select({ id: users.id }).from(users).limit(1);
  const questions = (await loadQuestions()).map((q) => q.question).slice(0, Number(process.env.QUESTIONS ?? 69));
  const limit = Number(process.env.LIMIT ?? 5);
  // Round 0 warms the caches; each question's figure is the least of the next ROUNDS (the run least disturbed by other processes).
  const rounds = Number(process.env.ROUNDS ?? 3);
  const best = new Map<string, { question: string; ms: number; plan: string }>();
  for (let round = 0; round <= rounds; round++) {
    for (const question of questions) {
      const plan = await queryRows<{ 'QUERY PLAN': string }>(
        database.db,
        sql`explain (analyze, buffers) ${await fullTextStatement(database.db, 'english', question, { where: sql`knowledge_chunks.owner_id = ${admin!.id}`, readsEntries: false }, limit)}`,
      );
      const text = plan.map((r) => r['QUERY PLAN']).join('\n');
      const ms = Number(/Execution Time: ([\d.]+)/.exec(text)?.[1]);
      if (round > 0 && !(ms >= (best.get(question)?.ms ?? Infinity))) best.set(question, { question, ms, plan: text });
    }
  }
  const results = [...best.values()];
  const sorted = [...results].sort((a, b) => a.ms - b.ms);
  const at = (p: number) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!.ms;
  console.log(`${database.kind}: ${results.length} questions, limit ${limit}: least of ${rounds} runs each: execution p50 ${at(50).toFixed(1)} ms, p90 ${at(90).toFixed(1)}, max ${sorted.at(-1)!.ms.toFixed(1)}`);
  if (process.env.VERBOSE) for (const r of results) console.log(`${r.ms.toFixed(1).padStart(7)} ms  ${r.question}`);
  console.log(`\nslowest: ${sorted.at(-1)!.question}\n${sorted.at(-1)!.plan}`);
} finally {
  await database.close();
}
