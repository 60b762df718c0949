import type { Settings } from '../core/config.js';
import { type Db, transaction } from '../core/db.js';
import { BadRequestError, ConflictError } from '../core/errors.js';
import type { Logger } from '../core/logger.js';
import { generateApiKey } from '../core/security.js';

import type { ApiKey } from '../models/index.js';

import type { ApiKeyCreate, ApiKeyUpdate } from '../schemas/api-key.js';
import type { Pagination } from '../schemas/common.js';

import * as apiKeyCrud from '../crud/api-key.js';
import * as userCrud from '../crud/user.js';
import { forbidScopedKey,type Principal } from '../utils/authentication.js';
import { ensureVisible } from '../utils/ownership.js';
import * as projectService from './project-service.js';

const keyScope = (key: ApiKey) => ({ ownerId: key.owner_id, projectId: key.project_id });

/** Keys are personal: even a superuser sees only their own, so nobody can act as another user. */
function ownKeysOnly(principal: Principal): Principal {
  return { ...principal, user: { ...principal.user, is_superuser: false } };
}

export async function getVisible(db: Db, principal: Principal, id: string): Promise<ApiKey> {
  return ensureVisible(ownKeysOnly(principal), await apiKeyCrud.getById(db, id), keyScope, 'API key');
}

export async function list(db: Db, principal: Principal, page: Pagination) {
  return apiKeyCrud.list(db, { ownerId: principal.user.id, projectId: principal.projectScope }, page);
}

export async function create(
  db: Db,
  settings: Settings,
  logger: Logger,
  principal: Principal,
  input: ApiKeyCreate,
): Promise<ApiKey & { key: string }> {
  forbidScopedKey(principal);
  const ownerId = principal.user.id;
  if (input.project_id) await projectService.getVisible(db, ownKeysOnly(principal), input.project_id);
  if (input.expires_at && input.expires_at.getTime() <= Date.now()) {
    throw new BadRequestError('expires_at must be in the future');
  }
  const secret = generateApiKey();
  const created = await transaction(db, async (tx) => {
    await userCrud.lockForUpdate(tx, ownerId);
    if ((await apiKeyCrud.countByOwner(tx, ownerId)) >= settings.MAX_API_KEYS_PER_USER) {
      throw new ConflictError(`API key limit reached (${settings.MAX_API_KEYS_PER_USER} per user)`);
    }
    return apiKeyCrud.create(tx, {
      owner_id: ownerId,
      project_id: input.project_id ?? null,
      name: input.name,
      expires_at: input.expires_at ?? null,
      prefix: secret.prefix,
      key_hash: secret.hash,
    });
  });
  logger.info({ apiKeyId: created.id, projectId: created.project_id }, 'api key created');
  return { ...created, key: secret.key };
}

export async function update(db: Db, principal: Principal, id: string, input: ApiKeyUpdate): Promise<ApiKey> {
  forbidScopedKey(principal);
  const key = await getVisible(db, principal, id);
  return (await apiKeyCrud.update(db, key.id, input)) ?? key;
}

export async function remove(db: Db, principal: Principal, id: string): Promise<void> {
  forbidScopedKey(principal);
  const key = await getVisible(db, principal, id);
  await apiKeyCrud.remove(db, key.id);
}
