import { boolean, index, pgTable, text, uuid, varchar } from 'drizzle-orm/pg-core';

import type { ProviderKind } from '../modules/ai-models/types.js';
import { baseColumns } from './columns.js';
import { users } from './user.js';

/**
 * A model provider managed by superusers. `name` is the provider id models refer to (`ollama`; a
 * built-in name such as `openai` replaces the environment's settings). The API key and headers
 * are sealed (AES-256-GCM, key derived from SECRET_KEY) and never leave the server.
 */
export const providers = pgTable(
  'providers',
  {
  ...baseColumns,
  /** The superuser who created it (kept for the record; the row outlives the account). */
  owner_id: uuid('owner_id').references(() => users.id, { onDelete: 'set null' }),
  name: varchar('name', { length: 64 }).notNull().unique(),
  kind: text('kind').$type<ProviderKind>().notNull(),
  base_url: text('base_url'),
  api_key_sealed: text('api_key_sealed'),
  headers_sealed: text('headers_sealed'),
  enabled: boolean('enabled').notNull().default(true),
  },
  (t) => [index('ix_providers_owner_id').on(t.owner_id)],
);

export type ProviderRow = typeof providers.$inferSelect;
export type NewProviderRow = typeof providers.$inferInsert;
