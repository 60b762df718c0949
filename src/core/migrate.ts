import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';

import { ConfigError } from './config.js';
import type { Database, SqlSession } from './db.js';
import type { Logger } from './logger.js';

/**
 * The package's migrations/, the nearest one above this module: two levels up from src/core/ (run
 * as TypeScript), one from dist/ (bundled into one of its files).
 */
function migrationsDir(from: string): string {
  for (let dir = from; ; dir = dirname(dir)) {
    if (existsSync(join(dir, 'migrations', 'meta', '_journal.json'))) return join(dir, 'migrations');
    if (dirname(dir) === dir) return resolve(from, '../../migrations');
  }
}

export const MIGRATIONS_DIR = migrationsDir(import.meta.dirname);
/** Any constant works, as long as every Keel process uses the same one. */
const MIGRATION_LOCK_KEY = 7_424_911_002;
const BREAKPOINT = '--> statement-breakpoint';

interface JournalEntry {
  idx: number;
  tag: string;
}

export interface Migration {
  tag: string;
  up: string;
  down: string | null;
  hash: string;
}

export class MigrationError extends Error {}

/** The migrations drizzle-kit generated, in order, each with its reviewed down script. */
export function readMigrations(dir = MIGRATIONS_DIR): Migration[] {
  const journal = JSON.parse(readFileSync(join(dir, 'meta/_journal.json'), 'utf8')) as { entries: JournalEntry[] };
  return [...journal.entries]
    .sort((a, b) => a.idx - b.idx)
    .map(({ tag }) => {
      const up = readFileSync(join(dir, `${tag}.sql`), 'utf8');
      const downFile = join(dir, 'down', `${tag}.sql`);
      return {
        tag,
        up,
        down: existsSync(downFile) ? readFileSync(downFile, 'utf8') : null,
        hash: createHash('sha256').update(up).digest('hex'),
      };
    });
}

function statements(script: string): string[] {
  return script
    .split(BREAKPOINT)
    .map((s) => s.trim())
    .filter(Boolean);
}

const BOOKKEEPING = `
create table if not exists keel_migrations (
  id uuid primary key default gen_random_uuid(),
  tag text not null unique,
  hash text not null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
)`;

async function inTransaction(session: SqlSession, work: () => Promise<void>): Promise<void> {
  await session.exec('begin');
  try {
    await work();
    await session.exec('commit');
  } catch (error) {
    await session.exec('rollback');
    throw error;
  }
}

/** Holds the cluster-wide migration lock while `work` runs, so two nodes never migrate at once. */
async function underLock<T>(database: Database, work: (session: SqlSession) => Promise<T>): Promise<T> {
  return database.withSession(async (session) => {
    // Waiting for the lock, and a long migration, must not hit the pool's statement timeout.
    await session.exec('set statement_timeout = 0');
    await session.query('select pg_advisory_lock($1)', [MIGRATION_LOCK_KEY]);
    try {
      await session.exec(BOOKKEEPING);
      return await work(session);
    } finally {
      // Never let a failed unlock hide the error that got us here; the session ends the lock anyway.
      await session.query('select pg_advisory_unlock($1)', [MIGRATION_LOCK_KEY]).catch(() => undefined);
      await session.exec('reset statement_timeout').catch(() => undefined);
    }
  });
}

async function appliedTags(session: SqlSession): Promise<Map<string, string>> {
  const rows = await session.query<{ tag: string; hash: string }>('select tag, hash from keel_migrations');
  return new Map(rows.map((r) => [r.tag, r.hash]));
}

/** Applies every pending migration, each in its own transaction; stops at the first error. */
export async function migrateUp(database: Database, logger: Logger, migrations = readMigrations()): Promise<string[]> {
  return underLock(database, async (session) => {
    // pgvector where the server has it; every migration must apply without it.
    const [vector] = await session.query<{ available: boolean }>(
      `select exists(select 1 from pg_available_extensions where name = 'vector') as available`,
    );
    if (vector?.available) {
      try {
        await session.exec('create extension if not exists vector');
      } catch (error) {
        logger.warn({ err: error }, 'pgvector is installed but could not be enabled; search stays full-text only');
      }
    }

    const applied = await appliedTags(session);
    const done: string[] = [];
    for (const migration of migrations) {
      const hash = applied.get(migration.tag);
      if (hash !== undefined) {
        if (hash !== migration.hash) {
          throw new MigrationError(`migration ${migration.tag} was changed after it was applied`);
        }
        continue;
      }
      try {
        await inTransaction(session, async () => {
          for (const statement of statements(migration.up)) await session.exec(statement);
          await session.query('insert into keel_migrations (tag, hash) values ($1, $2)', [migration.tag, migration.hash]);
        });
      } catch (error) {
        throw new MigrationError(`migration ${migration.tag} failed: ${(error as Error).message}`, { cause: error });
      }
      logger.info({ migration: migration.tag }, 'migration applied');
      done.push(migration.tag);
    }
    return done;
  });
}

/**
 * Reverts applied migrations, newest first, down to (not including) `to`;
 * without `to`, all of them.
 */
export async function migrateDown(
  database: Database,
  logger: Logger,
  to: string | null = null,
  migrations = readMigrations(),
): Promise<string[]> {
  if (to !== null && !migrations.some((m) => m.tag === to)) throw new MigrationError(`unknown migration ${to}`);
  return underLock(database, async (session) => {
    const applied = await appliedTags(session);
    const reverted: string[] = [];
    for (const migration of [...migrations].reverse()) {
      if (migration.tag === to) break;
      if (!applied.has(migration.tag)) continue;
      if (migration.down === null) throw new MigrationError(`migration ${migration.tag} has no down script`);
      const down = migration.down;
      try {
        await inTransaction(session, async () => {
          for (const statement of statements(down)) await session.exec(statement);
          await session.query('delete from keel_migrations where tag = $1', [migration.tag]);
        });
      } catch (error) {
        throw new MigrationError(`reverting ${migration.tag} failed: ${(error as Error).message}`, { cause: error });
      }
      logger.info({ migration: migration.tag }, 'migration reverted');
      reverted.push(migration.tag);
    }
    return reverted;
  });
}

/** What `keel migrate down` reverts: the newest applied migration, those after a tag, or all. */
export type DownTarget = { newest: true } | { to: string } | { all: true };

/**
 * The applied migrations `target` would revert (newest first) and the `to` that makes
 * `migrateDown` revert exactly those.
 */
export async function planDown(
  database: Database,
  target: DownTarget,
  migrations = readMigrations(),
): Promise<{ revert: string[]; to: string | null }> {
  const pending = new Set(await pendingMigrations(database, migrations));
  const applied = migrations.filter((m) => !pending.has(m.tag)).map((m) => m.tag);
  if ('all' in target) return { revert: applied.reverse(), to: null };
  if ('to' in target) {
    const index = migrations.findIndex((m) => m.tag === target.to);
    if (index < 0) throw new MigrationError(`unknown migration ${target.to}`);
    const after = new Set(migrations.slice(index + 1).map((m) => m.tag));
    return { revert: applied.filter((tag) => after.has(tag)).reverse(), to: target.to };
  }
  const newest = applied.at(-1);
  if (newest === undefined) return { revert: [], to: null };
  const index = migrations.findIndex((m) => m.tag === newest);
  return { revert: [newest], to: index > 0 ? migrations[index - 1]!.tag : null };
}

/** Migrations not yet applied; empty when the schema is current. */
export async function pendingMigrations(database: Database, migrations = readMigrations()): Promise<string[]> {
  return underLock(database, async (session) => {
    const applied = await appliedTags(session);
    return migrations.filter((m) => !applied.has(m.tag)).map((m) => m.tag);
  });
}

/** Commands other than `start` and `migrate` leave migrating to `keel migrate`: they refuse an unmigrated database. */
export async function requireMigrated(database: Database): Promise<void> {
  const pending = await pendingMigrations(database);
  if (pending.length) throw new ConfigError(`the database is not migrated: ${describePending(pending)}: run \`keel migrate\` first`);
}

/**
 * Pending migrations in a few words: how many, and the first and last by name. Every tag of a new
 * database made one line of hundreds of characters; `keel migrate status` lists them all.
 */
export function describePending(pending: readonly string[]): string {
  if (pending.length === 1) return `1 migration pending (${pending[0]})`;
  return `${pending.length} migrations pending (${pending[0]} to ${pending.at(-1)})`;
}
