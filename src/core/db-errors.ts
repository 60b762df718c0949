import { findInCauses } from '../utils/error-chain.js';

/** Seconds a client is told to wait (Retry-After) when the database cannot be reached. */
export const DATABASE_RETRY_AFTER_SECONDS = 5;

/**
 * SQLSTATEs that mean "the database cannot serve this right now", not "this request is wrong": the
 * connection classes (08xxx), an operator intervention (57P01 admin shutdown, 57P02 crash shutdown,
 * 57P03 cannot connect now, 57P04 database dropped), a database that does not exist (3D000, e.g.
 * dropped while running), too many connections (53300), and a statement that ran out of time
 * (57014: DATABASE_STATEMENT_TIMEOUT_MS, waiting for a lock or an overloaded server; Keel cancels
 * no statement of its own) or could not get its lock (55P03).
 */
export function isDatabaseUnavailableCode(code: string): boolean {
  return code.startsWith('08') || /^57P0\d$/.test(code) || code === '3D000' || code === '53300' || code === '57014' || code === '55P03';
}

export interface DatabaseError {
  code: string;
  constraint?: string;
  message?: string;
  /** PostgreSQL's DETAIL (pg and PGlite alike), e.g. "Unicode low surrogate must follow a high surrogate." */
  detail?: string;
}

/** Drizzle wraps driver errors; the SQLSTATE sits on the error or its cause (pg and PGlite alike). */
export function databaseError(error: unknown): DatabaseError | null {
  const found = findInCauses(error, (e) => {
    const code = (e as { code?: unknown }).code;
    return typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code);
  });
  return (found as DatabaseError | undefined) ?? null;
}
