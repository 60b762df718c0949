import { and, eq, sql } from 'drizzle-orm';

import type { Db } from '../core/db.js';
import { constraintAnswers } from '../core/error-mapping.js';

import { type ApiKey, apiKeys, type NewApiKey, type User, users } from '../models/index.js';

import { definePolicy } from '../utils/access.js';
import { ownedCrud } from './owned.js';
import { preparedPerDb } from './prepared.js';

/** Keys are personal (a superuser sees only their own) and an account resource: scoped keys get 403. */
export const apiKeyPolicy = definePolicy<ApiKey>({
  noun: 'API key',
  owner: apiKeys.owner_id,
  project: apiKeys.project_id,
  scopedKey: 'none',
  superuserSeesAll: false,
});

export const apiKeyCrud = ownedCrud<ApiKey, NewApiKey>(apiKeys, apiKeyPolicy);

// The project was deleted between the check and the insert: as if it had been missing all along.
constraintAnswers({ api_keys_project_id_projects_id_fk: { status: 404, detail: 'Project not found' } });

/** A key that still works: not revoked and not expired (what stats call active and the limit counts). */
export const activeKey = sql`${apiKeys.status} = 'active' and (${apiKeys.expires_at} is null or ${apiKeys.expires_at} > now())`;

/** The key and its owner in one round trip: API-key authentication needs both. */
const withOwnerByHash = preparedPerDb('api_key_with_owner_by_hash', (db, name) =>
  db
    .select({ key: apiKeys, owner: users })
    .from(apiKeys)
    .innerJoin(users, eq(users.id, apiKeys.owner_id))
    .where(eq(apiKeys.key_hash, sql.placeholder('hash')))
    .prepare(name),
);

export async function getWithOwnerByHash(db: Db, hash: string): Promise<{ key: ApiKey; owner: User } | undefined> {
  const [row] = await withOwnerByHash(db).execute({ hash });
  return row;
}

/** The owner's keys that count toward MAX_API_KEYS_PER_USER: revoked and expired ones do not. */
export function countActiveByOwner(db: Db, ownerId: string): Promise<number> {
  return apiKeyCrud.countOwnedBy(db, ownerId, activeKey);
}

/** Records use at most once a minute per key, so authentication rarely writes. */
export async function touchLastUsed(db: Db, id: string): Promise<void> {
  await db
    .update(apiKeys)
    .set({ last_used_at: sql`now()`, updated_at: sql`${apiKeys.updated_at}` })
    .where(and(eq(apiKeys.id, id), sql`(${apiKeys.last_used_at} is null or ${apiKeys.last_used_at} < now() - interval '1 minute')`));
}
