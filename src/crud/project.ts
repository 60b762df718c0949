import { and, count, desc, eq, sql } from 'drizzle-orm';

import type { Db } from '../core/db.js';

import { apiKeys, type NewProject, type Project, projects } from '../models/index.js';

import type { Pagination } from '../schemas/common.js';

import { batchedById } from './batch.js';
import { preparedPerDb } from './prepared.js';

const byIds = preparedPerDb((db) =>
  db
    .select()
    .from(projects)
    .where(sql`${projects.id} = any(${sql.placeholder('ids')})`)
    .prepare('projects_by_ids'),
);

/** The hot read of every project route: concurrent lookups share one query (see batch.ts). */
export const getById = batchedById<Project>((db, ids) => byIds(db).execute({ ids }));

/** Lists projects; `ownerId` null means every owner's (superusers), `onlyId` narrows to one (scoped keys). */
export async function list(
  db: Db,
  filter: { ownerId: string | null; onlyId: string | null },
  page: Pagination,
): Promise<{ data: Project[]; count: number }> {
  const where = and(
    filter.ownerId === null ? undefined : eq(projects.owner_id, filter.ownerId),
    filter.onlyId === null ? undefined : eq(projects.id, filter.onlyId),
  );
  const [data, [total]] = await Promise.all([
    db
      .select()
      .from(projects)
      .where(where)
      .orderBy(desc(projects.created_at), desc(projects.id))
      .limit(page.limit)
      .offset(page.offset),
    db.select({ value: count() }).from(projects).where(where),
  ]);
  return { data, count: total?.value ?? 0 };
}

export async function countByOwner(db: Db, ownerId: string): Promise<number> {
  const [row] = await db.select({ value: count() }).from(projects).where(eq(projects.owner_id, ownerId));
  return row?.value ?? 0;
}

export async function create(db: Db, values: NewProject): Promise<Project> {
  const [project] = await db.insert(projects).values(values).returning();
  return project!;
}

export async function update(db: Db, id: string, values: Partial<NewProject>): Promise<Project | undefined> {
  // An empty PATCH changes nothing (and Drizzle refuses an empty SET).
  if (Object.values(values).every((value) => value === undefined)) return getById(db, id);
  const [project] = await db.update(projects).set(values).where(eq(projects.id, id)).returning();
  return project;
}

export async function remove(db: Db, id: string): Promise<void> {
  await db.delete(projects).where(eq(projects.id, id));
}

export async function stats(db: Db, id: string): Promise<{ api_keys: number; active_api_keys: number }> {
  const [row] = await db
    .select({
      api_keys: count(),
      active_api_keys: sql<number>`count(*) filter (where ${apiKeys.status} = 'active')`.mapWith(Number),
    })
    .from(apiKeys)
    .where(eq(apiKeys.project_id, id));
  return { api_keys: row?.api_keys ?? 0, active_api_keys: row?.active_api_keys ?? 0 };
}
