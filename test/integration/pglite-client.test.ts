import { PGlite } from '@electric-sql/pglite';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { PgliteStatementClient } from '../../src/core/pglite-client.js';

// The statement cache must answer exactly as PGlite's own query() does, on every path.
describe('PgliteStatementClient', () => {
  let pg: PGlite;
  let client: PgliteStatementClient;

  beforeAll(async () => {
    pg = await PGlite.create('memory://');
    await pg.exec(`
      create type mood as enum ('calm', 'busy');
      create table items (
        id uuid primary key default gen_random_uuid(),
        name text not null unique,
        n integer,
        ok boolean not null default true,
        at timestamptz not null default now(),
        mood mood not null default 'calm',
        meta jsonb
      );`);
    client = new PgliteStatementClient(pg);
  }, 60_000);

  afterAll(async () => {
    await pg.close();
  });

  it('returns the same rows, types and fields as PGlite for objects and arrays', async () => {
    await pg.query(`insert into items (name, n, ok, meta) values ('a', 1, false, '{"k": [1, 2]}'), ('b', null, true, null)`);
    for (const rowMode of ['object', 'array'] as const) {
      const text = 'select * from items where name = any($1::text[]) order by name';
      const expected = await pg.query(text, [['a', 'b']], { rowMode });
      const actual = await client.query(text, [['a', 'b']], { rowMode });
      expect(actual.rows).toEqual(expected.rows);
      expect(actual.fields).toEqual(expected.fields);
    }
    const [first] = (await client.query<{ at: unknown; ok: unknown; n: unknown; meta: unknown }>('select * from items where name = $1', ['a'])).rows;
    expect(first!.at).toBeInstanceOf(Date);
    expect(first!.ok).toBe(false);
    expect(first!.n).toBe(1);
    expect(first!.meta).toEqual({ k: [1, 2] });
  });

  it('reuses one prepared statement per SQL text and counts affected rows', async () => {
    const text = 'update items set n = coalesce(n, 0) + $1 where name = $2';
    for (let i = 0; i < 5; i++) expect((await client.query(text, [1, 'b'])).affectedRows).toBe(1);
    expect((await client.query<{ n: number }>('select n from items where name = $1', ['b'])).rows[0]!.n).toBe(5);
    const prepared = await pg.query<{ count: number }>("select count(*)::int as count from pg_prepared_statements where statement like 'update items%'");
    expect(prepared.rows[0]!.count).toBe(1);
  });

  it('raises database errors with their SQLSTATE, and keeps working afterwards', async () => {
    await expect(client.query("insert into items (name) values ('a')")).rejects.toMatchObject({ code: '23505' });
    await expect(client.query('select * from no_such_table')).rejects.toMatchObject({ code: '42P01' });
    // A failed prepare is not cached: the same text fails again the same way.
    await expect(client.query('select * from no_such_table')).rejects.toMatchObject({ code: '42P01' });
    expect((await client.query('select 1 as one')).rows).toEqual([{ one: 1 }]);
  });

  it('never runs inside another caller’s open transaction', async () => {
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    const transaction = pg.transaction(async (tx) => {
      await tx.query("insert into items (name) values ('uncommitted')");
      await held;
      throw new Error('roll back');
    });
    // Issued while the transaction is open: it must wait and then not see the rolled-back row.
    const read = client.query<{ count: number }>("select count(*)::int as count from items where name = 'uncommitted'");
    await new Promise((resolve) => setTimeout(resolve, 50));
    release();
    await expect(transaction).rejects.toThrow('roll back');
    expect((await read).rows[0]!.count).toBe(0);
  });

  it('falls back to a fresh plan when the schema changes under a cached statement', async () => {
    const text = 'select * from items where name = $1';
    await client.query(text, ['a']);
    await pg.exec('alter table items add column extra text');
    const rows = (await client.query<Record<string, unknown>>(text, ['a'])).rows;
    expect(rows[0]).toHaveProperty('extra', null);
  });

  it('runs a transaction’s queries on prepared statements, commits them together and rolls them back together', async () => {
    const text = 'insert into items (name, n) values ($1, $2) returning name, n';
    await client.transaction(async (tx) => {
      expect((await tx.query(text, ['tx-1', 1])).rows).toEqual([{ name: 'tx-1', n: 1 }]);
      expect((await tx.query(text, ['tx-2', 2])).rows).toEqual([{ name: 'tx-2', n: 2 }]);
      // Its own writes are visible inside it, through a cached statement too.
      expect((await tx.query<{ count: number }>('select count(*)::int as count from items where name like $1', ['tx-%'])).rows[0]!.count).toBe(2);
    });
    const prepared = await pg.query<{ count: number }>("select count(*)::int as count from pg_prepared_statements where statement like 'insert into items (name, n)%'");
    expect(prepared.rows[0]!.count).toBe(1);
    await expect(
      client.transaction(async (tx) => {
        await tx.query(text, ['tx-3', 3]);
        await tx.query(text, ['tx-1', 1]); // a unique violation: the whole transaction goes
      }),
    ).rejects.toMatchObject({ code: '23505' });
    expect((await client.query<{ name: string }>('select name from items where name like $1 order by name', ['tx-%'])).rows.map((r) => r.name)).toEqual(['tx-1', 'tx-2']);
    // The statement prepared before the failure still serves later callers, outside a transaction too.
    expect((await client.query(text, ['tx-4', 4])).rows).toEqual([{ name: 'tx-4', n: 4 }]);
  });

  it('does not wait inside a transaction for a statement an outside caller is still preparing (that waits for the transaction)', async () => {
    const text = "select count(*)::int as count from items where name like 'race-%'";
    let outside!: Promise<{ rows: { count: number }[] }>;
    await client.transaction(async (tx) => {
      // Queued now behind this transaction's lock, with its statement's preparation.
      outside = client.query<{ count: number }>(text);
      await new Promise((resolve) => setTimeout(resolve, 20));
      await tx.query("insert into items (name) values ('race-1')");
      expect((await tx.query<{ count: number }>(text)).rows[0]!.count).toBe(1);
    });
    expect((await outside).rows[0]!.count).toBe(1);
  });
});
