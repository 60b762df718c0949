import { and, count, desc, eq, sql } from 'drizzle-orm';

import type { Db } from '../core/db.js';

import { type ApiKey, apiKeys, type NewApiKey, type User, users } from '../models/index.js';

import type { Pagination } from '../schemas/common.js';

import { preparedPerDb } from './prepared.js';

/** The key and its owner in one round trip: API-key authentication needs both. */
const withOwnerByHash = preparedPerDb((db) =>
  db
    .select({ key: apiKeys, owner: users })
    .from(apiKeys)
    .innerJoin(users, eq(users.id, apiKeys.owner_id))
    .where(eq(apiKeys.key_hash, sql.placeholder('hash')))
    .prepare('api_key_with_owner_by_hash'),
);

export async function getWithOwnerByHash(db: Db, hash: string): Promise<{ key: ApiKey; owner: User } | undefined> {
  const [row] = await withOwnerByHash(db).execute({ hash });
  return row;
}

export async function getById(db: Db, id: string): Promise<ApiKey | undefined> {
  const [key] = await db.select().from(apiKeys).where(eq(apiKeys.id, id));
  return key;
}

export async function list(
  db: Db,
  filter: { ownerId: string; projectId: string | null },
  page: Pagination,
): Promise<{ data: ApiKey[]; count: number }> {
  const where = and(
    eq(apiKeys.owner_id, filter.ownerId),
    filter.projectId === null ? undefined : eq(apiKeys.project_id, filter.projectId),
  );
  const [data, [total]] = await Promise.all([
    db
      .select()
      .from(apiKeys)
      .where(where)
      .orderBy(desc(apiKeys.created_at), desc(apiKeys.id))
      .limit(page.limit)
      .offset(page.offset),
    db.select({ value: count() }).from(apiKeys).where(where),
  ]);
  return { data, count: total?.value ?? 0 };
}

export async function countByOwner(db: Db, ownerId: string): Promise<number> {
  const [row] = await db.select({ value: count() }).from(apiKeys).where(eq(apiKeys.owner_id, ownerId));
  return row?.value ?? 0;
}

export async function create(db: Db, values: NewApiKey): Promise<ApiKey> {
  const [key] = await db.insert(apiKeys).values(values).returning();
  return key!;
}

export async function update(db: Db, id: string, values: Partial<NewApiKey>): Promise<ApiKey | undefined> {
  // An empty PATCH changes nothing (and Drizzle refuses an empty SET).
  if (Object.values(values).every((value) => value === undefined)) return getById(db, id);
  const [key] = await db.update(apiKeys).set(values).where(eq(apiKeys.id, id)).returning();
  return key;
}

/** Records use at most once a minute per key, so authentication rarely writes. */
export async function touchLastUsed(db: Db, id: string): Promise<void> {
  await db
    .update(apiKeys)
    .set({ last_used_at: sql`now()`, updated_at: sql`${apiKeys.updated_at}` })
    .where(and(eq(apiKeys.id, id), sql`(${apiKeys.last_used_at} is null or ${apiKeys.last_used_at} < now() - interval '1 minute')`));
}

export async function remove(db: Db, id: string): Promise<void> {
  await db.delete(apiKeys).where(eq(apiKeys.id, id));
}
