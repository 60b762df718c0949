/**
 * The database on a PostgreSQL server (DATABASE_URL), through node-postgres. Loaded by db.ts's
 * openDatabase only when DATABASE_URL is set: an embedded start never needs node-postgres and
 * Drizzle's driver for it (~80 ms of CPU at start, measured: bench/RESULTS.md).
 */
import { drizzle as drizzleNodePg } from 'drizzle-orm/node-postgres';
import pg from 'pg';

import type { Settings } from './config.js';
import { type Database, type Db, type ListenHandlers, pooledTransactions, SAME_SCAN_START } from './db.js';
import { pgConnectionString } from './pg-sslmode.js';

const DRIZZLE_OPTIONS = { casing: 'snake_case' } as const;

/** A handle for each client of the server's pool (see pooledTransaction). */
const clientHandles = new WeakMap<pg.PoolClient, Db>();

/**
 * A transaction on a client of the server's pool, checked out and given back here rather than by
 * Drizzle: Drizzle's node-postgres transaction sends BEGIN before the `try` whose `finally` gives
 * the client back, so a BEGIN that fails (its connection lost, or timed out on a server gone
 * silent) never returns its client, and once DATABASE_POOL_SIZE had failed so, every request
 * waited for a client that never came, until a restart (drizzle-orm#6241). Given back here
 * whatever happens; the pool drops a client whose connection is gone.
 */
async function pooledTransaction<T>(pool: pg.Pool, work: (tx: Db) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  let handle = clientHandles.get(client);
  if (!handle) clientHandles.set(client, (handle = drizzleNodePg(client, DRIZZLE_OPTIONS)));
  try {
    return await handle.transaction(work);
  } finally {
    // One closed for a silent server is given back as failed (the pool drops it now): its socket is
    // destroyed, but until that is heard the client still looks usable and would be handed out again.
    client.release(closedOnTimeout.has(client) || undefined);
  }
}

export function openPostgres(settings: Settings, databaseUrl: string): Database {
  // Without node-postgres's own multi-line warning about sslmode on stderr; Keel logs its own (pg-sslmode.ts).
  const url = pgConnectionString(databaseUrl);
  const pool = new pg.Pool({
    connectionString: url,
    max: settings.DATABASE_POOL_SIZE,
    idleTimeoutMillis: settings.DATABASE_POOL_IDLE_TIMEOUT_MS,
    connectionTimeoutMillis: settings.DATABASE_CONNECT_TIMEOUT_MS,
    statement_timeout: settings.DATABASE_STATEMENT_TIMEOUT_MS || undefined,
    query_timeout: queryTimeoutMs(settings),
    application_name: 'keel',
    // Settings every session starts with (a DATABASE_URL that has `options` of its own replaces these).
    options: `-c ${SAME_SCAN_START}`,
  });
  // An idle client that loses its server emits here; without a listener the process would crash.
  pool.on('error', () => undefined);
  // So does a client checked out (a transaction's, a session's) whose connection ends, after failing
  // its statement: the pool listens only to idle clients, and an 'error' event nobody listens to
  // crashed the process, with the calls it had answered but not yet written. The failed statement
  // carries the error to its caller; the pool drops the client when it comes back.
  pool.on('connect', (client) => {
    client.on('error', () => undefined);
    closeOnQueryTimeout(client);
  });
  const listeners: Listener[] = [];
  const db = drizzleNodePg(pool, DRIZZLE_OPTIONS);
  pooledTransactions.set(db, (work) => pooledTransaction(pool, work));
  return {
    db,
    kind: 'postgres',
    withSession: async (work) => {
      const client = await pool.connect();
      let failure: Error | undefined;
      try {
        return await work({
          // A session's statements (migrations: `statement_timeout = 0`, waits for the migration lock) may take as long as they need.
          exec: async (sqlText) => {
            await client.query(unbounded(sqlText));
          },
          query: async <T extends Record<string, unknown>>(sqlText: string, params: unknown[] = []) =>
            (await client.query<T>(unbounded(sqlText, params))).rows,
        });
      } catch (error) {
        failure = error instanceof Error ? error : new Error('session failed');
        throw error;
      } finally {
        // A connection that failed is destroyed, not handed back to the pool in an unknown state.
        client.release(failure);
      }
    },
    ping: async () => {
      await pool.query('select 1');
    },
    listen: async (channel, handlers) => {
      const listener = new Listener(settings, url, channel, handlers);
      listeners.push(listener);
      await listener.start();
    },
    close: async () => {
      await Promise.all(listeners.map((l) => l.stop()));
      if (!pool.ending) await pool.end();
    },
  };
}

/**
 * How long the app waits for a statement's answer: the server's own limit and then some, so a
 * statement it cancels reports the server's error (57014); past that, the server has gone silent
 * (a network black hole, a paused proxy, a host that vanished) and without a limit a request would
 * wait until TCP gave up, some 15 minutes. None when the server's limit is off.
 */
const QUERY_TIMEOUT_MARGIN_MS = 2_000;
const queryTimeoutMs = (settings: Settings): number | undefined =>
  settings.DATABASE_STATEMENT_TIMEOUT_MS ? settings.DATABASE_STATEMENT_TIMEOUT_MS + QUERY_TIMEOUT_MARGIN_MS : undefined;
/**
 * A statement that waits as long as it takes: the longest timer Node keeps (a longer one fires at
 * once); node-postgres reads a per-statement 0 as "the client's". Its types omit the option it reads.
 */
const unbounded = (text: string, values?: unknown[]): pg.QueryConfig => ({ text, values, query_timeout: 2 ** 31 - 1 }) as pg.QueryConfig;
/** What node-postgres says when a statement outlives query_timeout. */
const QUERY_TIMEOUT_MESSAGE = 'Query read timeout';
const closedOnTimeout = new WeakSet<pg.PoolClient>();

/**
 * node-postgres fails a statement that outlives query_timeout but keeps its connection, with that
 * statement still pending on it and, with it, the transaction it was in (its ROLLBACK is queued
 * behind it, and dropped once it times out too). A transaction hands its client back to the pool
 * without an error, so the next user would queue behind the silent server and, once it answered,
 * run inside that transaction, never committed. The connection is closed instead: the server rolls
 * the transaction back, and the pool drops the client (no longer queryable) when it comes back.
 */
function closeOnQueryTimeout(client: pg.PoolClient): void {
  const close = (error: unknown) => {
    if (!(error instanceof Error) || error.message !== QUERY_TIMEOUT_MESSAGE) return;
    closedOnTimeout.add(client);
    client.connection.stream.destroy();
  };
  const query = client.query.bind(client) as (...args: unknown[]) => unknown;
  (client as { query: unknown }).query = (...args: unknown[]): unknown => {
    const callback = args.at(-1) as ((error: unknown, result: unknown) => void) | undefined;
    if (typeof callback === 'function') {
      // The pool's own pool.query: its callback gets the error before the pool sees the client again.
      args[args.length - 1] = (error: unknown, result: unknown) => {
        close(error);
        callback(error, result);
      };
      return query(...args);
    }
    const result = query(...args);
    if (result instanceof Promise) result.catch(close);
    return result;
  };
}

/**
 * A dedicated connection that LISTENs on one channel and reconnects (with backoff) when it is lost,
 * reporting each loss and recovery: while it is down, notifications may be missed.
 */
class Listener {
  private client: pg.Client | null = null;
  private stopped = false;
  private retryMs = 250;
  private timer: NodeJS.Timeout | null = null;
  private heartbeat: NodeJS.Timeout | null = null;
  /** A connection can die without an error (a dropped route, a silent proxy): ask it every few seconds. */
  private static readonly HEARTBEAT_MS = 5_000;

  constructor(
    private readonly settings: Settings,
    private readonly url: string,
    private readonly channel: string,
    private readonly handlers: ListenHandlers,
  ) {}

  async start(): Promise<void> {
    const client = new pg.Client({
      connectionString: this.url,
      connectionTimeoutMillis: this.settings.DATABASE_CONNECT_TIMEOUT_MS,
      application_name: 'keel-listener',
      keepAlive: true,
      query_timeout: Listener.HEARTBEAT_MS,
    });
    this.client = client;
    const lost = () => {
      if (this.client !== client) return;
      this.client = null;
      if (this.heartbeat) clearInterval(this.heartbeat);
      this.handlers.status(false);
      client.end().catch(() => undefined);
      if (!this.stopped) {
        this.timer = setTimeout(() => void this.start(), this.retryMs);
        this.retryMs = Math.min(this.retryMs * 2, 5_000);
      }
    };
    client.on('error', lost);
    client.on('end', lost);
    client.on('notification', (message) => {
      if (message.channel === this.channel) this.handlers.message(message.payload ?? '');
    });
    try {
      await client.connect();
      await client.query(`listen "${this.channel.replace(/"/g, '""')}"`);
    } catch {
      lost();
      return;
    }
    if (this.stopped) {
      await client.end().catch(() => undefined);
      return;
    }
    this.retryMs = 250;
    this.handlers.status(true);
    this.heartbeat = setInterval(() => {
      client.query('select 1').catch(lost);
    }, Listener.HEARTBEAT_MS);
    this.heartbeat.unref();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.heartbeat) clearInterval(this.heartbeat);
    const client = this.client;
    this.client = null;
    await client?.end().catch(() => undefined);
  }
}
