import { execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext, runInThisContext } from 'node:vm';
import { Worker } from 'node:worker_threads';

import { PGlite } from '@electric-sql/pglite';
import { sql } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, inject, it, vi } from 'vitest';

import { loadSettings } from '../../src/core/config.js';
import { commitWithNextStatement, openDatabase, transaction } from '../../src/core/db.js';
import { inProcessLink, type PgliteLink, PgliteStatementClient, statementChannel } from '../../src/core/pglite-client.js';
import { blockWhileWaiting, openPgliteThread } from '../../src/core/pglite-thread.js';

import { eventually } from '../helpers/http.js';

const SCHEMA = `
  create type mood as enum ('calm', 'busy');
  create table items (
    id uuid primary key default gen_random_uuid(),
    name text not null unique,
    n integer,
    ok boolean not null default true,
    at timestamptz not null default now(),
    mood mood not null default 'calm',
    meta jsonb
  );`;

const copies: string[] = [];
afterAll(() => {
  for (const dir of copies) rmSync(dir, { recursive: true, force: true });
});

/**
 * A data directory of its own for one database: a copy of the run's migrated PGlite template, which
 * opens in a third of the CPU of PGlite's initdb (these tests are about the client, not a new
 * database's creation; PGlite creates one in every process test's first start); 'memory://' when
 * the run has no template (DATABASE_URL set).
 */
function dataDir(): string {
  const template = inject('templatePgliteDir');
  if (!template) return 'memory://';
  const dir = mkdtempSync(join(tmpdir(), 'keel-pglite-client-'));
  cpSync(template, dir, { recursive: true });
  copies.push(dir);
  return dir;
}

const links: Record<string, () => Promise<PgliteLink>> = {
  'this thread': async () => inProcessLink(await PGlite.create(dataDir())),
  'a thread of its own': () => openPgliteThread({ dataDir: dataDir(), startParams: [] }),
};

// The client must answer exactly as PGlite's own query() does, on every path, wherever PGlite runs.
describe.each(Object.keys(links))('PgliteStatementClient, PGlite on %s', (where) => {
  let client: PgliteStatementClient;
  /** PGlite's own answers, for comparison. */
  let reference: PGlite;

  beforeAll(async () => {
    client = await PgliteStatementClient.open(await links[where]!());
    await client.exec(SCHEMA);
    reference = await PGlite.create(dataDir());
    await reference.exec(SCHEMA);
    // Two databases to open: slow on a loaded machine.
  }, 180_000);

  afterAll(async () => {
    await client.close();
    await reference.close();
  }, 60_000);

  const count = async (text: string, params: unknown[] = []) => (await client.query<{ count: number }>(text, params)).rows[0]!.count;

  it('returns the same rows, types and fields as PGlite for objects and arrays', async () => {
    const insert = `insert into items (id, name, n, ok, at, meta) values
      ('00000000-0000-4000-8000-000000000001', 'a', 1, false, '2026-01-02T03:04:05Z', '{"k": [1, 2]}'),
      ('00000000-0000-4000-8000-000000000002', 'b', null, true, '2026-01-02T03:04:05Z', null)`;
    await client.query(insert);
    await reference.query(insert);
    for (const rowMode of ['object', 'array'] as const) {
      const text = 'select *, array[n, 7] as ns, array[at] as ats from items where name = any($1::text[]) order by name';
      const expected = await reference.query(text, [['a', 'b']], { rowMode });
      const actual = await client.query(text, [['a', 'b']], { rowMode });
      expect(actual.rows).toEqual(expected.rows);
      expect(actual.fields).toEqual(expected.fields);
    }
    const [first] = (await client.query<{ at: unknown; ok: unknown; n: unknown; meta: unknown }>('select * from items where name = $1', ['a'])).rows;
    expect(first!.at).toBeInstanceOf(Date);
    expect(first!.ok).toBe(false);
    expect(first!.n).toBe(1);
    expect(first!.meta).toEqual({ k: [1, 2] });
    // Parameters go through PGlite's serializers: a Date, an array, an object for jsonb.
    const at = new Date('2026-05-06T07:08:09.123Z');
    await client.query('insert into items (name, at, meta) values ($1, $2, $3)', ['dated', at, { x: [1, 'y'] }]);
    const [dated] = (await client.query<{ at: Date; meta: unknown }>('select at, meta from items where name = any($1)', [['dated']])).rows;
    expect(dated).toEqual({ at, meta: { x: [1, 'y'] } });
  });

  it('reuses one prepared statement per SQL text and counts affected rows', async () => {
    const text = 'update items set n = coalesce(n, 0) + $1 where name = $2';
    for (let i = 0; i < 5; i++) expect((await client.query(text, [1, 'b'])).affectedRows).toBe(1);
    expect((await client.query<{ n: number }>('select n from items where name = $1', ['b'])).rows[0]!.n).toBe(5);
    expect(await count("select count(*)::int as count from pg_prepared_statements where statement like 'update items%'")).toBe(1);
  });

  it('raises database errors with their SQLSTATE, and keeps working afterwards', async () => {
    await expect(client.query("insert into items (name) values ('a')")).rejects.toMatchObject({ code: '23505' });
    await expect(client.query('select * from no_such_table')).rejects.toMatchObject({ code: '42P01' });
    // A failed prepare is not cached: the same text fails again the same way.
    await expect(client.query('select * from no_such_table')).rejects.toMatchObject({ code: '42P01' });
    await expect(client.exec('select 1; select * from no_such_table')).rejects.toMatchObject({ code: '42P01' });
    expect((await client.query('select 1 as one')).rows).toEqual([{ one: 1 }]);
  });

  it('publishes each statement on its tracing channel while subscribed: its text as it starts, then its end or its error', async () => {
    const seen: string[] = [];
    const handlers = {
      start: (context: { text: string }) => void seen.push(`start ${context.text}`),
      end: () => undefined,
      asyncStart: () => undefined,
      error: (context: { text: string }) => void seen.push(`error ${context.text}`),
      asyncEnd: (context: { text: string }) => void seen.push(`end ${context.text}`),
    };
    statementChannel.subscribe(handlers);
    try {
      await client.query('select 1 as one');
      await expect(client.query('select * from no_such_table')).rejects.toMatchObject({ code: '42P01' });
      await client.exec('select 2');
    } finally {
      statementChannel.unsubscribe(handlers);
    }
    await client.query('select 3');
    expect(seen).toEqual(['start select 1 as one', 'end select 1 as one', 'start select * from no_such_table', 'error select * from no_such_table', 'end select * from no_such_table', 'start select 2', 'end select 2']);
  });

  it('answers exec with one result per statement, as PGlite', async () => {
    const text = "select 1 as one; update items set n = n where name = 'zzz'; select name from items where name = 'a'";
    const results = await client.exec(text);
    expect(results.map((r) => ({ rows: r.rows, affectedRows: r.affectedRows }))).toEqual([
      { rows: [{ one: 1 }], affectedRows: 1 },
      { rows: [], affectedRows: 0 },
      { rows: [{ name: 'a' }], affectedRows: 1 },
    ]);
  });

  it('answers many concurrent queries, each with its own rows', async () => {
    const answers = await Promise.all(Array.from({ length: 200 }, (_, i) => client.query<{ i: number; s: string }>('select $1::int as i, repeat($2, $1::int) as s', [i, 'x'])));
    answers.forEach((answer, i) => expect(answer.rows).toEqual([{ i, s: 'x'.repeat(i) }]));
  });

  it('returns large results whole', async () => {
    const { rows } = await client.query<{ i: number; s: string }>('select i, repeat(i::text, 20) as s from generate_series(1, $1::int) i', [50_000]);
    expect(rows).toHaveLength(50_000);
    expect(rows[0]).toEqual({ i: 1, s: '1'.repeat(20) });
    expect(rows[49_999]).toEqual({ i: 50_000, s: '50000'.repeat(20) });
    const [big] = (await client.query<{ s: string }>("select repeat('y', 8000000) as s")).rows;
    expect(big!.s).toHaveLength(8_000_000);
  });

  it('never runs a caller’s query inside another caller’s open transaction', async () => {
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    const transaction = client.transaction(async (tx) => {
      await tx.query("insert into items (name) values ('uncommitted')");
      await held;
      throw new Error('roll back');
    });
    await new Promise((resolve) => setTimeout(resolve, 20));
    // Issued while the transaction is open: it must wait and then not see the rolled-back row.
    const read = count("select count(*)::int as count from items where name = 'uncommitted'");
    const exec = client.exec("insert into items (name) values ('after')");
    await new Promise((resolve) => setTimeout(resolve, 30));
    release();
    await expect(transaction).rejects.toThrow('roll back');
    expect(await read).toBe(0);
    await exec;
    expect(await count("select count(*)::int as count from items where name in ('uncommitted', 'after')")).toBe(1);
  });

  it('runs transactions one after another, never interleaved', async () => {
    await client.query("insert into items (name, n) values ('counter', 0)");
    await Promise.all(
      Array.from({ length: 20 }, () =>
        client.transaction(async (tx) => {
          const { rows } = await tx.query<{ n: number }>("select n from items where name = 'counter'");
          await new Promise((resolve) => setImmediate(resolve));
          await tx.query("update items set n = $1 where name = 'counter'", [rows[0]!.n + 1]);
        }),
      ),
    );
    expect(await count("select n as count from items where name = 'counter'")).toBe(20);
  });

  it('falls back to a fresh plan when the schema changes under a cached statement', async () => {
    const text = 'select * from items where name = $1';
    await client.query(text, ['a']);
    await client.exec('alter table items add column extra text');
    const rows = (await client.query<Record<string, unknown>>(text, ['a'])).rows;
    expect(rows[0]).toHaveProperty('extra', null);
    // The fresh plan's statement was closed after use: none is left behind.
    expect(await count("select count(*)::int as count from pg_prepared_statements where name like 'keel_once_%'")).toBe(0);
  });

  it('runs a transaction’s queries on prepared statements, commits them together and rolls them back together', async () => {
    const text = 'insert into items (name, n) values ($1, $2) returning name, n';
    await client.transaction(async (tx) => {
      expect((await tx.query(text, ['tx-1', 1])).rows).toEqual([{ name: 'tx-1', n: 1 }]);
      expect((await tx.query(text, ['tx-2', 2])).rows).toEqual([{ name: 'tx-2', n: 2 }]);
      // Its own writes are visible inside it, through a cached statement too, and queries sent together answer in turn.
      const [a, b] = await Promise.all([
        tx.query<{ count: number }>('select count(*)::int as count from items where name like $1', ['tx-%']),
        tx.query<{ n: number }>('select n from items where name = $1', ['tx-2']),
      ]);
      expect(a.rows[0]!.count).toBe(2);
      expect(b.rows[0]!.n).toBe(2);
    });
    expect(await count("select count(*)::int as count from pg_prepared_statements where statement like 'insert into items (name, n) values ($1%'")).toBe(1);
    await expect(
      client.transaction(async (tx) => {
        await tx.query(text, ['tx-3', 3]);
        await tx.query(text, ['tx-1', 1]); // a unique violation: the whole transaction goes
      }),
    ).rejects.toMatchObject({ code: '23505' });
    expect((await client.query<{ name: string }>('select name from items where name like $1 order by name', ['tx-%'])).rows.map((r) => r.name)).toEqual(['tx-1', 'tx-2']);
    // The statement prepared before the failure still serves later callers, outside a transaction too.
    expect((await client.query(text, ['tx-4', 4])).rows).toEqual([{ name: 'tx-4', n: 4 }]);
    // No transaction is left open after the failure.
    expect(await count("select count(*)::int as count from items where name = 'tx-4'")).toBe(1);
  });

  it('rolls back when the first statement of a transaction fails (it travels with BEGIN), and when the callback throws', async () => {
    await expect(client.transaction((tx) => tx.query('select * from no_such_table'))).rejects.toMatchObject({ code: '42P01' });
    await expect(
      client.transaction(async (tx) => {
        await tx.query("insert into items (name) values ('thrown')");
        throw new Error('changed my mind');
      }),
    ).rejects.toThrow('changed my mind');
    expect(await count("select count(*)::int as count from items where name = 'thrown'")).toBe(0);
    // A transaction that sends nothing opens nothing; its result is returned.
    expect(await client.transaction(async () => 'nothing')).toBe('nothing');
    const [status] = (await client.query<{ status: string }>("select current_setting('transaction_isolation') as status")).rows;
    expect(status!.status).toBe('read committed');
  });

  it('sends a transaction’s COMMIT with the statement marked last (commitWithNext); that statement’s failure rolls the whole transaction back', async () => {
    const text = 'insert into items (name, n) values ($1, $2) returning name, n';
    await client.query(text, ['last-0', 0]);
    const link = (client as unknown as { link: PgliteLink }).link;
    // A transaction's exchanges go through sendHeld where the link has it (PGlite on its own thread).
    const send = vi.spyOn(link, link.sendHeld ? 'sendHeld' : 'send');
    try {
      const rows = await client.transaction(async (tx) => {
        await tx.query(text, ['last-1', 1]);
        tx.commitWithNext();
        return (await tx.query(text, ['last-2', 2])).rows;
      });
      expect(rows).toEqual([{ name: 'last-2', n: 2 }]);
      // BEGIN went with the first statement and COMMIT with the last: two exchanges in all.
      expect(send).toHaveBeenCalledTimes(2);
    } finally {
      send.mockRestore();
    }
    expect(await count("select count(*)::int as count from items where name in ('last-1', 'last-2')")).toBe(2);
    // BEGIN, the one statement and COMMIT together; nothing may follow it in the transaction.
    let kept!: { closed: boolean };
    await expect(
      client.transaction(async (tx) => {
        kept = tx;
        tx.commitWithNext();
        await tx.query(text, ['last-3', 3]);
        expect(tx.closed).toBe(true);
        await tx.query('select 1');
      }),
    ).rejects.toThrow('Transaction is closed');
    expect(kept.closed).toBe(true);
    expect(await count("select count(*)::int as count from items where name = 'last-3'")).toBe(1);
    // The last statement fails (a unique violation): what came before it goes too, and no transaction stays open.
    await expect(
      client.transaction(async (tx) => {
        await tx.query(text, ['last-4', 4]);
        tx.commitWithNext();
        await tx.query(text, ['last-1', 1]);
      }),
    ).rejects.toMatchObject({ code: '23505' });
    expect(await count("select count(*)::int as count from items where name = 'last-4'")).toBe(0);
    await client.transaction(async (tx) => {
      await tx.query(text, ['last-5', 5]);
      await tx.query('select 1');
    });
    expect(await count("select count(*)::int as count from items where name = 'last-5'")).toBe(1);
    // Marked but nothing sent after it: COMMIT goes on its own, as before.
    await client.transaction(async (tx) => {
      await tx.query(text, ['last-6', 6]);
      tx.commitWithNext();
    });
    expect(await count("select count(*)::int as count from items where name = 'last-6'")).toBe(1);
    // A statement no one prepared before: its preparation goes first (with BEGIN), COMMIT with its execution.
    await client.transaction(async (tx) => {
      tx.commitWithNext();
      expect((await tx.query("insert into items (name, n) values ($1, 7) returning n", ['last-7'])).rows).toEqual([{ n: 7 }]);
    });
    expect(await count("select count(*)::int as count from items where name = 'last-7'")).toBe(1);
  });

  it('refuses a closed transaction’s queries', async () => {
    let kept!: Pick<PGlite, 'query'>;
    await client.transaction(async (tx) => {
      kept = tx;
      await tx.query('select 1');
    });
    await expect(kept.query('select 1')).rejects.toThrow('Transaction is closed');
  });

  it('does not wait inside a transaction for a statement an outside caller is still preparing (that waits for the transaction)', async () => {
    const text = "select count(*)::int as count from items where name like 'race-%'";
    let outside!: Promise<{ rows: { count: number }[] }>;
    await client.transaction(async (tx) => {
      await tx.query('select 1');
      // Queued now behind this transaction, with its statement's preparation.
      outside = client.query<{ count: number }>(text);
      await new Promise((resolve) => setTimeout(resolve, 20));
      await tx.query("insert into items (name) values ('race-1')");
      expect((await tx.query<{ count: number }>(text)).rows[0]!.count).toBe(1);
    });
    expect((await outside).rows[0]!.count).toBe(1);
  });

  it('holds the session for `session`: its settings and nothing else in between', async () => {
    const outside: Promise<unknown>[] = [];
    const seen = await client.session(async (session) => {
      await session.exec("set application_name = 'held'");
      outside.push(client.exec("set application_name = 'other'"));
      await new Promise((resolve) => setTimeout(resolve, 20));
      const { rows } = await session.query<{ name: string }>("select current_setting('application_name') as name");
      return rows[0]!.name;
    });
    expect(seen).toBe('held');
    await Promise.all(outside);
  });
});

describe('PGlite on this thread, through the client', () => {
  it('keeps nothing of the replies it answered: memory stays flat over many queries', async () => {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    const client = await PgliteStatementClient.open(inProcessLink(await PGlite.create(dataDir())));
    try {
      const round = async () => {
        for (let i = 0; i < 10_000; i++) await client.query('select $1::int as i, $2::text as s', [i, 'x']);
      };
      await round();
      gc();
      const before = process.memoryUsage().heapUsed;
      await round();
      gc();
      // PGlite's default output handler (execProtocolRawSync) kept every reply's parsed messages: ~3 MB a round.
      expect(process.memoryUsage().heapUsed - before).toBeLessThan(1_500_000);
    } finally {
      await client.close();
    }
  }, 180_000);
});

describe('PGlite on a thread of its own', () => {
  it('closes after an open transaction commits, refuses queries afterwards, and keeps what it committed', async () => {
    const dir = inject('templatePgliteDir') ? dataDir() : mkdtempSync(join(tmpdir(), 'keel-pglite-thread-'));
    try {
      let client = await PgliteStatementClient.open(await openPgliteThread({ dataDir: dir, startParams: [] }));
      await client.exec('create table kept (n int)');
      await Promise.all(Array.from({ length: 50 }, (_, n) => client.query('insert into kept values ($1)', [n])));
      let closing!: Promise<void>;
      await client.transaction(async (tx) => {
        await tx.query('insert into kept values ($1)', [50]);
        closing = client.close();
        await new Promise((resolve) => setTimeout(resolve, 20));
        await tx.query('insert into kept values ($1)', [51]);
      });
      await closing;
      await expect(client.query('select 1')).rejects.toThrow('database is closed');

      client = await PgliteStatementClient.open(await openPgliteThread({ dataDir: dir, startParams: [] }));
      expect((await client.query<{ count: number }>('select count(*)::int as count from kept')).rows[0]!.count).toBe(52);
      await client.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 60_000);

  it('commitWithNextStatement: the COMMIT goes with a Drizzle transaction’s next statement, and a savepoint’s is left alone', async () => {
    const database = await openDatabase(loadSettings({ PGLITE_DATA_DIR: dataDir(), PGLITE_THREAD: 'true' }));
    const { db } = database;
    try {
      await db.execute(sql`create table marked (n integer primary key)`);
      const insert = (tx: typeof db, n: number) => tx.execute(sql`insert into marked values (${n})`);
      await transaction(db, async (tx) => {
        await insert(tx, 1);
        commitWithNextStatement(tx);
        await insert(tx, 2);
        await expect(insert(tx, 3)).rejects.toMatchObject({ cause: { message: 'Transaction is closed' } });
      });
      // In a savepoint it does nothing: the savepoint's rollback still undoes its statements, and the outer transaction goes on.
      await transaction(db, async (tx) => {
        await insert(tx, 4);
        await expect(
          transaction(tx, async (inner) => {
            commitWithNextStatement(inner);
            await insert(inner, 5);
            throw new Error('undo the savepoint');
          }),
        ).rejects.toThrow('undo the savepoint');
        await insert(tx, 6);
      });
      // Outside a transaction it does nothing.
      commitWithNextStatement(db);
      await insert(db, 7);
      await insert(db, 8);
      const rows = await database.withSession((session) => session.query<{ ns: number[] }>("select coalesce(array_agg(n order by n), '{}') as ns from marked"));
      expect(rows[0]!.ns).toEqual([1, 2, 4, 6, 7, 8]);
    } finally {
      await database.close();
    }
  }, 60_000);

  /** One field of /proc/self/task/<tid>/stat for each of this process's threads (1-based, as proc(5) numbers them). */
  const threadsField = (field: number) =>
    readdirSync('/proc/self/task').flatMap((tid) => {
      try {
        // Fields from the third on follow the command name's closing parenthesis.
        return [Number(readFileSync(`/proc/self/task/${tid}/stat`, 'utf8').split(') ')[1]!.split(' ')[field - 3])];
      } catch {
        return []; // a thread that ended meanwhile
      }
    });

  it.skipIf(process.platform !== 'linux')('runs the thread at the nice value asked for (openDatabase: PGLITE_THREAD_NICE), the rest of the process as it was', async () => {
    const niceValues = () => threadsField(19);
    const before = niceValues();
    const database = await openDatabase(loadSettings({ PGLITE_DATA_DIR: dataDir(), PGLITE_THREAD: 'true', PGLITE_THREAD_NICE: '7' }));
    try {
      await database.ping();
      expect(niceValues().filter((nice) => nice === 7)).toHaveLength(before.filter((nice) => nice === 7).length + 1);
    } finally {
      await database.close();
    }
    expect(niceValues().filter((nice) => nice === 7)).toHaveLength(before.filter((nice) => nice === 7).length);
  }, 60_000);

  const SCHED_IDLE = 5;
  const chrtRuns = (() => {
    try {
      execFileSync('chrt', ['--max'], { stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  })();

  it.skipIf(process.platform !== 'linux' || !chrtRuns)('runs the thread under SCHED_IDLE when asked (PGLITE_THREAD_SCHED_IDLE), the rest of the process as it was', async () => {
    const idleThreads = () => threadsField(41).filter((policy) => policy === SCHED_IDLE).length;
    const before = idleThreads();
    // The link alone, in memory: once idle-scheduled the thread only closes (little work on a busy
    // machine). openDatabase's part is the next test's.
    const link = await openPgliteThread({ dataDir: 'memory://', startParams: [], schedIdle: true });
    try {
      expect(idleThreads()).toBe(before + 1);
    } finally {
      await link.close();
    }
    // terminate() resolves as the thread stops; the OS reaps it a moment later.
    await eventually(() => Promise.resolve(idleThreads() === before));
    // Not asked: no thread of this process is idle-scheduled.
    const plain = await openPgliteThread({ dataDir: 'memory://', startParams: [] });
    try {
      expect(idleThreads()).toBe(before);
    } finally {
      await plain.close();
    }
  }, 120_000); // the close runs idle-scheduled: on a busy machine it waits for a free core (18 s beside two busy loops and CI)

  it.skipIf(process.platform !== 'linux')('refuses to open, naming the setting, when SCHED_IDLE cannot be set (no chrt), and leaves the directory free', async () => {
    const dir = dataDir();
    const path = process.env.PATH;
    // The thread's environment is a copy of this one's when it starts.
    process.env.PATH = join(tmpdir(), 'keel-no-such-dir');
    let opening: Promise<unknown>;
    try {
      opening = openDatabase(loadSettings({ PGLITE_DATA_DIR: dir, PGLITE_THREAD: 'true', PGLITE_THREAD_SCHED_IDLE: 'true' }));
    } finally {
      process.env.PATH = path;
    }
    await expect(opening).rejects.toThrow(/PGLITE_THREAD_SCHED_IDLE=true: util-linux chrt could not give the database thread SCHED_IDLE/);
    const database = await openDatabase(loadSettings({ PGLITE_DATA_DIR: dir, PGLITE_THREAD: 'true' }));
    await database.ping();
    await database.close();
  }, 60_000);

  it('answers a transaction’s statements without a turn of the event loop, and a long one without blocking the loop past a few milliseconds', async () => {
    const client = await PgliteStatementClient.open(await openPgliteThread({ dataDir: dataDir(), startParams: [] }));
    try {
      await client.query('select $1::int as n', [0]);
      // Through messages, every answer waits for the event loop: an immediate queued before the
      // statement runs first. Answered on this thread, it does not (asserted for one statement of
      // 20, so that a slow moment of the machine past HELD_BLOCK_MS cannot fail it).
      const withoutTurn = await client.transaction(async (tx) => {
        let answeredFirst = 0;
        for (let n = 0; n < 20; n++) {
          let turned = false;
          setImmediate(() => (turned = true));
          expect((await tx.query<{ n: number }>('select $1::int as n', [n])).rows).toEqual([{ n }]);
          if (!turned) answeredFirst++;
        }
        return answeredFirst;
      });
      expect(withoutTurn).toBeGreaterThan(0);

      let ticks = 0;
      const timer = setInterval(() => ticks++, 5);
      const slept = await client.transaction(async (tx) => {
        const first = await tx.query<{ n: number }>('select 1 as n');
        // 400 ms on the database's thread: this thread blocks for HELD_BLOCK_MS of it at most, then its timers run.
        const long = await tx.query<{ n: number }>('select 2 as n from pg_sleep(0.4)');
        return [first.rows[0]!.n, long.rows[0]!.n];
      });
      clearInterval(timer);
      expect(slept).toEqual([1, 2]);
      expect(ticks).toBeGreaterThanOrEqual(10);
    } finally {
      await client.close();
    }
  }, 60_000);

  it('blocks for a held answer until the shared word says it is in, not until the first wake-up (a late notify of the one before)', async () => {
    // [0]: the word (0 waiting, 1 answered); [1]: the go signal for the other thread.
    const shared = new Int32Array(new SharedArrayBuffer(8));
    const other = new Worker(
      `const { workerData } = require('node:worker_threads');
       const shared = new Int32Array(workerData);
       const sleep = (ms) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
       Atomics.wait(shared, 1, 0);
       sleep(5);
       Atomics.notify(shared, 0); // a wake-up with the word still 0
       sleep(30);
       Atomics.store(shared, 0, 1);
       Atomics.notify(shared, 0);`,
      { eval: true, workerData: shared.buffer },
    );
    try {
      await new Promise((resolve) => other.once('online', resolve));
      Atomics.store(shared, 1, 1);
      Atomics.notify(shared, 1);
      const began = performance.now();
      expect(blockWhileWaiting(shared, 5_000)).toBe(true);
      expect(Atomics.load(shared, 0)).toBe(1);
      // Past the first wake-up (~5 ms), at the answer (~35 ms): a timed Atomics.wait may end a little early (29.97 ms seen on Node 24).
      expect(performance.now() - began).toBeGreaterThanOrEqual(20);
      // Never answered: false once the time is up.
      const idle = new Int32Array(new SharedArrayBuffer(4));
      const waited = performance.now();
      expect(blockWhileWaiting(idle, 15)).toBe(false);
      expect(performance.now() - waited).toBeGreaterThanOrEqual(14);
    } finally {
      await other.terminate();
    }
  });

  it('gives each held statement its own answer when answers come about when the main thread stops blocking', async () => {
    const client = await PgliteStatementClient.open(await openPgliteThread({ dataDir: dataDir(), startParams: [] }));
    try {
      // Statements of 0–20 ms around HELD_BLOCK_MS (10): some answered while blocked, some as
      // messages, some as the main thread gives up; each must get its own row, in order.
      for (let round = 0; round < 6; round++) {
        const seen = await client.transaction(async (tx) => {
          const values: number[] = [];
          for (let n = 0; n < 12; n++) {
            const ms = (n * 7 + round * 3) % 21;
            values.push((await tx.query<{ n: number }>('select $1::int as n from pg_sleep($2::float8 / 1000)', [round * 100 + n, ms])).rows[0]!.n);
          }
          return values;
        });
        expect(seen).toEqual(Array.from({ length: 12 }, (_, n) => round * 100 + n));
        // Single statements in between, several in flight, keep theirs too.
        const singles = await Promise.all(Array.from({ length: 10 }, (_, n) => client.query<{ n: number }>('select $1::int as n', [-1 - n])));
        expect(singles.map((r) => r.rows[0]!.n)).toEqual(Array.from({ length: 10 }, (_, n) => -1 - n));
      }
      // A held statement's error is its own, and the session goes on.
      await expect(client.transaction((tx) => tx.query('select 1 / 0'))).rejects.toMatchObject({ code: '22012' });
      expect((await client.query<{ n: number }>('select 3 as n')).rows).toEqual([{ n: 3 }]);
      // Held and unheld exchanges keep their order: a transaction started while single statements are unanswered.
      // (The insert is prepared first: a statement still being prepared would go out after the transaction.)
      await client.exec('create table ordered (n int)');
      await client.query('insert into ordered values ($1)', [-1]);
      const inserts = Array.from({ length: 20 }, (_, n) => client.query('insert into ordered values ($1)', [n]));
      const counted = await client.transaction(async (tx) => (await tx.query<{ count: number }>('select count(*)::int as count from ordered')).rows[0]!.count);
      await Promise.all(inserts);
      expect(counted).toBe(21);
    } finally {
      await client.close();
    }
  }, 60_000);

  it('a close that waits for the thread keeps the process alive, even when an answer sent before it arrives first (nothing else holds the event loop)', () => {
    // A child process whose only work is the thread: a statement still running (as the WAL
    // writer's flush can be when the database closes), then the close. The statement's answer made
    // the idle thread let go of the process before the close's word came: the process ended
    // half-closed with status 0 (vitest's global setup ended so, with no test run at all).
    const script = `
      import { openPgliteThread } from ${JSON.stringify(join(process.cwd(), 'src/core/pglite-thread.ts'))};
      const text = Buffer.from('select pg_sleep(0.3)\\0');
      const query = Buffer.alloc(5);
      query.write('Q');
      query.writeInt32BE(4 + text.length, 1);
      const link = await openPgliteThread({ dataDir: process.argv[2], startParams: [] });
      link.send(Buffer.concat([query, text])).catch(() => {});
      await link.close();
      console.log('closed');`;
    const dir = mkdtempSync(join(tmpdir(), 'keel-close-'));
    copies.push(dir);
    writeFileSync(join(dir, 'close.mts'), script);
    const out = execFileSync(process.execPath, ['--import', 'tsx', join(dir, 'close.mts'), dataDir()], { encoding: 'utf8', timeout: 60_000 });
    expect(out.trim()).toBe('closed');
  }, 60_000);

  it('reports an error opening the database as the thread saw it', async () => {
    await expect(openPgliteThread({ dataDir: dataDir(), startParams: ['-c', 'no_such_setting_at_all=1'] })).rejects.toThrow();
  }, 60_000);

  // The default (a thread of its own) and PGLITE_THREAD=false (PGlite on this thread).
  it.each(['true', 'false'])('serves openDatabase with pgvector and the session’s settings (PGLITE_THREAD=%s)', async (thread) => {
    const database = await openDatabase(loadSettings({ PGLITE_DATA_DIR: dataDir(), PGLITE_THREAD: thread }));
    try {
      await database.withSession(async (session) => {
        await session.exec('create extension if not exists vector');
        expect(await session.query("select current_setting('hnsw.iterative_scan') as scan")).toEqual([{ scan: 'relaxed_order' }]);
        expect(await session.query("select '[1,2]'::vector <-> '[1,3]'::vector as d")).toEqual([{ d: 1 }]);
      });
      await database.ping();
    } finally {
      await database.close();
    }
    await expect(database.ping()).rejects.toThrow('closed');
  }, 60_000);
});

/**
 * A WebAssembly module of one exported function, `loop(n)`, that adds n, n-1, ... 1 in a loop:
 *   (func (export "loop") (param $n i32) (result i32) (local $sum i32)
 *     (loop (local.set $sum (i32.add (local.get $sum) (local.get $n)))
 *           (br_if 0 (local.tee $n (i32.sub (local.get $n) (i32.const 1)))))
 *     (local.get $sum))
 * A call with n = 100,000 spends more than V8's tier-up budget for one function (Node 20 and 24).
 */
const HOT_LOOP_BODY = [0x01, 0x01, 0x7f, 0x03, 0x40, 0x20, 0x01, 0x20, 0x00, 0x6a, 0x21, 0x01, 0x20, 0x00, 0x41, 0x01, 0x6b, 0x22, 0x00, 0x0d, 0x00, 0x0b, 0x20, 0x01, 0x0b];
const HOT_LOOP = [
  ...[0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00],
  ...[0x01, 0x06, 0x01, 0x60, 0x01, 0x7f, 0x01, 0x7f], // type: (i32) -> i32
  ...[0x03, 0x02, 0x01, 0x00], // one function of that type
  ...[0x07, 0x08, 0x01, 0x04, ...Buffer.from('loop'), 0x00, 0x00], // exported as "loop"
  ...[0x0a, HOT_LOOP_BODY.length + 2, 0x01, HOT_LOOP_BODY.length, ...HOT_LOOP_BODY],
];
let probes = 0;
/** Node's WebAssembly API, which the project's TypeScript libraries (ES, no DOM) declare no value for. */
const wasm = (globalThis as unknown as { WebAssembly: { instantiate(bytes: Uint8Array): Promise<{ instance: { exports: { loop: (n: number) => number } } }> } }).WebAssembly;

/**
 * Whether V8 compiles a hot WebAssembly function compiled from now on again with its optimizing
 * compiler (TurboFan), within `withinMs` of calls. The tiering flags are the process's, so this
 * module, compiled here, answers for PGlite's too (on its thread or on this one). Each probe's
 * module ends in a custom section of its own: V8 reuses a live module compiled from the same bytes,
 * tiering as chosen then. V8's own test helper (%IsTurboFanFunction, natives syntax) tells which
 * code a function runs; tier-up happens on a background thread, hence the calls over time.
 */
async function tiersUp(withinMs: number): Promise<boolean> {
  setFlagsFromString('--allow-natives-syntax');
  const isTurboFan = runInThisContext('(f) => %IsTurboFanFunction(f)') as (f: unknown) => boolean;
  const nonce = Buffer.from(`probe ${++probes}`);
  const { instance } = await wasm.instantiate(new Uint8Array([...HOT_LOOP, 0x00, nonce.length + 1, 0x00, ...nonce]));
  const { loop } = instance.exports;
  const deadline = Date.now() + withinMs;
  while (Date.now() < deadline) {
    expect(loop(100_000)).toBe(705_082_704); // 100,000 × 100,001 / 2, wrapped to 32 bits
    if (isTurboFan(loop)) return true;
    await new Promise((done) => setTimeout(done, 10));
  }
  return false;
}

describe('openDatabase: PGlite’s WebAssembly tiering (PGLITE_WASM_TIER_UP)', () => {
  // Node 24 ignored the default: `--liftoff-only` set at run time did not turn V8's tier-up off
  // there. Each open decides for what the process compiles next, whatever an open before it chose.
  it('keeps V8’s baseline code by default, tiers up with PGLITE_WASM_TIER_UP=true, and back', async () => {
    const tieringAfterOpen = async (tierUp: 'true' | 'false') => {
      const database = await openDatabase(loadSettings({ PGLITE_DATA_DIR: dataDir(), PGLITE_WASM_TIER_UP: tierUp }));
      await database.ping();
      await database.close();
      // Tier-up takes milliseconds: 1.5 s of hot calls for one that should not come (a late one
      // could only let the test pass wrongly), 10 s for one that should (it returns once seen).
      return tiersUp(tierUp === 'true' ? 10_000 : 1_500);
    };
    expect(await tieringAfterOpen('false')).toBe(false);
    expect(await tieringAfterOpen('true')).toBe(true);
    expect(await tieringAfterOpen('false')).toBe(false);
  }, 120_000);
});
