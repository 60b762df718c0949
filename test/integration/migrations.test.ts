import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';

import pino from 'pino';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';

import { type Database, openDatabase } from '../../src/core/db.js';
import { migrateDown, migrateUp, type Migration, MigrationError, pendingMigrations, readMigrations } from '../../src/core/migrate.js';

import { usedBytes } from '../../src/crud/knowledge.js';
import { testSettings } from '../helpers/app.js';
import { adminQuery, databaseUrl } from '../helpers/postgres.js';

const logger = pino({ level: 'silent' });
const serverUrl = process.env.DATABASE_URL;
const MIGRATIONS = readMigrations();
const TAGS = MIGRATIONS.map((m) => m.tag);
/** The tables the real migrations create (besides the bookkeeping table). */
const KEEL_TABLES = [
  'agent_versions',
  'agents',
  'api_keys',
  'credit_accounts',
  'credit_reservations',
  'credit_transactions',
  'knowledge_chunks',
  'knowledge_entries',
  'knowledge_file_deletions',
  'knowledge_folders',
  'messages',
  'model_overrides',
  'projects',
  'providers',
  'run_events',
  'runs',
  'threads',
  'usage_records',
  'users',
];

/** Keel's tables in `database`: with the chunk embeddings where pgvector is enabled (PGlite always; this machine's PostgreSQL never). */
async function keelTables(database: Database): Promise<string[]> {
  const [vector] = await query<{ enabled: boolean }>(database, `select exists(select 1 from pg_extension where extname = 'vector') as enabled`);
  return [...KEEL_TABLES, ...(vector?.enabled ? ['knowledge_chunk_embeddings'] : []), 'keel_migrations'].sort();
}

/** Append-only logs keyed by their owner and a sequence number: no id, never updated. */
const APPEND_ONLY_LOGS: Record<string, string[]> = { run_events: ['run_id', 'seq'] };

interface FreshDatabase {
  database: Database;
  /** Another connection pool on the same database (server mode); the same handle on PGlite. */
  second: () => Promise<Database>;
  destroy: () => Promise<void>;
}

/** An empty database of the test's own: a new server database, or a PGlite directory (created, not migrated). */
async function freshDatabase(): Promise<FreshDatabase> {
  if (serverUrl) {
    const name = `keel_test_${randomBytes(6).toString('hex')}`;
    await adminQuery(serverUrl, `create database "${name}"`);
    const url = databaseUrl(serverUrl, name);
    const handles: Database[] = [];
    const open = async () => {
      const handle = await openDatabase(testSettings({ DATABASE_URL: url }));
      handles.push(handle);
      return handle;
    };
    const database = await open();
    return {
      database,
      second: open,
      destroy: async () => {
        for (const handle of handles) await handle.close();
        await adminQuery(serverUrl, `drop database if exists "${name}" with (force)`);
      },
    };
  }
  // A copy of the run's empty directory: five initdbs (memory://) were most of this file's time.
  // Under the run's data root, which the global teardown removes, should this worker never reach `destroy`.
  const dir = mkdtempSync(join(inject('dataDirRoot'), 'migrations-'));
  cpSync(inject('emptyPgliteDir')!, dir, { recursive: true });
  const database = await openDatabase(testSettings({ PGLITE_DATA_DIR: dir }));
  return {
    database,
    second: async () => database,
    destroy: async () => {
      await database.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function migration(tag: string, up: string, down: string | null = null): Migration {
  return { tag, up, down, hash: createHash('sha256').update(up).digest('hex') };
}

async function query<T extends Record<string, unknown>>(database: Database, sqlText: string, params: unknown[] = []): Promise<T[]> {
  return database.withSession((session) => session.query<T>(sqlText, params));
}

async function tables(database: Database): Promise<string[]> {
  const rows = await query<{ table_name: string }>(
    database,
    `select table_name from information_schema.tables where table_schema = 'public' and table_type = 'BASE TABLE' order by table_name`,
  );
  return rows.map((r) => r.table_name);
}

async function appliedTags(database: Database): Promise<string[]> {
  const rows = await query<{ tag: string }>(database, 'select tag from keel_migrations order by tag');
  return rows.map((r) => r.tag);
}

/**
 * For tests that migrate a fresh database through (nearly) every migration, up and down: on a
 * loaded 2-core CI machine PGlite took ~23 s for one migrateUp alone, past the suite's 30 s.
 */
const MIGRATING = { timeout: 120_000 };

/**
 * Runs `work` on a fresh database migrated up to just before `tag`: data in the old shape for that
 * migration to carry across; `previous` is the tag before it, to go back down to.
 */
async function beforeMigration(tag: string, work: (database: Database, previous: string) => Promise<void>): Promise<void> {
  const fresh = await freshDatabase();
  try {
    const at = MIGRATIONS.findIndex((m) => m.tag === tag);
    await migrateUp(fresh.database, logger, MIGRATIONS.slice(0, at));
    await work(fresh.database, MIGRATIONS[at - 1]!.tag);
  } finally {
    await fresh.destroy();
  }
}

describe('migrations on a fresh database', () => {
  let fresh: FreshDatabase;
  beforeAll(async () => {
    fresh = await freshDatabase();
  });
  afterAll(async () => {
    await fresh?.destroy();
  });

  it('every migration has a down script', () => {
    expect(MIGRATIONS.length).toBeGreaterThan(0);
    for (const m of MIGRATIONS) expect(m.down, m.tag).toEqual(expect.any(String));
  });

  it('migrateUp applies every migration once, then none', async () => {
    const { database } = fresh;
    expect(await pendingMigrations(database)).toEqual(TAGS);
    expect(await migrateUp(database, logger)).toEqual(TAGS);
    expect(await tables(database)).toEqual(expect.arrayContaining([...KEEL_TABLES, 'keel_migrations']));
    expect(await appliedTags(database)).toEqual([...TAGS].sort());
    expect(await pendingMigrations(database)).toEqual([]);

    expect(await migrateUp(database, logger)).toEqual([]);
    expect(await appliedTags(database)).toEqual([...TAGS].sort());
  });

  describe('schema conventions', () => {
    it('every table has a UUID id primary key, created_at and updated_at (timestamptz, not null)', async () => {
      const { database } = fresh;
      const names = await tables(database);
      expect(names.length).toBeGreaterThanOrEqual(KEEL_TABLES.length + 1);
      const columns = await query<{ table_name: string; column_name: string; data_type: string; is_nullable: string }>(
        database,
        `select table_name, column_name, data_type, is_nullable from information_schema.columns
          where table_schema = 'public' and column_name in ('id', 'created_at', 'updated_at')`,
      );
      const primaryKeys = await query<{ table_name: string; column_name: string }>(
        database,
        `select tc.table_name, kcu.column_name
           from information_schema.table_constraints tc
           join information_schema.key_column_usage kcu
             on kcu.constraint_name = tc.constraint_name and kcu.table_schema = tc.table_schema and kcu.table_name = tc.table_name
          where tc.table_schema = 'public' and tc.constraint_type = 'PRIMARY KEY'`,
      );
      for (const table of names) {
        const column = (name: string) => columns.find((c) => c.table_name === table && c.column_name === name);
        const logKey = APPEND_ONLY_LOGS[table];
        if (logKey) {
          expect(column('created_at'), `${table}.created_at`).toMatchObject({ data_type: 'timestamp with time zone', is_nullable: 'NO' });
          expect(primaryKeys.filter((k) => k.table_name === table).map((k) => k.column_name), `${table} primary key`).toEqual(logKey);
          continue;
        }
        expect(column('id'), `${table}.id`).toMatchObject({ data_type: 'uuid', is_nullable: 'NO' });
        expect(column('created_at'), `${table}.created_at`).toMatchObject({ data_type: 'timestamp with time zone', is_nullable: 'NO' });
        expect(column('updated_at'), `${table}.updated_at`).toMatchObject({ data_type: 'timestamp with time zone', is_nullable: 'NO' });
        expect(
          primaryKeys.filter((k) => k.table_name === table).map((k) => k.column_name),
          `${table} primary key`,
        ).toEqual(['id']);
      }
    });

    it('every foreign key is the leading column(s) of some index', async () => {
      const { database } = fresh;
      // Column names as comma-separated text: the same on pg and PGlite; expressions show as '<expr>'.
      const foreignKeys = await query<{ tbl: string; name: string; cols: string }>(
        database,
        `select c.conrelid::regclass::text as tbl, c.conname as name,
                array_to_string(array(
                  select a.attname from unnest(c.conkey) with ordinality k(attnum, n)
                    join pg_attribute a on a.attrelid = c.conrelid and a.attnum = k.attnum
                   order by k.n), ',') as cols
           from pg_constraint c
          where c.contype = 'f' and c.connamespace = 'public'::regnamespace`,
      );
      const indexes = await query<{ tbl: string; cols: string }>(
        database,
        `select i.indrelid::regclass::text as tbl,
                array_to_string(array(
                  select coalesce(a.attname, '<expr>') from unnest(i.indkey::int2[]) with ordinality k(attnum, n)
                    left join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum and k.attnum > 0
                   order by k.n), ',') as cols
           from pg_index i join pg_class t on t.oid = i.indrelid
          where t.relnamespace = 'public'::regnamespace`,
      );
      expect(foreignKeys.length).toBeGreaterThanOrEqual(3);
      for (const fk of foreignKeys) {
        const columns = fk.cols.split(',');
        const covered = indexes.some((index) => {
          const leading = index.cols.split(',').slice(0, columns.length);
          return index.tbl === fk.tbl && leading.join(',') === columns.join(',');
        });
        expect(covered, `${fk.tbl}.${fk.cols} (${fk.name}) has an index`).toBe(true);
      }
    });

    it("a knowledge chunk's tsvector is kept in its row (STORAGE MAIN), not in the TOAST table", async () => {
      // Search tests and ranks the tsvector of every candidate outside the GIN index: out of line,
      // each test cost a TOAST lookup. A type change resets the storage, so this is checked on the
      // schema the migrations leave, not on what one of them says.
      const [column] = await query<{ storage: string }>(
        fresh.database,
        `select attstorage as storage from pg_attribute where attrelid = 'knowledge_chunks'::regclass and attname = 'tsv'`,
      );
      expect(column?.storage).toBe('m');
    });

    it('chunk embeddings are found by model through an index, where pgvector is enabled', async () => {
      // Search first asks whether any of the caller's chunks has an embedding by EMBEDDING_MODEL;
      // for a model no row has (the setting just changed) that read the whole table without one.
      const indexed = await query<{ name: string }>(
        fresh.database,
        `select c.relname as name from pg_index i join pg_class c on c.oid = i.indexrelid join pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]
         where i.indrelid = to_regclass('knowledge_chunk_embeddings') and a.attname = 'model'`,
      );
      const tables = await keelTables(fresh.database);
      expect(indexed.map((row) => row.name)).toEqual(tables.includes('knowledge_chunk_embeddings') ? ['ix_knowledge_chunk_embeddings_model'] : []);
    });
  });

  it('a changed migration that was already applied is refused', async () => {
    const { database } = fresh;
    const changed = MIGRATIONS.map((m, i) => (i === 0 ? migration(m.tag, `${m.up}\n-- edited after release`, m.down) : m));
    const later = migration('9900_after_changed', 'create table keel_test_after_changed (id int)', 'drop table keel_test_after_changed');
    await expect(migrateUp(database, logger, [...changed, later])).rejects.toThrow(MigrationError);
    await expect(migrateUp(database, logger, [...changed, later])).rejects.toThrow(new RegExp(`${TAGS[0]} was changed`));
    expect(await tables(database)).not.toContain('keel_test_after_changed');
    expect(await appliedTags(database)).toEqual([...TAGS].sort());
  });

  it('migrateDown with `to` reverts only the migrations after that tag', async () => {
    const { database } = fresh;
    const extra = [
      migration('9001_first_extra', 'create table keel_test_first (id int);--> statement-breakpoint\ncreate index ix_keel_test_first on keel_test_first (id)', 'drop table keel_test_first'),
      migration('9002_second_extra', 'create table keel_test_second (id int)', 'drop table keel_test_second'),
      migration('9003_third_extra', 'create table keel_test_third (id int)', 'drop table keel_test_third'),
    ];
    const all = [...MIGRATIONS, ...extra];
    expect(await migrateUp(database, logger, all)).toEqual(['9001_first_extra', '9002_second_extra', '9003_third_extra']);

    expect(await migrateDown(database, logger, '9001_first_extra', all)).toEqual(['9003_third_extra', '9002_second_extra']);
    const afterPartial = await tables(database);
    expect(afterPartial).toContain('keel_test_first');
    expect(afterPartial).not.toContain('keel_test_second');
    expect(afterPartial).not.toContain('keel_test_third');
    expect(await pendingMigrations(database, all)).toEqual(['9002_second_extra', '9003_third_extra']);

    // Down to the last real migration: the schema is exactly the real one again.
    expect(await migrateDown(database, logger, TAGS[TAGS.length - 1], all)).toEqual(['9001_first_extra']);
    expect(await tables(database)).toEqual(await keelTables(database));
    expect(await pendingMigrations(database)).toEqual([]);

    await expect(migrateDown(database, logger, '9999_no_such_tag')).rejects.toThrow(/unknown migration/);
    expect(await pendingMigrations(database)).toEqual([]);
  });

  it('migrateDown reverts everything and leaves no Keel tables or types; migrateUp then works again', MIGRATING, async () => {
    const { database } = fresh;
    await query(database, `insert into users (email, hashed_password) values ('before-down@keel.test', 'x')`);

    expect(await migrateDown(database, logger)).toEqual([...TAGS].reverse());
    expect(await tables(database)).toEqual(['keel_migrations']);
    expect(await appliedTags(database)).toEqual([]);
    const types = await query<{ typname: string }>(
      database,
      `select typname from pg_type where typnamespace = 'public'::regnamespace and typtype = 'e'`,
    );
    expect(types).toEqual([]);
    expect(await pendingMigrations(database)).toEqual(TAGS);
    expect(await migrateDown(database, logger)).toEqual([]);

    expect(await migrateUp(database, logger)).toEqual(TAGS);
    expect(await tables(database)).toEqual(await keelTables(database));
    expect(await query(database, 'select * from users')).toEqual([]);
    await query(database, `insert into users (email, hashed_password) values ('after-up@keel.test', 'x')`);
  });
});

// One fresh database for both: first concurrent runs of the real migrations, then a failure on top.
describe('concurrency and failures', () => {
  let fresh: FreshDatabase;
  beforeAll(async () => {
    fresh = await freshDatabase();
  });
  afterAll(async () => {
    await fresh?.destroy();
  });

  it('concurrent migrateUp calls apply each migration exactly once', async () => {
    const extra = [
      migration('9200_slow', 'create table keel_test_slow (id int);--> statement-breakpoint\nselect pg_sleep(0.2)', 'drop table keel_test_slow'),
      migration('9201_next', 'create table keel_test_next (id int)', 'drop table keel_test_next'),
    ];
    const all = [...MIGRATIONS, ...extra];
    const handles = [fresh.database, await fresh.second(), await fresh.second()];
    const results = await Promise.all(handles.map((handle) => migrateUp(handle, logger, all)));
    const applied = results.flat();
    expect(applied.sort()).toEqual(all.map((m) => m.tag).sort());
    const rows = await query<{ tag: string; n: number }>(fresh.database, 'select tag, count(*)::int as n from keel_migrations group by tag');
    expect(rows.length).toBe(all.length);
    for (const row of rows) expect(row.n, row.tag).toBe(1);
  });

  it('a failing migration stops the run, leaves nothing of itself applied and releases the lock', async () => {
    const { database } = fresh;
    const good = migration('9100_good', 'create table keel_test_good (id int)', 'drop table keel_test_good');
    const bad = migration(
      '9101_bad',
      'create table keel_test_bad_partial (id int);--> statement-breakpoint\ninsert into keel_test_no_such_table values (1)',
      'drop table keel_test_bad_partial',
    );
    const after = migration('9102_after', 'create table keel_test_after (id int)', 'drop table keel_test_after');

    const failure = migrateUp(database, logger, [...MIGRATIONS, good, bad, after]);
    await expect(failure).rejects.toThrow(MigrationError);
    await expect(failure).rejects.toThrow(/9101_bad failed/);

    const names = await tables(database);
    expect(names).toEqual(expect.arrayContaining([...KEEL_TABLES, 'keel_test_good']));
    expect(names).not.toContain('keel_test_bad_partial');
    expect(names).not.toContain('keel_test_after');
    const applied = await appliedTags(database);
    expect(applied).toEqual(expect.arrayContaining([...TAGS, '9100_good']));
    expect(applied).not.toContain('9101_bad');
    expect(applied).not.toContain('9102_after');

    // The lock was released and the session is usable: another handle (server mode) migrates on.
    const fixed = migration('9101_bad', 'create table keel_test_bad_partial (id int)', 'drop table keel_test_bad_partial');
    const other = await fresh.second();
    const retry = migrateUp(other, logger, [...MIGRATIONS, good, fixed, after]);
    const timeout = new Promise<never>((_, reject) => setTimeout(() => reject(new Error('migration lock was not released')), 10_000).unref());
    expect(await Promise.race([retry, timeout])).toEqual(['9101_bad', '9102_after']);
    expect(await tables(database)).toEqual(expect.arrayContaining(['keel_test_bad_partial', 'keel_test_after']));
  });
});

describe('0010_run_event_batches', () => {
  it('keeps every stored run event across up (a row per event becomes a batch of one) and down (each event a row again)', MIGRATING, async () => {
    await beforeMigration('0010_run_event_batches', async (database, previous) => {
      const [user, thread, run] = [randomUUID(), randomUUID(), randomUUID()];
      await query(database, `insert into users (id, email, hashed_password) values ($1, 'events@example.com', 'x')`, [user]);
      await query(database, `insert into threads (id, owner_id) values ($1, $2)`, [thread, user]);
      await query(database, `insert into runs (id, owner_id, thread_id, agent_version, model) values ($1, $2, $3, 1, 'm')`, [run, user, thread]);
      for (const [seq, event] of [[1, 'run.queued'], [2, 'run.started']] as const) {
        await query(database, `insert into run_events (run_id, seq, event, data) values ($1, $2, $3, $4::jsonb)`, [run, seq, event, JSON.stringify({ run_id: run, seq })]);
      }
      await migrateUp(database, logger);
      const batches = await query<{ seq: number; last_seq: number; last_event: string; events: unknown }>(database, `select seq, last_seq, last_event, events from run_events where run_id = $1 order by seq`, [run]);
      expect(batches).toEqual([
        { seq: 1, last_seq: 1, last_event: 'run.queued', events: [{ seq: 1, event: 'run.queued', data: { run_id: run, seq: 1 } }] },
        { seq: 2, last_seq: 2, last_event: 'run.started', events: [{ seq: 2, event: 'run.started', data: { run_id: run, seq: 2 } }] },
      ]);
      const later = [3, 4].map((seq) => ({ seq, event: seq === 4 ? 'run.completed' : 'message.delta', data: { run_id: run, seq } }));
      await query(database, `insert into run_events (run_id, seq, last_seq, last_event, events) values ($1, 3, 4, 'run.completed', $2::json)`, [run, JSON.stringify(later)]);
      await migrateDown(database, logger, previous);
      const rows = await query<{ seq: number; event: string; data: unknown }>(database, `select seq, event, data from run_events where run_id = $1 order by seq`, [run]);
      expect(rows).toEqual([
        { seq: 1, event: 'run.queued', data: { run_id: run, seq: 1 } },
        { seq: 2, event: 'run.started', data: { run_id: run, seq: 2 } },
        { seq: 3, event: 'message.delta', data: { run_id: run, seq: 3 } },
        { seq: 4, event: 'run.completed', data: { run_id: run, seq: 4 } },
      ]);
    });
  });
});

describe('0014_credit_usage_entry_once', () => {
  it("keeps a call's first usage entry linked and unlinks a second one (saying which call), then refuses a third", MIGRATING, async () => {
    await beforeMigration('0014_credit_usage_entry_once', async (database, previous) => {
      const [user, call, other] = [randomUUID(), randomUUID(), randomUUID()];
      await query(database, `insert into users (id, email, hashed_password) values ($1, 'ledger@example.com', 'x')`, [user]);
      const entry = (id: string, usage: string, balance: string, at: string) =>
        query(database, `insert into credit_transactions (id, owner_id, type, amount, balance_after, description, usage_record_id, created_at) values ($1, $2, 'usage', -4, $3, 'chat', $4, $5)`, [
          id,
          user,
          balance,
          usage,
          at,
        ]);
      const [first, second, single] = [randomUUID(), randomUUID(), randomUUID()];
      await entry(second, call, '92', '2026-01-01T00:00:02Z');
      await entry(first, call, '96', '2026-01-01T00:00:01Z');
      await entry(single, other, '88', '2026-01-01T00:00:03Z');
      await migrateUp(database, logger);
      const rows = await query<{ id: string; usage_record_id: string | null; description: string }>(
        database,
        `select id, usage_record_id, description from credit_transactions where owner_id = $1 order by created_at`,
        [user],
      );
      expect(rows).toEqual([
        { id: first, usage_record_id: call, description: 'chat' },
        { id: second, usage_record_id: null, description: `chat (a second charge for call ${call})` },
        { id: single, usage_record_id: other, description: 'chat' },
      ]);
      await expect(entry(randomUUID(), call, '84', '2026-01-01T00:00:04Z')).rejects.toMatchObject({ code: '23505' });
      await migrateDown(database, logger, previous);
      await entry(randomUUID(), call, '84', '2026-01-01T00:00:04Z');
    });
  });
});

describe('0016_credit_accounts_entries and 0017_credit_ledger_entry_count', () => {
  it("counts each account's existing ledger entries, then keeps counting every insert (an account made for entries without one); down drops the count", MIGRATING, async () => {
    await beforeMigration('0016_credit_accounts_entries', async (database, previous) => {
      const [withAccount, withoutAccount, idle] = [randomUUID(), randomUUID(), randomUUID()];
      for (const [id, email] of [
        [withAccount, 'counted@example.com'],
        [withoutAccount, 'unaccounted@example.com'],
        [idle, 'idle@example.com'],
      ] as const) {
        await query(database, `insert into users (id, email, hashed_password) values ($1, $2, 'x')`, [id, email]);
      }
      await query(database, `insert into credit_accounts (user_id, balance) values ($1, 10), ($2, 0)`, [withAccount, idle]);
      const entries = (owner: string, n: number) =>
        query(database, `insert into credit_transactions (owner_id, type, amount, balance_after) select $1, 'grant', 1, i from generate_series(1, ${n}) i`, [owner]);
      await entries(withAccount, 3);
      await entries(withoutAccount, 2);
      await migrateUp(database, logger);
      const counts = async () =>
        Object.fromEntries(
          (await query<{ user_id: string; entries: string; balance: string }>(database, `select user_id, entries::text, balance::text from credit_accounts`)).map((row) => [
            row.user_id,
            [Number(row.entries), Number(row.balance)],
          ]),
        );
      expect(await counts()).toEqual({ [withAccount]: [3, 10], [withoutAccount]: [2, 0], [idle]: [0, 0] });
      await entries(withAccount, 4);
      await entries(idle, 1);
      expect(await counts()).toEqual({ [withAccount]: [7, 10], [withoutAccount]: [2, 0], [idle]: [1, 0] });
      await migrateDown(database, logger, previous);
      await entries(withAccount, 1);
      expect(await query(database, `select column_name from information_schema.columns where table_name = 'credit_accounts' and column_name = 'entries'`)).toEqual([]);
    });
  });
});

describe('0019_knowledge_entries_chunks_hidden', () => {
  it("hides the chunks of failed entries and of failed entries' reindexes not yet ready, looked up by a partial index, kept by the status an old node writes alone; down brings back the failed-status index", MIGRATING, async () => {
    await beforeMigration('0019_knowledge_entries_chunks_hidden', async (database, previous) => {
      const [owner, folder] = [randomUUID(), randomUUID()];
      await query(database, `insert into users (id, email, hashed_password) values ($1, 'kb-hidden@example.com', 'x')`, [owner]);
      await query(database, `insert into knowledge_folders (id, owner_id, name) values ($1, $2, 'Docs')`, [folder, owner]);
      // [status, chunk_count, an indexing has ended (processed_at)]
      const entries: Record<string, [string, number, boolean]> = {
        failed: ['failed', 0, true],
        'failed, reindex pending': ['pending', 0, true],
        'failed, reindex processing': ['processing', 0, true],
        'ready, reindex pending': ['pending', 5, true],
        'ready, reindex processing': ['processing', 5, true],
        'uploaded, pending': ['pending', 0, false],
        'uploaded, processing': ['processing', 0, false],
        ready: ['ready', 5, true],
      };
      for (const [name, [status, chunks, processed]] of Object.entries(entries)) {
        await query(
          database,
          `insert into knowledge_entries (owner_id, folder_id, filename, mime_type, size_bytes, sha256, storage_key, status, chunk_count, processed_at)
           values ($1, $2, $3::text, 'text/plain', 1, 'x', $3::text, $4::knowledge_entry_status, $5::int, case when $6::boolean then now() end)`,
          [owner, folder, name, status, chunks, processed],
        );
      }
      const indexes = async () =>
        (await query<{ indexname: string }>(database, `select indexname from pg_indexes where tablename = 'knowledge_entries' and indexname like 'ix_knowledge_entries_owner_id_%' order by indexname`)).map(
          (row) => row.indexname,
        );
      expect(await indexes()).toEqual(['ix_knowledge_entries_owner_id_created_at', 'ix_knowledge_entries_owner_id_failed']);
      await migrateUp(database, logger);
      const hidden = await query<{ filename: string; chunks_hidden: boolean }>(database, `select filename, chunks_hidden from knowledge_entries`);
      expect(Object.fromEntries(hidden.map((row) => [row.filename, row.chunks_hidden]))).toEqual({
        failed: true,
        'failed, reindex pending': true,
        'failed, reindex processing': true,
        'ready, reindex pending': false,
        'ready, reindex processing': false,
        'uploaded, pending': false,
        'uploaded, processing': false,
        ready: false,
      });
      expect(await indexes()).toEqual(['ix_knowledge_entries_owner_id_chunks_hidden', 'ix_knowledge_entries_owner_id_created_at']);
      // What a node still on the old code writes: the status alone. Its fail() hides the chunks, its
      // end of a marked entry's reindex shows them; another status (a reindex, a claim) keeps the flag.
      const oldNode = async (filename: string, status: string) => {
        await query(database, `update knowledge_entries set status = $2::knowledge_entry_status where filename = $1`, [filename, status]);
        const [row] = await query<{ chunks_hidden: boolean }>(database, `select chunks_hidden from knowledge_entries where filename = $1`, [filename]);
        return row?.chunks_hidden;
      };
      expect(await oldNode('ready', 'failed')).toBe(true);
      expect(await oldNode('ready', 'pending')).toBe(true);
      expect(await oldNode('failed, reindex processing', 'ready')).toBe(false);
      expect(await oldNode('failed, reindex processing', 'processing')).toBe(false);
      await migrateDown(database, logger, previous);
      expect(await query(database, `select column_name from information_schema.columns where table_name = 'knowledge_entries' and column_name = 'chunks_hidden'`)).toEqual([]);
      expect(await indexes()).toEqual(['ix_knowledge_entries_owner_id_created_at', 'ix_knowledge_entries_owner_id_failed']);
    });
  });
});

describe('0020_knowledge_entries_search_language', () => {
  it('adds the language an entry was indexed under, null for the entries there (older code: their next reindex embeds them anew); down drops it', MIGRATING, async () => {
    await beforeMigration('0020_knowledge_entries_search_language', async (database, previous) => {
      const [owner, folder] = [randomUUID(), randomUUID()];
      await query(database, `insert into users (id, email, hashed_password) values ($1, 'kb-language@example.com', 'x')`, [owner]);
      await query(database, `insert into knowledge_folders (id, owner_id, name) values ($1, $2, 'Docs')`, [folder, owner]);
      await query(
        database,
        `insert into knowledge_entries (owner_id, folder_id, filename, mime_type, size_bytes, sha256, storage_key, status, chunk_count, processed_at)
         values ($1, $2, 'ready.md', 'text/markdown', 1, 'x', 'ready.md', 'ready', 5, now())`,
        [owner, folder],
      );
      await migrateUp(database, logger);
      expect(await query(database, `select filename, search_language from knowledge_entries`)).toEqual([{ filename: 'ready.md', search_language: null }]);
      await query(database, `update knowledge_entries set search_language = 'german'`);
      await migrateDown(database, logger, previous);
      expect(await query(database, `select column_name from information_schema.columns where table_name = 'knowledge_entries' and column_name = 'search_language'`)).toEqual([]);
    });
  });
});

describe('0023_knowledge_entries_text_bytes', () => {
  it("adds what an entry's text takes, 0 for the entries there (each counts for its file, at least 4 KiB, until reindexed); down drops it", MIGRATING, async () => {
    await beforeMigration('0023_knowledge_entries_text_bytes', async (database, previous) => {
      const [owner, folder] = [randomUUID(), randomUUID()];
      await query(database, `insert into users (id, email, hashed_password) values ($1, 'kb-text-bytes@example.com', 'x')`, [owner]);
      await query(database, `insert into knowledge_folders (id, owner_id, name) values ($1, $2, 'Docs')`, [folder, owner]);
      for (const [filename, size] of [['large.pdf', 10_000], ['tiny.txt', 10]] as const) {
        await query(
          database,
          `insert into knowledge_entries (owner_id, folder_id, filename, mime_type, size_bytes, sha256, storage_key, status, chunk_count, processed_at)
           values ($1, $2, $3::text, 'application/pdf', $4::bigint, 'x', $3::text, 'ready', 5, now())`,
          [owner, folder, filename, size],
        );
      }
      await migrateUp(database, logger);
      expect(await query(database, `select filename, text_bytes::int from knowledge_entries order by filename`)).toEqual([
        { filename: 'large.pdf', text_bytes: 0 },
        { filename: 'tiny.txt', text_bytes: 0 },
      ]);
      expect(await usedBytes(database.db, owner)).toBe(10_000 + 4096);
      await migrateDown(database, logger, previous);
      expect(await query(database, `select column_name from information_schema.columns where table_name = 'knowledge_entries' and column_name = 'text_bytes'`)).toEqual([]);
    });
  });
});

describe('0024_run_scope_project', () => {
  it("records the project of each working run's scoped key (none for an account key, a token or an ended run), a working run going with that project; down drops it", MIGRATING, async () => {
    await beforeMigration('0024_run_scope_project', async (database, previous) => {
      const [owner, project, scopedKey, accountKey] = [randomUUID(), randomUUID(), randomUUID(), randomUUID()];
      await query(database, `insert into users (id, email, hashed_password) values ($1, 'run-scope@example.com', 'x')`, [owner]);
      await query(database, `insert into projects (id, owner_id, name) values ($1, $2, 'P')`, [project, owner]);
      for (const [id, projectId] of [[scopedKey, project], [accountKey, null]] as const) {
        await query(database, `insert into api_keys (id, owner_id, project_id, name, prefix, key_hash) values ($1::uuid, $2, $3, 'k', 'k', $4)`, [id, owner, projectId, id]);
      }
      for (const [input, keyId, status] of [['scoped', scopedKey, 'running'], ['scoped ended', scopedKey, 'completed'], ['account', accountKey, 'queued'], ['token', null, 'queued']] as const) {
        const thread = randomUUID();
        await query(database, `insert into threads (id, owner_id) values ($1, $2)`, [thread, owner]);
        await query(database, `insert into runs (owner_id, thread_id, api_key_id, agent_version, model, status, input) values ($1, $2, $3, 1, 'm', $4, $5)`, [owner, thread, keyId, status, input]);
      }
      await migrateUp(database, logger);
      expect(await query(database, `select input, scope_project_id from runs order by input`)).toEqual([
        { input: 'account', scope_project_id: null },
        { input: 'scoped', scope_project_id: project },
        { input: 'scoped ended', scope_project_id: null },
        { input: 'token', scope_project_id: null },
      ]);
      // The project goes (its scoped key with it): the working run limited to it too, never left unscoped; the ended one stays.
      await query(database, `delete from projects where id = $1`, [project]);
      expect(await query(database, `select input from runs order by input`)).toEqual([{ input: 'account' }, { input: 'scoped ended' }, { input: 'token' }]);
      await migrateDown(database, logger, previous);
      expect(await query(database, `select column_name from information_schema.columns where table_name = 'runs' and column_name = 'scope_project_id'`)).toEqual([]);
    });
  });
});

describe('0025_runs_follow_thread_project', () => {
  it("puts the runs of a thread moved before runs followed it into the thread's project (none too), their scope cleared as a move clears it; down leaves them", MIGRATING, async () => {
    await beforeMigration('0025_runs_follow_thread_project', async (database, previous) => {
      const [owner, from, to, moved, toAccount, stayed] = [randomUUID(), randomUUID(), randomUUID(), randomUUID(), randomUUID(), randomUUID()];
      await query(database, `insert into users (id, email, hashed_password) values ($1, 'run-follow@example.com', 'x')`, [owner]);
      for (const [id, name] of [[from, 'from'], [to, 'to']]) await query(database, `insert into projects (id, owner_id, name) values ($1, $2, $3)`, [id, owner, name]);
      // Where each thread is now; its run was started in `from` (by a key scoped to it) before the move.
      for (const [id, projectId] of [[moved, to], [toAccount, null], [stayed, from]]) await query(database, `insert into threads (id, owner_id, project_id) values ($1, $2, $3)`, [id, owner, projectId]);
      for (const [input, thread] of [['moved', moved], ['to account', toAccount], ['stayed', stayed]]) {
        await query(database, `insert into runs (owner_id, thread_id, project_id, scope_project_id, agent_version, model, status, input) values ($1, $2, $3, $3, 1, 'm', 'completed', $4)`, [owner, thread, from, input]);
      }
      await migrateUp(database, logger);
      const expected = [
        { input: 'moved', project_id: to, scope_project_id: null },
        { input: 'stayed', project_id: from, scope_project_id: from },
        { input: 'to account', project_id: null, scope_project_id: null },
      ];
      expect(await query(database, `select input, project_id, scope_project_id from runs order by input`)).toEqual(expected);
      await migrateDown(database, logger, previous);
      expect(await query(database, `select input, project_id, scope_project_id from runs order by input`)).toEqual(expected);
      expect(await pendingMigrations(database)).toEqual(TAGS.slice(TAGS.indexOf('0025_runs_follow_thread_project')));
    });
  });
});

describe('0026_run_event_seq_ceiling', () => {
  it("gives every existing run a seq ceiling of 1, which promises nothing past run.queued (a working one is taken up after its stream's top, as before); down drops it", MIGRATING, async () => {
    await beforeMigration('0026_run_event_seq_ceiling', async (database, previous) => {
      const [owner, thread] = [randomUUID(), randomUUID()];
      await query(database, `insert into users (id, email, hashed_password) values ($1, 'run-ceiling@example.com', 'x')`, [owner]);
      await query(database, `insert into threads (id, owner_id) values ($1, $2)`, [thread, owner]);
      await query(database, `insert into runs (owner_id, thread_id, agent_version, model, status, input) values ($1, $2, 1, 'm', 'running', 'working')`, [owner, thread]);
      await migrateUp(database, logger);
      expect(await query(database, `select input, event_seq_ceiling from runs`)).toEqual([{ input: 'working', event_seq_ceiling: 1 }]);
      await migrateDown(database, logger, previous);
      expect(await query(database, `select column_name from information_schema.columns where table_name = 'runs' and column_name = 'event_seq_ceiling'`)).toEqual([]);
      expect(await pendingMigrations(database)).toEqual(TAGS.slice(TAGS.indexOf('0026_run_event_seq_ceiling')));
    });
  });
});

describe('0027_knowledge_entries_text_bytes_stored', () => {
  it("copies each entry's counted text as what its chunks store, kept in step with what a node still on the old code writes (an indexing's end, a claim dropping the chunks); down drops it", MIGRATING, async () => {
    await beforeMigration('0027_knowledge_entries_text_bytes_stored', async (database, previous) => {
      const [owner, folder] = [randomUUID(), randomUUID()];
      await query(database, `insert into users (id, email, hashed_password) values ($1, 'kb-text-stored@example.com', 'x')`, [owner]);
      await query(database, `insert into knowledge_folders (id, owner_id, name) values ($1, $2, 'Docs')`, [folder, owner]);
      for (const [filename, status, textBytes] of [
        ['ready.md', 'ready', 5_000],
        ['uploaded.md', 'pending', 0],
      ] as const) {
        await query(
          database,
          `insert into knowledge_entries (owner_id, folder_id, filename, mime_type, size_bytes, sha256, storage_key, status, text_bytes)
           values ($1, $2, $3::text, 'text/markdown', 10, 'x', $3::text, $4::knowledge_entry_status, $5::bigint)`,
          [owner, folder, filename, status, textBytes],
        );
      }
      await migrateUp(database, logger);
      const stored = async (filename: string) =>
        (await query<{ text_bytes_stored: number }>(database, `select text_bytes_stored::int from knowledge_entries where filename = $1`, [filename]))[0]?.text_bytes_stored;
      expect(await stored('ready.md')).toBe(5_000);
      expect(await stored('uploaded.md')).toBe(0);
      // What the old code writes: `text_bytes` alone.
      const write = (filename: string, status: string, textBytes: number) =>
        query(database, `update knowledge_entries set status = $2::knowledge_entry_status, text_bytes = $3::bigint where filename = $1`, [filename, status, textBytes]);
      await write('uploaded.md', 'processing', 3_000); // a reservation: not stored yet
      expect(await stored('uploaded.md')).toBe(0);
      await write('uploaded.md', 'ready', 2_500); // its indexing ends: exact
      expect(await stored('uploaded.md')).toBe(2_500);
      await write('ready.md', 'processing', 0); // a claim that drops the chunks
      expect(await stored('ready.md')).toBe(0);
      await write('ready.md', 'processing', 4_000);
      await write('ready.md', 'failed', 1_200); // failed, keeping what it stored
      expect(await stored('ready.md')).toBe(1_200);
      await migrateDown(database, logger, previous);
      expect(await query(database, `select column_name from information_schema.columns where table_name = 'knowledge_entries' and column_name = 'text_bytes_stored'`)).toEqual([]);
      expect(await query(database, `select tgname from pg_trigger where tgname = 'knowledge_entries_text_bytes_stored'`)).toEqual([]);
    });
  });
});
