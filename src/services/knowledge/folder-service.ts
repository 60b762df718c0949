import { type Db, transaction } from '../../core/db.js';

import { type KnowledgeFolder, knowledgeFolders } from '../../models/index.js';

import type { KnowledgeFolderCreate, KnowledgeFolderListQuery, KnowledgeFolderUpdate } from '../../schemas/knowledge.js';

import { forgetDeletedKnowledge } from '../../crud/agent.js';
import { entryKeysIn, folderCrud, folderNames, folderPolicy, setEntriesProject, writeUniquelyNamed } from '../../crud/knowledge.js';
import { matching } from '../../crud/owned.js';
import type { ServiceContext } from '../context.js';
import { createWithinLimit } from '../limits.js';
import { placeInProject } from '../project-service.js';
import { PURGE_BATCH, purgeFilesOf } from './files.js';

export function get(ctx: ServiceContext, id: string): Promise<KnowledgeFolder> {
  return folderCrud.getVisible(ctx.db, ctx.principal, id);
}

export function list(ctx: ServiceContext, query: KnowledgeFolderListQuery) {
  return folderCrud.list(ctx.db, ctx.principal, query, matching({ project_id: knowledgeFolders.project_id }, query));
}

/**
 * A name another of the owner's folders has gets a number: `Docs (1)`. Up to
 * MAX_KNOWLEDGE_FOLDERS_PER_USER folders (409 beyond), counted under the owner's lock in the
 * transaction that inserts (a name clash retried takes the lock again).
 */
export async function create(ctx: ServiceContext, input: KnowledgeFolderCreate): Promise<KnowledgeFolder> {
  const ownerId = ctx.principal.user.id;
  const projectId = await placeInProject(ctx, folderPolicy, ownerId, input.project_id);
  const limit = { what: 'Knowledge folder', max: ctx.settings.MAX_KNOWLEDGE_FOLDERS_PER_USER, count: (tx: Db) => folderCrud.countOwnedBy(tx, ownerId) };
  return writeUniquelyNamed(ctx.db, folderNames(ownerId), input.name, (tx, name) =>
    createWithinLimit(tx, ownerId, limit, (locked) => folderCrud.create(locked, { ...input, name, project_id: projectId, owner_id: ownerId })),
  );
}

/** Name, description and project; the folder's entries move into the project with it. */
export async function update(ctx: ServiceContext, id: string, input: KnowledgeFolderUpdate): Promise<KnowledgeFolder> {
  const { principal } = ctx;
  const folder = await folderCrud.getVisible(ctx.db, principal, id, 'write');
  const projectId = input.project_id === undefined ? undefined : await placeInProject(ctx, folderPolicy, folder.owner_id, input.project_id);
  const change = { ...input, project_id: projectId };
  return writeUniquelyNamed(
    ctx.db,
    folderNames(folder.owner_id),
    input.name ?? folder.name,
    async (tx, name) => {
      const updated = await folderCrud.update(tx, principal, id, input.name === undefined ? change : { ...change, name });
      if (projectId !== undefined) await setEntriesProject(tx, id, projectId);
      return updated;
    },
    id,
  );
}

/**
 * The folder, its entries and their index, and their ids in the owner's agents' knowledge; then their stored files, up to PURGE_BATCH of them
 * (the sweeper deletes a larger folder's other files).
 */
export async function remove(ctx: ServiceContext, id: string): Promise<void> {
  const { owner_id: ownerId } = await folderCrud.getVisible(ctx.db, ctx.principal, id, 'write');
  // Read before: the cascade leaves no way to tell which entries it took.
  const keys = await entryKeysIn(ctx.db, id, PURGE_BATCH);
  await transaction(ctx.db, async (tx) => {
    await folderCrud.remove(tx, ctx.principal, id);
    await forgetDeletedKnowledge(tx, ownerId);
  });
  await purgeFilesOf(ctx, keys);
}
