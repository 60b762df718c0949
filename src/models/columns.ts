import { sql } from 'drizzle-orm';
import { timestamp, uuid } from 'drizzle-orm/pg-core';

/** The columns every table has: a UUID key and UTC timestamps, `updated_at` refreshed on each update. */
export const baseColumns = {
  id: uuid('id').primaryKey().defaultRandom(),
  created_at: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
  updated_at: timestamp('updated_at', { withTimezone: true })
    .notNull()
    .defaultNow()
    // The database's clock, like created_at's default, so the two never disagree.
    .$onUpdate(() => sql`now()`),
};
