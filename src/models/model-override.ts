import { boolean, integer, jsonb, pgTable, text } from 'drizzle-orm/pg-core';

import type { Capability, ModelPricing } from '../modules/ai-models/types.js';
import { baseColumns } from './columns.js';

/**
 * A superuser's change to the model catalog: for a built-in `model_id`, the fields to override
 * (null = keep the catalog's value) or `deleted` to hide it; for any other id, a whole custom
 * model (its `provider` and `pricing` are then set). Prices are decimal strings in jsonb.
 */
export const modelOverrides = pgTable('model_overrides', {
  ...baseColumns,
  model_id: text('model_id').notNull().unique(),
  name: text('name'),
  provider: text('provider'),
  aliases: text('aliases').array(),
  context_window: integer('context_window'),
  max_output_tokens: integer('max_output_tokens'),
  capabilities: text('capabilities').array().$type<Capability[]>(),
  pricing: jsonb('pricing').$type<ModelPricing>(),
  enabled: boolean('enabled'),
  recommended: boolean('recommended'),
  priority: integer('priority'),
  fallbacks: text('fallbacks').array(),
  deleted: boolean('deleted').notNull().default(false),
});

export type ModelOverrideRow = typeof modelOverrides.$inferSelect;
export type NewModelOverrideRow = typeof modelOverrides.$inferInsert;
