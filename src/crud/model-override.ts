import { and, asc, eq, sql } from 'drizzle-orm';

import type { Db } from '../core/db.js';

import { type ModelOverrideRow, modelOverrides, type NewModelOverrideRow } from '../models/index.js';

import { isEmptyChange } from './owned.js';

/** The override fields of a row, without its key and bookkeeping columns. */
export type OverrideFields = Omit<NewModelOverrideRow, 'id' | 'created_at' | 'updated_at' | 'model_id'>;

/** What the catalog reads of a row: its model, whether it hides it, the fields it overrides. */
export type CatalogRow = Pick<ModelOverrideRow, 'model_id' | 'deleted'> & OverrideFields;

/** Every override field unset: a hidden built-in or a restored one starts from this. */
export const NO_OVERRIDE: Required<Omit<OverrideFields, 'deleted'>> = {
  name: null,
  provider: null,
  aliases: null,
  context_window: null,
  max_output_tokens: null,
  capabilities: null,
  pricing: null,
  enabled: null,
  recommended: null,
  priority: null,
  fallbacks: null,
};

/** Any constant works, as long as every Keel process uses the same one (migrations take 7_424_911_002). */
const CATALOG_WRITE_LOCK_KEY = 7_424_911_003;

/**
 * Inside a transaction: waits until no other transaction (on any node) holds the catalog's write
 * lock, then holds it until this one ends. A catalog write takes it before it reads the rows it
 * checks, so those are the rows it writes over: two writes never both pass checks that the other's
 * change would fail. Only catalog writes take it; reads and model calls never wait for it.
 */
export async function lockCatalogWrites(tx: Db): Promise<void> {
  await tx.execute(sql`select pg_advisory_xact_lock(${CATALOG_WRITE_LOCK_KEY}::bigint)`);
}

/**
 * Oldest first: of two models claiming one alias (rows written before aliases were checked), the
 * catalog gives it to the first, which must not change with the rows' physical order (an update
 * moves a row to the end).
 */
export function listAll(db: Db): Promise<ModelOverrideRow[]> {
  return db.select().from(modelOverrides).orderBy(asc(modelOverrides.created_at), asc(modelOverrides.model_id));
}

export async function getByModelId(db: Db, modelId: string): Promise<ModelOverrideRow | undefined> {
  const [row] = await db.select().from(modelOverrides).where(eq(modelOverrides.model_id, modelId));
  return row;
}

/**
 * Inserts the row of `modelId`, or changes the given fields of the one there (one statement). An
 * empty change (PATCH {}) writes nothing: Drizzle refuses an update without columns.
 */
export async function upsert(db: Db, modelId: string, fields: OverrideFields): Promise<void> {
  if (isEmptyChange(fields)) return;
  await db
    .insert(modelOverrides)
    .values({ ...fields, model_id: modelId })
    .onConflictDoUpdate({ target: modelOverrides.model_id, set: fields });
}

/** Inserts a new row; a row already there for `modelId` answers 409 (unique violation). */
export async function insert(db: Db, modelId: string, fields: OverrideFields): Promise<void> {
  await db.insert(modelOverrides).values({ ...fields, model_id: modelId });
}

export async function removeByModelId(db: Db, modelId: string): Promise<void> {
  await db.delete(modelOverrides).where(eq(modelOverrides.model_id, modelId));
}

/** The models (ids) whose row names `provider` as theirs: custom models, and built-in ones moved to it. */
export async function modelIdsOfProvider(db: Db, provider: string): Promise<string[]> {
  const rows = await db
    .select({ model_id: modelOverrides.model_id })
    .from(modelOverrides)
    .where(and(eq(modelOverrides.provider, provider), eq(modelOverrides.deleted, false)))
    .orderBy(asc(modelOverrides.model_id));
  return rows.map((row) => row.model_id);
}
