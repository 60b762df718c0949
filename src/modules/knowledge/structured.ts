import { parse as parseCsv } from 'csv-parse/sync';

import { type ExtractedSpans, TextBuilder } from './document-builder.js';
import { DocumentRejectedError } from './types.js';

// ==================== CSV ====================

const DELIMITERS = [',', ';', '\t', '|'] as const;

/** The delimiter that splits the first line into the most fields (outside quotes). */
function detectDelimiter(text: string): string {
  const firstLine = text.slice(0, Math.min(text.length, 64 * 1024)).split(/\r?\n/, 1)[0] ?? '';
  const unquoted = firstLine.replace(/"[^"]*"/g, '');
  let best: string = ',';
  let bestCount = 0;
  for (const delimiter of DELIMITERS) {
    const count = unquoted.split(delimiter).length - 1;
    if (count > bestCount) [best, bestCount] = [delimiter, count];
  }
  return best;
}

/**
 * A table as text a search can match a row by: each row a paragraph of `column: value` lines
 * (empty cells left out), the first row naming the columns. Rows are handled as the parser
 * meets them (csv-parse's on_record), so no array of every row is kept.
 */
export function csvSpans(text: string, maxTextChars: number): ExtractedSpans {
  const out = new TextBuilder('csv', maxTextChars);
  let columns: string[] | null = null;
  try {
    parseCsv(text, {
      bom: true,
      delimiter: detectDelimiter(text),
      relax_column_count: true,
      relax_quotes: true,
      skip_empty_lines: true,
      skip_records_with_empty_values: true,
      max_record_size: 10 * 1024 * 1024,
      on_record: (record: string[]) => {
        if (!columns) {
          columns = record.map((name, i) => name.trim() || `column ${i + 1}`);
          return null;
        }
        out.separate('paragraph');
        record.forEach((value, i) => {
          const cell = value.trim();
          if (cell.length === 0) return;
          out.separate('line');
          out.write(`${columns![i] ?? `column ${i + 1}`}: ${cell}`);
        });
        return null;
      },
    });
  } catch (error) {
    if (error instanceof DocumentRejectedError) throw error;
    throw new DocumentRejectedError(`could not read the CSV: ${(error as Error).message}`);
  }
  return out.finish();
}

// ==================== JSON ====================

const IDENTIFIER = /^[A-Za-z_$][\w$]*$/;
/** A path deeper than this shows its last steps only: it stays readable, and a pathological nesting stays linear. */
const MAX_PATH_STEPS = 16;

interface Step {
  parent: Step | null;
  key: string | number;
  depth: number;
}

function pathText(step: Step | null): string {
  const keys: (string | number)[] = [];
  for (let at = step; at && keys.length < MAX_PATH_STEPS; at = at.parent) keys.push(at.key);
  keys.reverse();
  let text = step && step.depth > MAX_PATH_STEPS ? '…' : '';
  for (const key of keys) {
    if (typeof key === 'number') text += `[${key}]`;
    else if (IDENTIFIER.test(key)) text += text ? `.${key}` : key;
    else text += `[${JSON.stringify(key)}]`;
  }
  return text;
}

/** Keys this deep or shallower that hold objects or arrays are headings: `products` > `K-7`. */
const HEADING_DEPTH = 2;

/**
 * JSON as `path: value` lines (`faq[2].answer: ...`): the keys of the first two levels that hold
 * objects or arrays are the headings of sections, every object starts a paragraph, so a record
 * stays in one chunk where it fits. Walked with an explicit stack: nesting depth cannot overflow
 * the call stack.
 */
export function jsonSpans(text: string, maxTextChars: number): ExtractedSpans {
  let root: unknown;
  try {
    root = JSON.parse(text);
  } catch (error) {
    throw new DocumentRejectedError(`the file is not valid JSON: ${(error as Error).message}`);
  }
  const out = new TextBuilder('json', maxTextChars);
  const stack: { step: Step | null; value: unknown }[] = [{ step: null, value: root }];
  while (stack.length > 0) {
    const { step, value } = stack.pop()!;
    const entries: [string | number, unknown][] | null =
      value !== null && typeof value === 'object' ? (Array.isArray(value) ? value.map((v, i) => [i, v]) : Object.entries(value)) : null;
    const depth = step?.depth ?? 0;
    if (step && depth <= HEADING_DEPTH) {
      if (entries && entries.length > 0 && typeof step.key === 'string') out.heading(depth, step.key);
      else out.rise(depth - 1);
    }
    if (entries && entries.length > 0) {
      if (!Array.isArray(value)) out.separate('paragraph');
      for (let i = entries.length - 1; i >= 0; i--) {
        const [key, child] = entries[i]!;
        stack.push({ step: { parent: step, key, depth: depth + 1 }, value: child });
      }
      continue;
    }
    out.separate('line');
    const shown = entries ? (Array.isArray(value) ? '[]' : '{}') : typeof value === 'string' ? value : JSON.stringify(value);
    out.write(step ? `${pathText(step)}: ${shown}` : shown);
  }
  return out.finish();
}
