import { and, count, desc, eq, getTableColumns, getTableName, type SQL, sql } from 'drizzle-orm';
import type { AnyPgColumn, PgTable } from 'drizzle-orm/pg-core';

import type { Db } from '../core/db.js';

import type { AccessPolicy, Action } from '../utils/access.js';
import type { Principal } from '../utils/authentication.js';
import { batchedById } from './batch.js';
import type { Page, PageOf } from './page.js';
import { preparedPerDb } from './prepared.js';

/** A table of owned rows: a UUID `id` and a `created_at` (the list order), as `baseColumns` gives. */
export type OwnedTable = PgTable & { id: AnyPgColumn; created_at: AnyPgColumn };

/** An empty change (PATCH {}) changes nothing; Drizzle refuses an UPDATE without columns. */
export function isEmptyChange(values: object): boolean {
  return Object.values(values).every((value) => value === undefined);
}

export interface OwnedCrud<Row extends { id: string }, New> {
  readonly table: OwnedTable;
  readonly policy: AccessPolicy<Row>;
  /** By id, whoever owns it: lookups arriving together share one prepared `id = any($1)` query. */
  getById: (db: Db, id: string) => Promise<Row | undefined>;
  /** The row if the caller may `action` on it; otherwise 404, as if it did not exist (403 for a refused scoped key). */
  getVisible: (db: Db, principal: Principal, id: string, action?: Action) => Promise<Row>;
  /** The caller's rows, newest first (ties by id), and their total. */
  list: (db: Db, principal: Principal, page: Page) => Promise<PageOf<Row>>;
  count: (db: Db, where?: SQL) => Promise<number>;
  /** The user's rows (narrowed by `where`): what a per-user limit counts. */
  countOwnedBy: (db: Db, ownerId: string, where?: SQL) => Promise<number>;
  create: (db: Db, values: New) => Promise<Row>;
  /** One `UPDATE … WHERE id AND <visible> RETURNING *`: no row (missing, not the caller's, deleted meanwhile) → 404. */
  update: (db: Db, principal: Principal, id: string, values: Partial<New>) => Promise<Row>;
  /** One `DELETE … WHERE id AND <visible>`: no row → 404. */
  remove: (db: Db, principal: Principal, id: string) => Promise<void>;
}

/**
 * The data layer of an owned resource: every query filtered by its access policy, each operation one
 * statement. A resource's crud file keeps only the queries that are its own.
 */
export function ownedCrud<Row extends { id: string }, New>(table: OwnedTable, policy: AccessPolicy<Row>): OwnedCrud<Row, New> {
  // Drizzle's builders lose the row type with a generic table: rows are cast to Row once, here.
  const t = table as PgTable & Record<string, AnyPgColumn> & OwnedTable;
  const byIds = preparedPerDb(`${getTableName(table)}_by_ids`, (db, name) =>
    db
      .select()
      .from(t)
      .where(sql`${t.id} = any(${sql.placeholder('ids')})`)
      .prepare(name),
  );
  const getById = batchedById<Row>(async (db, ids) => (await byIds(db).execute({ ids })) as unknown as Row[]);
  const columns = getTableColumns(t);

  async function countWhere(db: Db, where?: SQL): Promise<number> {
    const [row] = await db.select({ value: count() }).from(t).where(where);
    return row?.value ?? 0;
  }

  return {
    table,
    policy,
    getById,

    async getVisible(db, principal, id, action = 'read') {
      return policy.check(principal, await getById(db, id), action);
    },

    async list(db, principal, page) {
      const where = policy.where(principal, 'read');
      const rows = await db
        .select({ ...columns, total: sql<number>`count(*) over ()`.mapWith(Number) })
        .from(t)
        .where(where)
        .orderBy(desc(t.created_at), desc(t.id))
        .limit(page.limit)
        .offset(page.offset);
      const data = rows.map(({ total: _total, ...row }) => row as unknown as Row);
      // A page past the end has no row to carry the total: only then is it counted apart.
      const total = rows[0]?.total ?? (page.offset > 0 ? await countWhere(db, where) : 0);
      return { data, count: total };
    },

    count: countWhere,

    countOwnedBy: (db, ownerId, where) => countWhere(db, and(eq(policy.ownerColumn, ownerId), where)),

    async create(db, values) {
      const [row] = await db
        .insert(t)
        .values(values as never)
        .returning();
      return row as unknown as Row;
    },

    async update(db, principal, id, values) {
      if (isEmptyChange(values)) return policy.check(principal, await getById(db, id), 'write');
      const [row] = await db
        .update(t)
        .set(values as never)
        .where(and(eq(t.id, id), policy.where(principal, 'write')))
        .returning();
      if (!row) throw policy.notFound();
      return row as unknown as Row;
    },

    async remove(db, principal, id) {
      const [row] = await db
        .delete(t)
        .where(and(eq(t.id, id), policy.where(principal, 'write')))
        .returning({ id: t.id });
      if (!row) throw policy.notFound();
    },
  };
}
