/**
 * node-postgres 8 reads `sslmode=prefer`, `require` and `verify-ca` as `verify-full` (TLS required,
 * the certificate checked against trusted CAs and the host name), not as libpq does, and says so in
 * a multi-line process warning of its own on stderr, before anything Keel prints. Keel gives it the
 * URL with `verify-full` written out (what it does with the other three anyway, so nothing changes
 * on the wire), which it does not warn about, and says the same once in its log instead
 * (sslModeWarning). Kept apart from db-postgres.ts: the log line is written at start-up, where
 * node-postgres is not loaded yet.
 */

/** The modes node-postgres warns about (pg-connection-string's deprecatedSslModeWarning). */
const ALIASED_MODES = new Set(['prefer', 'require', 'verify-ca']);

/** The sslmode node-postgres reads as verify-full in DATABASE_URL, or null (none, another, or `uselibpqcompat=true`). */
function aliasedSslMode(url: string): string | null {
  let params: URLSearchParams;
  try {
    params = new URL(url).searchParams;
  } catch {
    return null;
  }
  // Like node-postgres: the last of a repeated parameter counts.
  const mode = params.getAll('sslmode').at(-1);
  if (mode === undefined || !ALIASED_MODES.has(mode) || params.getAll('uselibpqcompat').at(-1) === 'true') return null;
  return mode;
}

/** DATABASE_URL as node-postgres should get it: an aliased sslmode written as the verify-full it means. */
export function pgConnectionString(url: string): string {
  if (aliasedSslMode(url) === null) return url;
  // Only the query's parameter is rewritten: the rest of the URL stays as given, its password
  // included, which may hold `&sslmode=` itself. The query starts at the first `?`, as the URL
  // parser reads it (a `?` in a password must be percent-encoded); aliasedSslMode found one.
  const query = url.indexOf('?');
  return url.slice(0, query) + url.slice(query).replace(/([?&])sslmode=[^&#]*/g, '$1sslmode=verify-full');
}

/** What node-postgres would have warned about, in one line for Keel's log; null when it would not. */
export function sslModeWarning(url: string | undefined): string | null {
  const mode = url === undefined ? null : aliasedSslMode(url);
  if (mode === null) return null;
  return (
    `DATABASE_URL: sslmode=${mode} is taken as verify-full by node-postgres (TLS required, the server's certificate checked against trusted CAs and the host name), ` +
    `not with libpq's meaning (it never falls back to plain text either); write sslmode=verify-full to say so, or sslmode=disable for a server without TLS`
  );
}
