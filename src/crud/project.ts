import { count, eq, sql } from 'drizzle-orm';

import type { Db } from '../core/db.js';

import { apiKeys, type NewProject, type Project, projects } from '../models/index.js';

import { definePolicy } from '../utils/access.js';
import { activeKey } from './api-key.js';
import { ownedCrud } from './owned.js';

/** A project: its owner's (or any superuser's); a key scoped to it reads it but may not rename or delete it. */
export const projectPolicy = definePolicy<Project>({
  noun: 'Project',
  owner: projects.owner_id,
  project: projects.id,
  scopedKey: 'read',
  superuserSeesAll: true,
});

export const projectCrud = ownedCrud<Project, NewProject>(projects, projectPolicy);

/** Batched by id (see batch.ts): the hot read of every project route. */
export const getById = projectCrud.getById;

/** Plain insert, for seeding (the API creates through the service, under the per-user limit). */
export const create = projectCrud.create;

export async function stats(db: Db, id: string): Promise<{ api_keys: number; active_api_keys: number }> {
  const [row] = await db
    .select({
      api_keys: count(),
      active_api_keys: sql<number>`count(*) filter (where ${activeKey})`.mapWith(Number),
    })
    .from(apiKeys)
    .where(eq(apiKeys.project_id, id));
  return { api_keys: row?.api_keys ?? 0, active_api_keys: row?.active_api_keys ?? 0 };
}

/**
 * The caller's own project, for a row that goes into it (a key, an agent, a thread): another
 * user's project answers 404, as a missing one does — even to a superuser, whose rows stay theirs.
 */
export async function requireOwnProject(db: Db, ownerId: string, projectId: string): Promise<Project> {
  const project = await projectCrud.getById(db, projectId);
  if (!project || project.owner_id !== ownerId) throw projectPolicy.notFound();
  return project;
}
