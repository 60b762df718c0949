import { and, asc, desc, eq, gt, lt, type SQL } from 'drizzle-orm';
import type { AnyPgColumn, PgColumn, PgTable } from 'drizzle-orm/pg-core';

import type { Db } from '../core/db.js';
import { NotFoundError, UnprocessableError } from '../core/errors.js';

import { insertReturning, isEmptyChange, pageOf } from './owned.js';
import type { Page, PageOf } from './page.js';

/** A page of a child list, optionally after a cursor: the id of a row of the same parent. */
export interface CursorPage extends Page {
  after?: string | undefined;
}

export interface ChildCrudOptions {
  /** How the resource is named in messages: `Message` → "Message not found". */
  noun: string;
  /** The column naming the parent row (`thread_id`): ownership and visibility flow from the parent. */
  parent: PgColumn;
  /** The list order, unique within a parent (a sequence number, a version). */
  order: PgColumn;
  /** `asc` (creation order, the default) or `desc` (newest first). */
  direction?: 'asc' | 'desc';
  /** The column a row is addressed by in its parent's path (default `id`). */
  key?: PgColumn;
}

export interface ChildCrud<Row, New> {
  readonly table: PgTable;
  readonly notFound: () => NotFoundError;
  /** The row of `parentId` with this key, or 404. */
  getIn: (db: Db, parentId: string, key: string | number) => Promise<Row>;
  /**
   * The parent's rows in list order, paged; with `after`, only those after that row (422 when it is
   * not a row of this parent). `count` is the total the page was cut from (after the cursor).
   */
  list: (db: Db, parentId: string, page: CursorPage, where?: SQL) => Promise<PageOf<Row>>;
  create: (db: Db, values: New) => Promise<Row>;
  /** One `UPDATE … WHERE parent AND key RETURNING *`: no row → 404. */
  update: (db: Db, parentId: string, key: string | number, values: Partial<New>) => Promise<Row>;
  /** One `DELETE … WHERE parent AND key`: no row → 404. */
  remove: (db: Db, parentId: string, key: string | number) => Promise<void>;
}

/**
 * The data layer of a resource nested under an owned one (`/threads/{id}/messages`): every query
 * is confined to one parent, whose visibility the service checks first through the parent's
 * access policy. Lists run in a stable order with offset and cursor paging.
 */
export function childCrud<Row, New>(table: PgTable, options: ChildCrudOptions): ChildCrud<Row, New> {
  const t = table as PgTable & { id: AnyPgColumn };
  const { parent, order } = options;
  const key = options.key ?? t.id;
  const descending = options.direction === 'desc';
  const notFound = () => new NotFoundError(`${options.noun} not found`);
  const inParent = (parentId: string, value: string | number) => and(eq(parent, parentId), eq(key, value));

  /** Where the cursor row sits in the order, or a 422 naming the parameter. */
  async function cursorPosition(db: Db, parentId: string, after: string): Promise<unknown> {
    const [row] = await db
      .select({ position: order })
      .from(t)
      .where(and(eq(parent, parentId), eq(t.id, after)));
    if (!row) throw new UnprocessableError({ loc: ['query', 'after'], msg: `No ${options.noun.toLowerCase()} with this id in this list`, type: 'value_error' });
    return row.position;
  }

  return {
    table,
    notFound,

    async getIn(db, parentId, value) {
      const [row] = await db.select().from(t).where(inParent(parentId, value));
      if (!row) throw notFound();
      return row as unknown as Row;
    },

    async list(db, parentId, page, filter) {
      let where = and(eq(parent, parentId), filter);
      if (page.after !== undefined) {
        const position = await cursorPosition(db, parentId, page.after);
        where = and(where, descending ? lt(order, position) : gt(order, position));
      }
      return pageOf<Row>(db, t, where, [descending ? desc(order) : asc(order)], page);
    },

    create: (db, values) => insertReturning<Row>(db, t, values),

    async update(db, parentId, value, values) {
      if (isEmptyChange(values)) return this.getIn(db, parentId, value);
      const [row] = await db
        .update(t)
        .set(values as never)
        .where(inParent(parentId, value))
        .returning();
      if (!row) throw notFound();
      return row as unknown as Row;
    },

    async remove(db, parentId, value) {
      const [row] = await db.delete(t).where(inParent(parentId, value)).returning({ id: t.id });
      if (!row) throw notFound();
    },
  };
}
