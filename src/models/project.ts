import { index, pgTable, text, uuid, varchar } from 'drizzle-orm/pg-core';

import { baseColumns } from './columns.js';
import { users } from './user.js';

export const projects = pgTable(
  'projects',
  {
    ...baseColumns,
    owner_id: uuid('owner_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    name: varchar('name', { length: 255 }).notNull(),
    description: text('description'),
  },
  (t) => [index('ix_projects_owner_id_created_at').on(t.owner_id, t.created_at)],
);

export type Project = typeof projects.$inferSelect;
export type NewProject = typeof projects.$inferInsert;
