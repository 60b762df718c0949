import { describe, expect, it } from 'vitest';

import { type TableState, taskFor } from '../../src/core/maintenance.js';

const FREEZE = 200_000_000;
const table = (state: Partial<TableState>): TableState => ({
  table: 't',
  tuples: 1_000,
  dead: 0,
  modified: 0,
  inserted: 0,
  xidAge: 1_000,
  analyzed: true,
  pages: 10,
  lastPages: 10,
  system: false,
  ...state,
});

describe("embedded maintenance's thresholds (autovacuum's defaults)", () => {
  it('vacuums past 50 + 20 % dead tuples, or 1000 + 20 % inserted; analyzes past 50 + 10 % changed', () => {
    expect(taskFor(table({ dead: 250 }), FREEZE)).toBeNull();
    expect(taskFor(table({ dead: 251 }), FREEZE)).toMatchObject({ vacuum: true, analyze: false, freeze: false, reasons: ['dead tuples'] });
    expect(taskFor(table({ inserted: 1_201 }), FREEZE)).toMatchObject({ vacuum: true, reasons: ['inserted since vacuum'] });
    expect(taskFor(table({ modified: 150 }), FREEZE)).toBeNull();
    expect(taskFor(table({ modified: 151 }), FREEZE)).toMatchObject({ vacuum: false, analyze: true });
    expect(taskFor(table({ dead: 251, modified: 151 }), FREEZE)).toMatchObject({ vacuum: true, analyze: true });
  });

  it('analyzes a table with rows that never was, and one grown since (its counters lost at a restart); not the catalogs for that', () => {
    expect(taskFor(table({ tuples: -1 }), FREEZE)).toMatchObject({ analyze: true, reasons: ['never analyzed'] });
    expect(taskFor(table({ analyzed: false }), FREEZE)).toMatchObject({ analyze: true, reasons: ['never analyzed'] });
    expect(taskFor(table({ tuples: -1, pages: 0 }), FREEZE)).toBeNull();
    expect(taskFor(table({ tuples: 0, analyzed: false }), FREEZE)).toBeNull();
    expect(taskFor(table({ pages: 100, lastPages: 50 }), FREEZE)).toMatchObject({ analyze: true, reasons: ['grown since analyze'] });
    expect(taskFor(table({ pages: 70, lastPages: 50 }), FREEZE)).toBeNull();
    expect(taskFor(table({ tuples: -1, system: true }), FREEZE)).toBeNull();
  });

  it('freezes past the freeze age, and does not wait for idleness past twice it', () => {
    expect(taskFor(table({ xidAge: FREEZE }), FREEZE)).toBeNull();
    expect(taskFor(table({ xidAge: FREEZE + 1 }), FREEZE)).toMatchObject({ vacuum: true, freeze: true, urgent: false });
    expect(taskFor(table({ xidAge: 2 * FREEZE + 1, system: true }), FREEZE)).toMatchObject({ vacuum: true, freeze: true, urgent: true });
  });
});
