import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

import { PGlite } from '@electric-sql/pglite';
import { vector } from '@electric-sql/pglite-pgvector';
import { drizzle as drizzleNodePg } from 'drizzle-orm/node-postgres';
import type { PgDatabase, PgQueryResultHKT, PgTransaction } from 'drizzle-orm/pg-core';
import { drizzle as drizzlePglite } from 'drizzle-orm/pglite';
import pg from 'pg';

import * as schema from '../models/index.js';

import type { Settings } from './config.js';
import { PgliteStatementClient } from './pglite-client.js';

export type Schema = typeof schema;
/** The database handle every crud function takes first; a transaction is one too. */
export type Db = PgDatabase<PgQueryResultHKT, Schema>;
export type Tx = PgTransaction<PgQueryResultHKT, Schema>;

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
  close(): Promise<void>;
}

// ==================== Embedded (PGlite) ====================

async function openPglite(settings: Settings): Promise<Database> {
  const dataDir = settings.PGLITE_DATA_DIR ?? join(settings.dataDir, 'pglite');
  if (!dataDir.startsWith('memory://')) mkdirSync(dataDir, { recursive: true });
  const client = await PGlite.create(dataDir, { extensions: { vector } });
  const session: SqlSession = {
    exec: async (sqlText) => {
      await client.exec(sqlText);
    },
    query: async <T extends Record<string, unknown>>(sqlText: string, params: unknown[] = []) =>
      (await client.query<T>(sqlText, params)).rows,
  };
  let closed = false;
  // PGlite is a single session: callers take turns, so two never share one transaction or lock.
  let turn: Promise<unknown> = Promise.resolve();
  return {
    db: drizzlePglite({ client: new PgliteStatementClient(client) as unknown as PGlite, schema, casing: 'snake_case' }) as unknown as Db,
    kind: 'pglite',
    withSession: <T>(work: (session: SqlSession) => Promise<T>): Promise<T> => {
      const result = turn.then(() => work(session));
      turn = result.catch(() => undefined);
      return result;
    },
    ping: async () => {
      if (closed) throw new Error('database is closed');
      await client.query('select 1');
    },
    close: async () => {
      if (closed) return;
      closed = true;
      await client.close();
    },
  };
}

// ==================== Server (node-postgres) ====================

function openPostgres(settings: Settings, url: string): Database {
  const pool = new pg.Pool({
    connectionString: url,
    max: settings.DATABASE_POOL_SIZE,
    idleTimeoutMillis: settings.DATABASE_POOL_IDLE_TIMEOUT_MS,
    connectionTimeoutMillis: settings.DATABASE_CONNECT_TIMEOUT_MS,
    statement_timeout: settings.DATABASE_STATEMENT_TIMEOUT_MS || undefined,
    application_name: 'keel',
  });
  // An idle client that loses its server emits here; without a listener the process would crash.
  pool.on('error', () => undefined);
  return {
    db: drizzleNodePg(pool, { schema, casing: 'snake_case' }),
    kind: 'postgres',
    withSession: async (work) => {
      const client = await pool.connect();
      try {
        return await work({
          exec: async (sqlText) => {
            await client.query(sqlText);
          },
          query: async <T extends Record<string, unknown>>(sqlText: string, params: unknown[] = []) =>
            (await client.query<T>(sqlText, params)).rows,
        });
      } finally {
        client.release();
      }
    },
    ping: async () => {
      await pool.query('select 1');
    },
    close: async () => {
      if (!pool.ending) await pool.end();
    },
  };
}

export async function openDatabase(settings: Settings): Promise<Database> {
  return settings.DATABASE_URL ? openPostgres(settings, settings.DATABASE_URL) : openPglite(settings);
}

/** Whether pgvector is installed or can be: PGlite ships it, a server may not. */
export async function vectorAvailable(database: Database): Promise<boolean> {
  return database.withSession(async (session) => {
    const rows = await session.query<{ present: boolean }>(
      `select exists(select 1 from pg_available_extensions where name = 'vector') as present`,
    );
    return rows[0]?.present === true;
  });
}
