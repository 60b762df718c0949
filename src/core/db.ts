import { chmodSync, existsSync, lstatSync, mkdirSync, readdirSync, realpathSync } from 'node:fs';
import { dirname, join, sep } from 'node:path';
import { setFlagsFromString } from 'node:v8';

import { PGlite } from '@electric-sql/pglite';
import { vector } from '@electric-sql/pglite-pgvector';
import type { PgDatabase, PgQueryResultHKT } from 'drizzle-orm/pg-core';
import { drizzle as drizzlePglite } from 'drizzle-orm/pglite';

import type { Settings } from './config.js';
import { lockDirectory } from './data-dir-lock.js';
import { databaseError } from './db-errors.js';
import { inProcessLink, type PgliteLink, PgliteStatementClient } from './pglite-client.js';
import { openPgliteThread } from './pglite-thread.js';

/**
 * The database handle every crud function takes first; a transaction is one too. Built without
 * Drizzle's relational query API (`db.query.<table>`, unused here): Drizzle makes that API's
 * builders for every table each time it opens a transaction, ~0.5 % of an agent run's CPU.
 */
export type Db = PgDatabase<PgQueryResultHKT>;

/** Raw access for what the query builder cannot say: migrations, locks, health checks. */
export interface SqlSession {
  /** Runs one or more statements without parameters. */
  exec(sqlText: string): Promise<void>;
  query<T extends Record<string, unknown>>(sqlText: string, params?: unknown[]): Promise<T[]>;
}

export interface Database {
  db: Db;
  kind: 'pglite' | 'postgres';
  /** Runs `work` on one connection held for its whole duration (session-level locks need that). */
  withSession<T>(work: (session: SqlSession) => Promise<T>): Promise<T>;
  ping(): Promise<void>;
  /**
   * Embedded only: how long the one session has had nothing to do, in ms (0 while a statement runs
   * or waits, or a transaction or session is open); what embedded maintenance (maintenance.ts)
   * waits for before a VACUUM.
   */
  idleMs?(): number;
  /**
   * Hears NOTIFY on `channel` from every connection: `message` for each payload, and `status` as
   * delivery becomes reliable (true) or not (false: a lost server connection, until it is back).
   * Embedded, every write happens in this process, so there is nothing to hear and status is true.
   */
  listen(channel: string, handlers: ListenHandlers): Promise<void>;
  close(): Promise<void>;
}

export interface ListenHandlers {
  message(payload: string): void;
  status(reliable: boolean): void;
}

// ==================== Transactions ====================

const openTransactions = new WeakMap<object, { root: Db; afterCommit: (() => void)[]; nested: boolean }>();

/**
 * Runs `work` in a transaction. Use this rather than `db.transaction`: it lets code deep in a
 * transaction (crud) find the root handle and defer work until the commit (cache evictions).
 */
export async function transaction<T>(db: Db, work: (tx: Db) => Promise<T>): Promise<T> {
  // Nested (a savepoint): callbacks wait for the outermost commit, not the savepoint's release.
  const outer = openTransactions.get(db);
  const afterCommit = outer?.afterCommit ?? [];
  const run = async (tx: Db) => {
    openTransactions.set(tx, { root: rootOf(db), afterCommit, nested: outer !== undefined });
    return work(tx);
  };
  const pooled = outer ? undefined : pooledTransactions.get(db);
  const result = pooled ? await pooled(run) : await db.transaction(run);
  if (!outer) for (const callback of afterCommit) callback();
  return result;
}

/** How many times `deadlockRetried` runs a transaction in all. */
const DEADLOCK_ATTEMPTS = 3;

/** The wait before `deadlockRetried`'s second run, in ms (doubled before each further one, jittered). */
const DEADLOCK_BACKOFF_MS = 20;

/**
 * The SQLSTATEs of a transaction PostgreSQL rolled back whole for colliding with another, which
 * running it again may pass: a deadlock broken (40P01), a serialization failure (40001, where a
 * session or the server runs at REPEATABLE READ or SERIALIZABLE).
 */
const TRANSIENT_CONFLICTS = new Set(['40P01', '40001']);

/** Whether `error` is such a conflict (`TRANSIENT_CONFLICTS`): nothing of the transaction was kept, and running it again may pass. */
export function isTransientConflict(error: unknown): boolean {
  const code = databaseError(error)?.code;
  return code !== undefined && TRANSIENT_CONFLICTS.has(code);
}

/**
 * `transaction(db, work)`, run again when PostgreSQL aborted it to break a deadlock (40P01: rolled
 * back whole, nothing of it kept) or for a serialization failure (40001). For the rare deletes that
 * cascade to rows the per-call statements lock in an order a plan picks (several of one user's
 * reservations or keys in one batch): their lock order (crud/billing.ts lockBillingRows) cannot
 * match it row for row, and the side the server aborts is the one that waited first, often the
 * delete; and for ingestion's writes (services/knowledge/ingestion.ts), which meet every other
 * writer of an owner's rows. `work` runs again from the start, so it must keep what it changes
 * outside the database until the transaction has committed. After a short jittered wait, so that
 * the side that won commits first. An outermost transaction only: inside another (a savepoint) the
 * outer one keeps the locks it took, and running the inner part again would meet the same wait.
 */
export async function deadlockRetried<T>(db: Db, work: (tx: Db) => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await transaction(db, work);
    } catch (error) {
      if (attempt >= DEADLOCK_ATTEMPTS || openTransactions.has(db) || !isTransientConflict(error)) throw error;
      const backoff = DEADLOCK_BACKOFF_MS * 2 ** (attempt - 1);
      await new Promise((resolve) => setTimeout(resolve, backoff / 2 + Math.random() * backoff));
    }
  }
}

/**
 * How a transaction runs on each node-postgres handle (db-postgres.ts: pooledTransaction, which
 * checks its client out of the pool and gives it back itself); other handles use Drizzle's own.
 */
export const pooledTransactions = new WeakMap<Db, <T>(work: (tx: Db) => Promise<T>) => Promise<T>>();

/** The database handle a transaction was opened on (the handle itself outside a transaction). */
export function rootOf(db: Db): Db {
  return openTransactions.get(db)?.root ?? db;
}

/**
 * Inside a transaction opened with `transaction()`, just before its last statement: on PGlite the
 * COMMIT goes with that statement (one round trip fewer; PgliteTransaction.commitWithNext), so
 * nothing may run in the transaction after it, and what the caller does after it must not need a
 * rollback. Elsewhere (node-postgres, a savepoint, outside a transaction) nothing changes.
 */
export function commitWithNextStatement(tx: Db): void {
  const open = openTransactions.get(tx);
  if (!open || open.nested) return;
  (tx as unknown as { session: { client: { commitWithNext?: () => void } } }).session.client.commitWithNext?.();
}

/** Runs `callback` once the surrounding transaction commits (never, if it rolls back); at once outside one. */
export function afterCommit(db: Db, callback: () => void): void {
  const open = openTransactions.get(db);
  if (open) open.afterCommit.push(callback);
  else callback();
}

// ==================== Embedded (PGlite) ====================

/**
 * The embedded database holds password hashes (its WAL too): only this user may read it, whatever
 * the umask. The process umask becomes 077, since PGlite keeps creating files (WAL segments,
 * relations) as it runs, and the directory is created 0700. `tighten` closes what an older Keel
 * (or a loose umask) left open, and the one file PostgreSQL chmods itself (0644: the relation-cache
 * init file, catalog data only, written at open and after DDL); it runs at open and close.
 */
function makePrivate(dataDir: string): void {
  process.umask(0o077);
  try {
    mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  } catch (error) {
    // Node's recursive mkdir says ENOENT of a directory it could not make on a read-only file
    // system: made once more, plainly, the real reason (EROFS) is the one thrown.
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT' || !existsSync(dirname(dataDir))) throw error;
    mkdirSync(dataDir, { mode: 0o700 });
  }
}

function tighten(path: string): void {
  const stat = lstatSync(path);
  if (stat.isSymbolicLink()) return;
  if (stat.mode & 0o077) chmodSync(path, stat.mode & 0o700);
  if (stat.isDirectory()) for (const name of readdirSync(path)) tighten(join(path, name));
}

/**
 * PostgreSQL's defaults size shared memory for a server (128 MB of buffers, 100 connections),
 * and PGlite touches all of it at start: ~140 MB of the process's resident memory (measured, see
 * bench/RESULTS.md). One embedded session needs far less; pages beyond the buffers come from the
 * operating system's file cache.
 */
const PGLITE_MEMORY = ['-c', 'shared_buffers=16MB', '-c', 'max_connections=10'];

/**
 * A sequential scan of a table larger than a quarter of the buffers starts where another one is
 * (synchronized scans), so a statement that takes the first N rows a scan finds takes different
 * ones each time: knowledge search ranks a capped set of the chunks that match (services/knowledge/
 * search.ts), and the same question got a different answer from one search to the next.
 */
export const SAME_SCAN_START = 'synchronize_seqscans=off';

/** The embedded server's settings, on top of PGlite's defaults. */
const PGLITE_SETTINGS = [...PGLITE_MEMORY, '-c', SAME_SCAN_START];

/**
 * PGlite is PostgreSQL compiled to WebAssembly. V8 compiles it at once with its baseline compiler
 * (Liftoff) and then, by default, compiles the busiest functions again with its optimizing one in
 * background threads: ~40 MB of resident memory and ~0.3 s of CPU in the first seconds (measured,
 * bench/RESULTS.md), for queries whose cost in Keel is mostly the JavaScript around them. Unless
 * PGLITE_WASM_TIER_UP asks for it, modules compiled from here on keep the baseline code. The flags
 * are V8's and so apply to the whole process (worker threads too); Keel compiles no other
 * WebAssembly of its own.
 *
 * V8 decides tier-up by `--wasm-dynamic-tiering` and `--wasm-tier-up` alone; `--liftoff-only`
 * turns them off only through V8's flag implications, which the V8 of Node 24 no longer applies to
 * a flag set at run time (Node 20's did), so there it left tier-up on. Both are set either way, so
 * an open's choice holds for what is compiled after it, whatever an open before it chose (a live
 * module compiled from the same bytes is reused as it was compiled). Not `--liftoff-only` itself:
 * it would also make a function Liftoff cannot compile a fatal error instead of one compiled by
 * TurboFan.
 */
function chooseWasmTiering(settings: Settings): void {
  setFlagsFromString(settings.PGLITE_WASM_TIER_UP ? '--wasm-dynamic-tiering --wasm-tier-up' : '--no-wasm-dynamic-tiering --no-wasm-tier-up');
}

async function openPglite(settings: Settings): Promise<Database> {
  const given = settings.PGLITE_DATA_DIR ?? join(settings.dataDir, 'pglite');
  let dataDir = given;
  let unlock = () => undefined as void;
  // DATA_DIR as a whole when the database lives in it (the default).
  const privateRoot = given.startsWith(settings.dataDir + sep) ? settings.dataDir : given;
  let keepPrivate = () => undefined as void;
  if (!given.startsWith('memory://')) {
    makePrivate(given);
    keepPrivate = () => tighten(privateRoot);
    // The directory by its canonical path, for the lock and for PGlite: a trailing slash, a symlink
    // or a relative path naming the same directory must find the same lock, and PGlite's file
    // system fails to open a data directory that is itself a symlink (errno 44, "[object Object]").
    dataDir = realpathSync(given);
    // One process per directory: two PGlite instances on one directory each see only their own
    // writes and overwrite each other's (and a start releases every credit reservation it finds,
    // usage-meter.ts).
    unlock = lockDirectory(dataDir);
  }
  let client: PgliteStatementClient;
  const wal = new WalWriter();
  const activity = new Activity();
  try {
    chooseWasmTiering(settings);
    client = await PgliteStatementClient.open(activity.watch(wal.watch(await openPgliteLink(settings, dataDir))));
    wal.start(client);
  } catch (error) {
    unlock();
    throw error;
  }
  keepPrivate();
  let closed = false;
  try {
    // The one session's vector searches may widen their HNSW scan past the first candidates a filter
    // removes (pgvector's iterative scan; a placeholder until the extension loads): set once here,
    // so a search need not wrap its query in a transaction to SET LOCAL it (services/knowledge/embeddings.ts).
    await client.exec('set hnsw.iterative_scan = relaxed_order');
  } catch (error) {
    await client.close().catch(() => undefined);
    unlock();
    throw error;
  }
  return {
    db: drizzlePglite({ client: client as unknown as PGlite, casing: 'snake_case' }) as unknown as Db,
    kind: 'pglite',
    // PGlite is a single session: this holds it, so no other caller's statement runs in between.
    withSession: <T>(work: (session: SqlSession) => Promise<T>): Promise<T> =>
      client.session((session) =>
        work({
          exec: async (sqlText) => {
            await session.exec(sqlText);
          },
          query: async <R extends Record<string, unknown>>(sqlText: string, params: unknown[] = []) => (await session.query<R>(sqlText, params)).rows,
        }),
      ),
    ping: async () => {
      if (closed) throw new Error('database is closed');
      await client.query('select 1');
    },
    // A transaction or session held open is work in progress though nothing is in flight between its statements.
    idleMs: () => (client.busy ? 0 : activity.idleMs()),
    listen: async (_channel, handlers) => {
      handlers.status(true);
    },
    close: async () => {
      if (closed) return;
      closed = true;
      wal.stop();
      try {
        await client.close();
        keepPrivate();
      } finally {
        unlock();
      }
    },
  };
}

/** How soon after a statement its commit's WAL is written, at the latest (PostgreSQL's WAL writer: ~3 × wal_writer_delay, 600 ms). */
const WAL_WRITE_MS = 500;
/**
 * A WAL record written and flushed at once (PostgreSQL 17's `flush`), and every record before it
 * with it. A durable commit of a transaction that wrote nothing flushes nothing (tried): it has no
 * WAL of its own to wait for.
 */
const WAL_FLUSH = "select pg_logical_emit_message(false, 'keel-wal-write', '', true)";

/**
 * PostgreSQL's WAL writer, which PGlite has not: a commit made without waiting for the WAL
 * (`synchronous_commit = off`: credit holds and settlements, usage batches, a run's claim (embedded), knowledge
 * batches) stays in PGlite's memory until a later commit waits for the WAL, and in a quiet process
 * none came: a kill -9 lost every such commit since the last durable one, however old (answered
 * calls' charges and usage records). So WAL_WRITE_MS after statements were sent, a flush of its own
 * writes the WAL up to them; again while more are sent meanwhile, never while idle.
 */
class WalWriter {
  private sent = 0;
  private timer: NodeJS.Timeout | undefined;
  private client: PgliteStatementClient | undefined;
  private stopped = false;

  /** `link`, counting what is sent over it. */
  watch(link: PgliteLink): PgliteLink {
    const note = () => {
      this.sent += 1;
      if (!this.timer && this.client && !this.stopped) this.timer = setTimeout(() => void this.write(), WAL_WRITE_MS).unref();
    };
    const sendHeld = link.sendHeld?.bind(link);
    return {
      send: (message) => {
        note();
        return link.send(message);
      },
      sendHeld: sendHeld
        ? (message) => {
            note();
            return sendHeld(message);
          }
        : undefined,
      close: () => link.close(),
    };
  }

  start(client: PgliteStatementClient): void {
    this.client = client;
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private async write(): Promise<void> {
    const before = this.sent;
    try {
      await this.client!.exec(WAL_FLUSH);
    } catch {
      // Closed meanwhile, or the database refused: the next statements' commit tries again.
    }
    this.timer = undefined;
    // Others sent besides this commit (its own is one exchange): their WAL is written at the next turn.
    if (this.sent > before + 1 && !this.stopped) this.timer = setTimeout(() => void this.write(), WAL_WRITE_MS).unref();
  }
}

/**
 * What the one session is doing: exchanges in flight, and when the last one ended. A statement
 * waiting for the session (behind a transaction) is not sent yet, but the transaction holding it
 * is: its statements keep the count above 0, or only between two of them does it drop, for less
 * than a turn of the event loop.
 */
class Activity {
  private inFlight = 0;
  private lastEnded = performance.now();

  watch(link: PgliteLink): PgliteLink {
    const track = (reply: Promise<Uint8Array>): Promise<Uint8Array> => {
      this.inFlight += 1;
      return reply.finally(() => {
        this.inFlight -= 1;
        this.lastEnded = performance.now();
      });
    };
    const sendHeld = link.sendHeld?.bind(link);
    return {
      send: (message) => track(link.send(message)),
      sendHeld: sendHeld ? (message) => track(sendHeld(message)) : undefined,
      close: () => link.close(),
    };
  }

  idleMs(): number {
    return this.inFlight > 0 ? 0 : performance.now() - this.lastEnded;
  }
}

/**
 * PGlite on a thread of its own (PGLITE_THREAD, the default) or on this one. On its own thread its
 * WebAssembly runs beside the HTTP server and the runner, on a second core; a transaction's
 * statements are waited for on this thread (pglite-thread.ts: sendHeld), so the one session does
 * not idle between them (measured against this thread, bench/RESULTS.md).
 */
async function openPgliteLink(settings: Settings, dataDir: string): Promise<PgliteLink> {
  if (settings.PGLITE_THREAD) return openPgliteThread({ dataDir, startParams: PGLITE_SETTINGS, nice: settings.PGLITE_THREAD_NICE, schedIdle: settings.PGLITE_THREAD_SCHED_IDLE });
  const options = { extensions: { vector }, startParams: [...PGlite.defaultStartParams, ...PGLITE_SETTINGS] };
  // A directory without PG_VERSION is created here (initdb), which grows PGlite's WebAssembly
  // memory to ~600 MB that it never gives back: open it a second time, in a fresh instance, so
  // a first start runs on as little memory as every later one (measured, bench/RESULTS.md).
  // (pglite-thread.ts does the same.)
  const initdb = !dataDir.startsWith('memory://') && !existsSync(join(dataDir, 'PG_VERSION'));
  let pg = await PGlite.create(dataDir, options);
  if (initdb) {
    await pg.close();
    pg = await PGlite.create(dataDir, options);
  }
  return inProcessLink(pg);
}

export async function openDatabase(settings: Settings): Promise<Database> {
  if (!settings.DATABASE_URL) return openPglite(settings);
  const { openPostgres } = await import('./db-postgres.js');
  return openPostgres(settings, settings.DATABASE_URL);
}
