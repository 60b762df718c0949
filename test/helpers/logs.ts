/** A logger whose lines a test can read: what the app logged, as pino wrote it (JSON, redacted). */
import pino from 'pino';

import { loggerOptions } from '../../src/core/logger.js';

export interface CapturedLogs {
  logger: pino.Logger;
  /** Every line so far, parsed. */
  lines(): Record<string, unknown>[];
  /** Forgets the lines so far (between tests of one app). */
  clear(): void;
}

/** pino's numeric levels, for filtering `lines()`. */
export const LEVEL = { debug: 20, info: 30, warn: 40, error: 50 } as const;

export function captureLogs(level: 'trace' | 'debug' | 'info' | 'warn' | 'error' = 'info'): CapturedLogs {
  let text = '';
  // The app's own options (redaction included), so a test sees what production would write.
  const logger = pino(loggerOptions({ LOG_LEVEL: level, LOG_FORMAT: 'json' }), {
    write: (line: string) => {
      text += line;
    },
  });
  return {
    logger,
    lines: () =>
      text
        .split('\n')
        .filter(Boolean)
        .map((line) => JSON.parse(line) as Record<string, unknown>),
    clear: () => {
      text = '';
    },
  };
}
