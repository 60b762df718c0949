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

function childPath(path: string, key: string | number): string {
  if (typeof key === 'number') return `${path}[${key}]`;
  if (IDENTIFIER.test(key)) return path ? `${path}.${key}` : key;
  return `${path}[${JSON.stringify(key)}]`;
}

/**
 * JSON as `path: value` lines (`faq[2].answer: ...`): each top-level key of an object is a
 * section, each element of an array that holds objects a paragraph, so a record stays in one
 * chunk. Walked with an explicit stack: nesting depth cannot overflow the call stack.
 */
export function jsonSpans(text: string, maxTextChars: number): ExtractedSpans {
  let root: unknown;
  try {
    root = JSON.parse(text);
  } catch (error) {
    throw new DocumentRejectedError(`the file is not valid JSON: ${(error as Error).message}`);
  }
  const out = new TextBuilder('json', maxTextChars);
  type Frame = { path: string; value: unknown; topKey?: string };
  const stack: Frame[] = [];
  const pushChildren = (path: string, value: object, top: boolean) => {
    const entries = Array.isArray(value) ? value.map((v, i) => [i, v] as const) : Object.entries(value);
    for (let i = entries.length - 1; i >= 0; i--) {
      const [key, child] = entries[i]!;
      stack.push({ path: childPath(path, key), value: child, ...(top && typeof key === 'string' ? { topKey: key } : {}) });
    }
  };
  if (root !== null && typeof root === 'object') pushChildren('', root, !Array.isArray(root));
  else stack.push({ path: '', value: root });

  while (stack.length > 0) {
    const { path, value, topKey } = stack.pop()!;
    if (topKey !== undefined) out.heading(1, topKey);
    if (value !== null && typeof value === 'object') {
      const empty = Array.isArray(value) ? value.length === 0 : Object.keys(value).length === 0;
      if (empty) {
        out.separate('line');
        out.write(`${path}: ${Array.isArray(value) ? '[]' : '{}'}`);
      } else {
        // An element of an array that is itself a record starts a paragraph.
        if (/\]$/.test(path) && !Array.isArray(value)) out.separate('paragraph');
        pushChildren(path, value, false);
      }
      continue;
    }
    out.separate('line');
    const shown = typeof value === 'string' ? value : JSON.stringify(value);
    out.write(path ? `${path}: ${shown}` : shown);
  }
  return out.finish();
}
