import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { Database } from '../../src/core/db.js';

import { openTestDatabase } from '../helpers/app.js';
import { type EvalReport, formatReport, KB_EVAL_RECORDED, regressions, runKbEval } from '../helpers/kb-eval.js';

// The retrieval evaluation of `npm run eval:kb` on this run's database: a change that ranks the
// answer passages of the labelled corpus lower than recorded fails here. Embedded (PGlite): full
// text and hybrid; PostgreSQL (no pgvector on this machine): full text.
let database: Database;
let destroy: () => Promise<void>;
let report: EvalReport;

beforeAll(async () => {
  ({ database, destroy } = await openTestDatabase());
  report = await runKbEval(database);
}, 120_000);
afterAll(async () => {
  await destroy();
});

describe('knowledge-base retrieval quality', () => {
  it('ingests the whole corpus', () => {
    expect(report.documents).toBe(33);
    expect(report.chunks).toBeGreaterThanOrEqual(report.documents);
  });

  it('scores recall@5 and MRR at least as recorded, full text and (where pgvector exists) hybrid', () => {
    expect(regressions(report), formatReport(report)).toEqual([]);
    expect(report.full_text.questions).toBe(69);
    if (database.kind === 'pglite') {
      expect(report.hybrid?.questions).toBe(69);
      // The embedder must add a signal of its own: hybrid beats full text alone on this corpus.
      expect(report.hybrid!.recall_at_5).toBeGreaterThan(report.full_text.recall_at_5);
    } else {
      expect(report.hybrid).toBeNull();
    }
  });

  it('flags a score below the recorded one', () => {
    const worse = { ...report, full_text: { ...report.full_text, mrr: KB_EVAL_RECORDED.full_text.mrr - 0.02 } };
    expect(regressions(worse)).toEqual([expect.stringContaining('full_text mrr')]);
  });
});
