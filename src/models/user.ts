import { sql } from 'drizzle-orm';
import { boolean, integer, pgTable, uniqueIndex, varchar } from 'drizzle-orm/pg-core';

import { baseColumns } from './columns.js';

export const users = pgTable(
  'users',
  {
    ...baseColumns,
    email: varchar('email', { length: 255 }).notNull(),
    hashed_password: varchar('hashed_password', { length: 255 }).notNull(),
    full_name: varchar('full_name', { length: 255 }),
    is_active: boolean('is_active').notNull().default(true),
    is_superuser: boolean('is_superuser').notNull().default(false),
    /** Bumped on password change and deactivation; tokens carrying an older value are dead. */
    token_version: integer('token_version').notNull().default(0),
  },
  // Emails compare case-insensitively: one account per address however it is typed.
  (t) => [uniqueIndex('ix_users_email_lower').on(sql`lower(${t.email})`)],
);

export type User = typeof users.$inferSelect;
export type NewUser = typeof users.$inferInsert;
