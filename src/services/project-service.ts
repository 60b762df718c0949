import type { Settings } from '../core/config.js';
import { type Db, transaction } from '../core/db.js';
import { ConflictError } from '../core/errors.js';

import type { Project } from '../models/index.js';

import type { Pagination } from '../schemas/common.js';
import type { ProjectCreate, ProjectUpdate } from '../schemas/project.js';

import * as projectCrud from '../crud/project.js';
import * as userCrud from '../crud/user.js';
import { forbidScopedKey,type Principal } from '../utils/authentication.js';
import { ensureVisible } from '../utils/ownership.js';

const projectScope = (project: Project) => ({ ownerId: project.owner_id, projectId: project.id });

/** The project, if the caller may see it; otherwise 404, as if it did not exist. */
export async function getVisible(db: Db, principal: Principal, id: string): Promise<Project> {
  return ensureVisible(principal, await projectCrud.getById(db, id), projectScope, 'Project');
}

export async function list(db: Db, principal: Principal, page: Pagination) {
  const { user, projectScope: onlyId } = principal;
  return projectCrud.list(db, { ownerId: user.is_superuser ? null : user.id, onlyId }, page);
}

export async function create(db: Db, settings: Settings, principal: Principal, input: ProjectCreate): Promise<Project> {
  forbidScopedKey(principal);
  const ownerId = principal.user.id;
  return transaction(db, async (tx) => {
    // The lock makes count-then-insert safe against concurrent creations.
    await userCrud.lockForUpdate(tx, ownerId);
    if ((await projectCrud.countByOwner(tx, ownerId)) >= settings.MAX_PROJECTS_PER_USER) {
      throw new ConflictError(`Project limit reached (${settings.MAX_PROJECTS_PER_USER} per user)`);
    }
    return projectCrud.create(tx, { ...input, owner_id: ownerId });
  });
}

export async function update(db: Db, principal: Principal, id: string, input: ProjectUpdate): Promise<Project> {
  const project = await getVisible(db, principal, id);
  return (await projectCrud.update(db, project.id, input)) ?? project;
}

export async function remove(db: Db, principal: Principal, id: string): Promise<void> {
  const project = await getVisible(db, principal, id);
  await projectCrud.remove(db, project.id);
}

export async function stats(db: Db, principal: Principal, id: string) {
  const project = await getVisible(db, principal, id);
  return { project_id: project.id, ...(await projectCrud.stats(db, project.id)) };
}
