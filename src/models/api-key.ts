import { index, integer, numeric, pgEnum, pgTable, timestamp, uniqueIndex, uuid, varchar } from 'drizzle-orm/pg-core';

import { baseColumns } from './columns.js';
import { projects } from './project.js';
import { users } from './user.js';

export const apiKeyStatus = pgEnum('api_key_status', ['active', 'revoked']);

export const apiKeys = pgTable(
  'api_keys',
  {
    ...baseColumns,
    owner_id: uuid('owner_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    project_id: uuid('project_id').references(() => projects.id, { onDelete: 'cascade' }),
    name: varchar('name', { length: 255 }).notNull(),
    /** The key's first characters, shown so a user can tell keys apart; not a secret. */
    prefix: varchar('prefix', { length: 32 }).notNull(),
    /** SHA-256 of the whole key: keys carry 256 random bits, so a slow hash adds nothing. */
    key_hash: varchar('key_hash', { length: 64 }).notNull(),
    status: apiKeyStatus('status').notNull().default('active'),
    expires_at: timestamp('expires_at', { withTimezone: true }),
    last_used_at: timestamp('last_used_at', { withTimezone: true }),
    /** Spend cap in credits (null: none); `spent` counts every metered call's cost through the key, `budget_reserved` what running calls hold. */
    max_budget: numeric('max_budget', { precision: 30, scale: 12 }),
    spent: numeric('spent', { precision: 30, scale: 12 }).notNull().default('0'),
    budget_reserved: numeric('budget_reserved', { precision: 30, scale: 12 }).notNull().default('0'),
    /** Model calls per minute (null: no limit). */
    rpm: integer('rpm'),
  },
  (t) => [
    uniqueIndex('ix_api_keys_key_hash').on(t.key_hash),
    index('ix_api_keys_owner_id_created_at').on(t.owner_id, t.created_at),
    index('ix_api_keys_project_id').on(t.project_id),
  ],
);

export type ApiKey = typeof apiKeys.$inferSelect;
export type NewApiKey = typeof apiKeys.$inferInsert;
