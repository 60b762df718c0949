import { and, count, desc, eq, getTableColumns, getTableName, type SQL, sql } from 'drizzle-orm';
import type { AnyPgColumn, PgColumn, PgTable } from 'drizzle-orm/pg-core';

import type { Db } from '../core/db.js';

import type { AccessPolicy, Action } from '../utils/access.js';
import type { Principal } from '../utils/authentication.js';
import { batchedById } from './batch.js';
import type { Page, PageOf } from './page.js';
import { preparedPerDb } from './prepared.js';

/** A table of owned rows: a UUID `id` and a `created_at` (the list order), as `baseColumns` gives. */
export type OwnedTable = PgTable & { id: AnyPgColumn; created_at: AnyPgColumn };

/**
 * A row's values for an insert or an update, any of which may be an SQL expression the database
 * computes instead (`now() + …`, a subquery), as Drizzle's `values()` and `set()` take them: what
 * the crud functions that write a caller's values accept, so that no such value is cast to its
 * column's type.
 */
export type SqlValued<T> = { [K in keyof T]: T[K] | SQL };

/** An empty change (PATCH {}) changes nothing; Drizzle refuses an UPDATE without columns. */
export function isEmptyChange(values: object): boolean {
  return Object.values(values).every((value) => value === undefined);
}

/** Row locks a transaction can take on a row it reads (`select … for <strength>`). */
export type LockStrength = 'update' | 'no key update' | 'share' | 'key share';

/** The rows of a raw statement (`sql\`…\``), on PGlite and node-postgres alike. */
export async function queryRows<T>(db: Db, query: SQL): Promise<T[]> {
  const result: unknown = await db.execute(query);
  return (result as { rows: T[] }).rows;
}

/** Inserts one row and returns it as stored (defaults and generated columns filled in). */
export async function insertReturning<Row>(db: Db, table: PgTable, values: unknown): Promise<Row> {
  const [row] = await db
    .insert(table)
    .values(values as never)
    .returning();
  return row as unknown as Row;
}

/**
 * The equality filters of a list query: `{project_id: column}` and the query's values give
 * `project_id = $1 and …` for the values present (undefined: no filter).
 */
export function matching(columns: Record<string, PgColumn>, values: Record<string, unknown>): SQL | undefined {
  const conditions = Object.entries(columns)
    .filter(([name]) => values[name] !== undefined)
    .map(([name, column]) => eq(column, values[name]));
  return conditions.length ? and(...conditions) : undefined;
}

export async function countWhere(db: Db, table: PgTable, where?: SQL): Promise<number> {
  const [row] = await db.select({ value: count() }).from(table).where(where);
  return row?.value ?? 0;
}

/** `select count(*)` of at most `upTo` rows: enough to compare with a limit, without counting past it. */
export async function countUpTo(db: Db, table: PgTable, where: SQL | undefined, upTo: number): Promise<number> {
  const capped = db.select({ one: sql`1` }).from(table).where(where).limit(upTo).as('capped');
  const [row] = await db.select({ value: count() }).from(capped);
  return row?.value ?? 0;
}

/**
 * One page of `table`'s rows matching `where`, in `order`, and their total — from `count(*) over ()`,
 * so one query unless the page is past the end.
 */
export async function pageOf<Row>(db: Db, table: PgTable, where: SQL | undefined, order: SQL[], page: Page): Promise<PageOf<Row>> {
  const rows = await db
    .select({ ...getTableColumns(table), total: sql<number>`count(*) over ()`.mapWith(Number) })
    .from(table)
    .where(where)
    .orderBy(...order)
    .limit(page.limit)
    .offset(page.offset);
  const data = rows.map(({ total: _total, ...row }) => row as unknown as Row);
  // A page past the end has no row to carry the total: only then is it counted apart.
  const total = rows[0]?.total ?? (page.offset > 0 ? await countWhere(db, table, where) : 0);
  return { data, count: total };
}

export interface OwnedCrud<Row extends { id: string }, New> {
  readonly table: OwnedTable;
  readonly policy: AccessPolicy<Row>;
  /** By id, whoever owns it: lookups arriving together share one prepared `id = any($1)` query. */
  getById: (db: Db, id: string) => Promise<Row | undefined>;
  /** The row if the caller may `action` on it; otherwise 404, as if it did not exist (403 for a refused scoped key). */
  getVisible: (db: Db, principal: Principal, id: string, action?: Action) => Promise<Row>;
  /**
   * Inside a transaction: the row, locked, if the caller may `action` on it (404 otherwise). What a
   * change that reads before it writes (versions, a thread's status) holds until it commits.
   */
  lockVisible: (db: Db, principal: Principal, id: string, action: Action, strength: LockStrength) => Promise<Row>;
  /** The caller's rows (narrowed by `where`: a list's filters), newest first (ties by id), and their total. */
  list: (db: Db, principal: Principal, page: Page, where?: SQL) => Promise<PageOf<Row>>;
  count: (db: Db, where?: SQL) => Promise<number>;
  /** The user's rows (narrowed by `where`): what a per-user limit counts; with `upTo`, no further than that. */
  countOwnedBy: (db: Db, ownerId: string, where?: SQL, upTo?: number) => Promise<number>;
  create: (db: Db, values: SqlValued<New>) => Promise<Row>;
  /** One `UPDATE … WHERE id AND <visible> RETURNING *`: no row (missing, not the caller's, deleted meanwhile) → 404. */
  update: (db: Db, principal: Principal, id: string, values: SqlValued<Partial<New>>) => Promise<Row>;
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

  /**
   * A statement limited to the rows the caller may `action` on found no row `id`. A scoped key that
   * reads the row all the same (its account's agents with no project) is refused (403), as the
   * policy's check of the loaded row says; anything else is not found (404).
   */
  async function missed(db: Db, principal: Principal, id: string, action: Action): Promise<never> {
    if (action === 'write' && policy.scopedKeyReadsUnassigned) policy.check(principal, await getById(db, id), action);
    throw policy.notFound();
  }

  return {
    table,
    policy,
    getById,

    async getVisible(db, principal, id, action = 'read') {
      return policy.check(principal, await getById(db, id), action);
    },

    async lockVisible(db, principal, id, action, strength) {
      const [row] = await db
        .select()
        .from(t)
        .where(and(eq(t.id, id), policy.where(principal, action)))
        .for(strength);
      if (!row) return missed(db, principal, id, action);
      return row as unknown as Row;
    },

    async list(db, principal, page, filter) {
      return pageOf<Row>(db, t, and(policy.where(principal, 'read'), filter), [desc(t.created_at), desc(t.id)], page);
    },

    count: (db, where) => countWhere(db, t, where),

    countOwnedBy: (db, ownerId, where, upTo) => {
      const owned = and(eq(policy.ownerColumn, ownerId), where);
      return upTo === undefined ? countWhere(db, t, owned) : countUpTo(db, t, owned, upTo);
    },

    create: (db, values) => insertReturning<Row>(db, t, values),

    async update(db, principal, id, values) {
      if (isEmptyChange(values)) return policy.check(principal, await getById(db, id), 'write');
      const [row] = await db
        .update(t)
        .set(values as never)
        .where(and(eq(t.id, id), policy.where(principal, 'write')))
        .returning();
      if (!row) return missed(db, principal, id, 'write');
      return row as unknown as Row;
    },

    async remove(db, principal, id) {
      const [row] = await db
        .delete(t)
        .where(and(eq(t.id, id), policy.where(principal, 'write')))
        .returning({ id: t.id });
      if (!row) await missed(db, principal, id, 'write');
    },
  };
}
