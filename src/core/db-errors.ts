/** Seconds a client is told to wait (Retry-After) when the database cannot be reached. */
export const DATABASE_RETRY_AFTER_SECONDS = 5;

/**
 * SQLSTATEs that mean "the database is not there right now", not "this request is wrong": the
 * connection classes (08xxx), an operator intervention (57P01 admin shutdown, 57P02 crash shutdown,
 * 57P03 cannot connect now, 57P04 database dropped), a database that does not exist (3D000, e.g.
 * dropped while running) and too many connections (53300).
 */
export function isDatabaseUnavailableCode(code: string): boolean {
  return code.startsWith('08') || /^57P0\d$/.test(code) || code === '3D000' || code === '53300';
}
