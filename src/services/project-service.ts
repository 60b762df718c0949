import { type Db, deadlockRetried } from '../core/db.js';
import { ConflictError } from '../core/errors.js';

import type { Project } from '../models/index.js';

import type { ProjectCreate, ProjectUpdate } from '../schemas/project.js';

import { forgetDeletedKnowledge } from '../crud/agent.js';
import { forgetApiKeys } from '../crud/api-key.js';
import { lockBillingRows } from '../crud/billing.js';
import type { Page } from '../crud/page.js';
import { projectCrud, projectPolicy, requireOwnProject, stats as projectStats } from '../crud/project.js';
import { lockOwnerCountingBusy } from '../crud/thread.js';
import type { AccessPolicy } from '../utils/access.js';
import type { ServiceContext } from './context.js';
import { createWithinLimit } from './limits.js';

export function get(ctx: ServiceContext, id: string): Promise<Project> {
  return projectCrud.getVisible(ctx.db, ctx.principal, id);
}

export function list(ctx: ServiceContext, page: Page) {
  return projectCrud.list(ctx.db, ctx.principal, page);
}

export async function create(ctx: ServiceContext, input: ProjectCreate): Promise<Project> {
  projectPolicy.checkCreate(ctx.principal, null);
  const ownerId = ctx.principal.user.id;
  const limit = { what: 'Project', max: ctx.settings.MAX_PROJECTS_PER_USER, count: (tx: Db) => projectCrud.countOwnedBy(tx, ownerId) };
  return createWithinLimit(ctx.db, ownerId, limit, (tx) => projectCrud.create(tx, { ...input, owner_id: ownerId }));
}

export function update(ctx: ServiceContext, id: string, input: ProjectUpdate): Promise<Project> {
  return projectCrud.update(ctx.db, ctx.principal, id, input);
}

/**
 * Deleting a project deletes its threads and the keys scoped to it (cascade): the key cache forgets
 * them. Not while a run works on one of its threads (409), as for a thread: the run would go on
 * with its rows gone, and its readers wait for an end that never came.
 */
export async function remove(ctx: ServiceContext, id: string): Promise<void> {
  await deadlockRetried(ctx.db, async (tx) => {
    const project = await projectCrud.getVisible(tx, ctx.principal, id, 'write');
    // Its keys' billing rows before the owner's users row (see lockBillingRows): the cascade deletes the keys.
    await lockBillingRows(tx, { projectId: id });
    const busy = await lockOwnerCountingBusy(tx, project.owner_id, id);
    if (busy) throw new ConflictError(`Project has runs in progress on ${busy === 1 ? 'one of its threads' : `${busy} of its threads`}: cancel them or wait for them to end, then delete it`);
    await projectCrud.remove(tx, ctx.principal, id);
    // Its folders and entries went with it: the owner's other agents no longer name them.
    await forgetDeletedKnowledge(tx, project.owner_id);
  });
  forgetApiKeys(ctx.db);
}

export async function stats(ctx: ServiceContext, id: string) {
  const project = await get(ctx, id);
  return { project_id: project.id, ...(await projectStats(ctx.db, project.id)) };
}

/**
 * The project a row of `ownerId` goes into (creation) or moves to (a change naming `project_id`):
 * left out at creation, a scoped key's own; checked against the key's project (403) and the
 * owner's projects (404 for another user's, as for a missing one).
 */
export async function placeInProject<Row>(ctx: ServiceContext, policy: AccessPolicy<Row>, ownerId: string, requested: string | null | undefined): Promise<string | null> {
  const projectId = policy.projectForCreate(ctx.principal, requested);
  if (projectId !== null) await requireOwnProject(ctx.db, ownerId, projectId);
  return projectId;
}
