import { statfsSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';

import { isDiskFullCode } from '../utils/error-chain.js';
import { ConfigError, type Settings } from './config.js';
import { DataDirLockedError, DataDirLockError } from './data-dir-lock.js';
import type { Database } from './db.js';
import { ioredis } from './redis.js';

/**
 * Start-up checks that turn what an operator can fix (an unreachable database or Redis, a port in
 * use, an unwritable data directory) into one line naming the setting, before anything is changed.
 */

type Failure = { code?: unknown; errno?: unknown; message?: unknown; errors?: unknown; cause?: unknown };

/** The first errno-like `code` on the error, its cause or (for AggregateError) its parts. */
function errorCode(error: unknown): string | undefined {
  for (let e = error as Failure | undefined, depth = 0; e && depth < 4; depth++) {
    if (typeof e.code === 'string') return e.code;
    const first = Array.isArray(e.errors) ? (e.errors[0] as Failure | undefined) : undefined;
    if (first && typeof first.code === 'string') return first.code;
    e = e.cause as Failure | undefined;
  }
  return undefined;
}

function messageOf(error: unknown): string {
  const message = (error as Failure | undefined)?.message;
  return typeof message === 'string' && message ? message : String(error);
}

/** host:port of a URL, without its credentials. */
function where(url: string, defaultPort: number): string {
  try {
    const parsed = new URL(url);
    return `${parsed.hostname || 'localhost'}:${parsed.port || defaultPort}`;
  } catch {
    return 'the server';
  }
}

function networkProblem(code: string | undefined, target: string): string | null {
  switch (code) {
    case 'ECONNREFUSED':
      return `connection to ${target} refused: is the server running there, and is the port right?`;
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return `host of ${target} not found: check the host name`;
    case 'ETIMEDOUT':
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
      return `${target} cannot be reached (${code}): check the host, the port and the firewall`;
    default:
      return null;
  }
}

/** What went wrong connecting to DATABASE_URL, as one line naming it; null when it is not that. */
export function databaseProblem(error: unknown, settings: Settings): ConfigError | null {
  if (!settings.DATABASE_URL) return null;
  const target = where(settings.DATABASE_URL, 5432);
  const code = errorCode(error);
  const network = networkProblem(code, target);
  if (network) return new ConfigError(`DATABASE_URL: ${network}`);
  if (/timeout exceeded when trying to connect|Connection terminated due to connection timeout/.test(messageOf(error))) {
    return new ConfigError(
      `DATABASE_URL: no answer from ${target} within DATABASE_CONNECT_TIMEOUT_MS (${settings.DATABASE_CONNECT_TIMEOUT_MS} ms): check the host, the port and the firewall`,
    );
  }
  // node-postgres's words when the URL asks for TLS (sslmode=require, ssl=true) and the server answers that it has none.
  if (/server does not support SSL connections/i.test(messageOf(error))) {
    return new ConfigError(
      `DATABASE_URL: the URL asks for TLS (sslmode or ssl) but PostgreSQL at ${target} does not support SSL connections: enable SSL on the server, or remove sslmode (or set sslmode=disable) in DATABASE_URL`,
    );
  }
  const fixes: Record<string, string> = {
    '3D000': 'create it (createdb) or fix the database name in the URL',
    '28000': 'create the role or fix the user name in the URL',
    '28P01': 'fix the password in the URL',
    '57P03': 'the server is starting up or shutting down: try again shortly',
    // Each Keel process holds up to DATABASE_POOL_SIZE connections and three that listen for changes (db-postgres.ts, Listener): N api and M worker nodes need (N + M) times that.
    '53300':
      "every connection it allows is taken (the server's max_connections, or the role's or database's CONNECTION LIMIT): raise that limit, stop what holds connections, or lower DATABASE_POOL_SIZE (each Keel process holds up to that many, and three more that listen for changes)",
  };
  if (code && fixes[code]) return new ConfigError(`DATABASE_URL: PostgreSQL at ${target} says: ${messageOf(error)}; ${fixes[code]}`);
  if (code && /^(08|28|3D)/.test(code)) return new ConfigError(`DATABASE_URL: PostgreSQL at ${target} refused the connection: ${messageOf(error)}`);
  return null;
}

/** Emscripten's numbers (PGlite's file system) for the errors an operator can fix. */
const WASM_ERRNO: Record<number, string> = { 2: 'EACCES', 19: 'EDQUOT', 44: 'ENOENT', 51: 'ENOSPC', 54: 'ENOTDIR', 63: 'EPERM', 69: 'EROFS' };

/**
 * The free space PGlite may need to open a data directory: PostgreSQL writes a whole WAL segment
 * (pg_wal/xlogtemp.*, 16 MB) as it starts unless it can recycle one, and PGlite says only that it
 * "failed to initialize".
 */
const PGLITE_START_BYTES = 16 << 20;

/** Bytes free (to this user) on the disk holding `dir`, or null when it cannot be told. */
function freeBytes(dir: string): number | null {
  try {
    const { bavail, bsize } = statfsSync(dir);
    return bavail * bsize;
  } catch {
    return null;
  }
}

const megabytes = (bytes: number) => `${(bytes / (1 << 20)).toFixed(1)} MB`;

/** The embedded database could not be opened: name the directory and the setting that chose it. */
function pgliteProblem(error: unknown, settings: Settings): ConfigError {
  const dir = settings.PGLITE_DATA_DIR ?? join(settings.dataDir, 'pglite');
  const setting = settings.PGLITE_DATA_DIR ? 'PGLITE_DATA_DIR' : 'DATA_DIR';
  // Its lock says which file and why.
  if (error instanceof DataDirLockError) return new ConfigError(`${setting}: ${error.message}`);
  const errno = (error as Failure | undefined)?.errno;
  const code = errorCode(error) ?? (typeof errno === 'number' ? WASM_ERRNO[errno] : undefined);
  const free = freeBytes(dir);
  const room = free === null ? '' : ` (${megabytes(free)} free; opening it may write a ${PGLITE_START_BYTES >> 20} MB WAL segment)`;
  if (isDiskFullCode(code)) {
    return new ConfigError(`${setting}: cannot open the embedded database in ${dir}: the disk holding it is full${room}: free space there`);
  }
  if (code === 'EROFS') return new ConfigError(`${setting}: cannot open the embedded database in ${dir}: its file system is read-only: mount it read-write, or set ${setting} to a writable directory`);
  const reason = code ?? (typeof errno === 'number' ? `errno ${errno}` : messageOf(error));
  // PGlite says only "failed to initialize" when the disk is full as it starts: too little room is
  // named as the likely cause, beside its own words (a damaged directory on a small disk is not a full one).
  if (code === undefined && free !== null && free < PGLITE_START_BYTES) {
    return new ConfigError(`${setting}: cannot open the embedded database in ${dir} (${reason}): the disk holding it may be full${room}: free space there, or check the directory`);
  }
  return new ConfigError(`${setting}: cannot open the embedded database in ${dir} (${reason}): check that it is a directory this user can write, or set ${setting}`);
}

/** Opens the database and makes one round trip, so a bad DATABASE_URL or data directory fails here. */
export async function openCheckedDatabase(settings: Settings): Promise<Database> {
  let database: Database;
  try {
    // Imported here: the database drivers are not loaded by commands that never open one.
    const { openDatabase } = await import('./db.js');
    database = await openDatabase(settings);
  } catch (error) {
    // A held data directory already says which process holds it.
    if (error instanceof DataDirLockedError) throw error;
    throw settings.DATABASE_URL ? (databaseProblem(error, settings) ?? error) : pgliteProblem(error, settings);
  }
  try {
    await database.ping();
  } catch (error) {
    await database.close().catch(() => undefined);
    throw (settings.DATABASE_URL ? databaseProblem(error, settings) : pgliteProblem(error, settings)) ?? error;
  }
  return database;
}

/** Fails when HOST:PORT cannot be listened on, before migrations or anything else run. */
export async function checkListenAddress(settings: Pick<Settings, 'HOST' | 'PORT'>): Promise<void> {
  if (settings.PORT === 0) return;
  const server = createServer();
  try {
    await new Promise<void>((done, fail) => {
      server.once('error', fail);
      server.listen({ host: settings.HOST, port: settings.PORT, exclusive: true }, done);
    });
  } catch (error) {
    throw listenProblem(error, settings) ?? error;
  } finally {
    await new Promise<void>((done) => server.close(() => done()));
  }
}

/** A failed listen as one line naming PORT or HOST; null for other errors. */
export function listenProblem(error: unknown, { HOST, PORT }: Pick<Settings, 'HOST' | 'PORT'>): ConfigError | null {
  switch (errorCode(error)) {
    case 'EADDRINUSE':
      return new ConfigError(`PORT: ${HOST}:${PORT} is already in use (another Keel?): stop that process or choose another PORT (or --port)`);
    case 'EACCES':
      return new ConfigError(`PORT: listening on port ${PORT} needs privileges this user lacks: choose a port above 1023`);
    case 'EADDRNOTAVAIL':
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return new ConfigError(`HOST: ${HOST} is not an address of this machine: use e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)`);
    default:
      return null;
  }
}

const REDIS_CHECK_TIMEOUT_MS = 3_000;

/**
 * A server at REDIS_URL that is not Redis (PostgreSQL's 5432, an HTTP server): it closes the
 * connection on Redis's first command, or answers in another protocol and hangs up, and ioredis
 * says only "Connection is closed.", "Unknown RESP type ... Please report this." or, writing its
 * next command first, EPIPE (which of these comes first varies); null for other errors.
 */
function notRedis(cause: unknown, target: string): string | null {
  const closed = /^Connection is closed\.?$|Unknown RESP type|Protocol error/i.test(messageOf(cause)) || ['EPIPE', 'ECONNRESET'].includes(errorCode(cause) ?? '');
  return closed
    ? `${target} is not answering as Redis (it hung up, or answered in another protocol): check that the port is Redis's (6379 by default) and not another service's, and whether the server wants TLS (rediss://)`
    : null;
}

/**
 * With REDIS_URL set, Redis carries the rate-limit counters and the job queue: without it logins
 * and `/ready` answer 503 and no email goes out, so a process that cannot reach it refuses to start.
 */
export async function checkRedis(settings: Pick<Settings, 'REDIS_URL'>): Promise<void> {
  if (!settings.REDIS_URL) return;
  const target = where(settings.REDIS_URL, 6379);
  const client = new (ioredis().Redis)(settings.REDIS_URL, {
    lazyConnect: true,
    connectTimeout: REDIS_CHECK_TIMEOUT_MS,
    // The connect timeout covers only the TCP handshake: a server (or proxy) that accepts and
    // never answers would hold the connection's SELECT and ready check, and the start, for ever.
    commandTimeout: REDIS_CHECK_TIMEOUT_MS,
    maxRetriesPerRequest: 0,
    enableOfflineQueue: false,
    retryStrategy: () => null,
  });
  // The first error says what went wrong: after a server that is not Redis answered in another
  // protocol and hung up, ioredis's next write fails too (EPIPE), which says nothing.
  let firstError: Error | undefined;
  client.on('error', (error) => (firstError ??= error));
  try {
    await client.connect();
    await client.ping();
    // ioredis reports a refused SELECT (a database number past the server's `databases`) as an
    // 'error' event and goes on with database 0, where every node's keys would then mix.
    if (firstError) throw firstError;
  } catch (error) {
    const cause = firstError ?? error;
    const reason =
      networkProblem(errorCode(cause), target) ??
      (messageOf(cause) === 'Command timed out'
        ? `no answer from ${target} within ${REDIS_CHECK_TIMEOUT_MS} ms: is Redis running there (not paused), and is the port right?`
        : notRedis(cause, target) ?? `${target}: ${messageOf(cause)}`);
    throw new ConfigError(`REDIS_URL: ${reason}; start Redis, fix REDIS_URL, or unset it to run without Redis`);
  } finally {
    client.disconnect();
  }
}
