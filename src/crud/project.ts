import { eq, inArray, type SQL, sql } from 'drizzle-orm';
import type { AnyPgColumn, AnyPgTable } from 'drizzle-orm/pg-core';

import type { Db } from '../core/db.js';

import { ACTIVE_RUN_STATUSES, agents, apiKeys, knowledgeEntries, knowledgeFolders, type NewProject, type Project, projects, runs, threads } from '../models/index.js';

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

/** What a project holds, counted by `stats` (`api_keys` all of its keys, `active_api_keys` those that authenticate). */
export interface ProjectCounts {
  threads: number;
  agents: number;
  runs: number;
  active_runs: number;
  knowledge_folders: number;
  knowledge_entries: number;
  api_keys: number;
  active_api_keys: number;
}

/** Rows of `table` in the project, as a scalar subquery: every figure of the stats comes from one statement. */
function countInProject(table: AnyPgTable, projectColumn: AnyPgColumn, condition?: SQL) {
  const where = condition ? sql`${projectColumn} = ${projects.id} and ${condition}` : sql`${projectColumn} = ${projects.id}`;
  return sql<number>`(select count(*) from ${table} where ${where})`.mapWith(Number);
}

export async function stats(db: Db, id: string): Promise<ProjectCounts> {
  const [row] = await db
    .select({
      threads: countInProject(threads, threads.project_id),
      agents: countInProject(agents, agents.project_id),
      runs: countInProject(runs, runs.project_id),
      active_runs: countInProject(runs, runs.project_id, inArray(runs.status, [...ACTIVE_RUN_STATUSES])),
      knowledge_folders: countInProject(knowledgeFolders, knowledgeFolders.project_id),
      knowledge_entries: countInProject(knowledgeEntries, knowledgeEntries.project_id),
      api_keys: countInProject(apiKeys, apiKeys.project_id),
      active_api_keys: countInProject(apiKeys, apiKeys.project_id, activeKey),
    })
    .from(projects)
    .where(eq(projects.id, id));
  // Deleted since its caller read it: as missing as it is now.
  if (!row) throw projectPolicy.notFound();
  return row;
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
