import { and, eq, sql } from 'drizzle-orm';

import { afterCommit, type Database, type Db, rootOf } from '../core/db.js';
import { constraintAnswers } from '../core/error-mapping.js';
import { RowCache } from '../core/row-cache.js';

import { type ApiKey, apiKeys, type NewApiKey } from '../models/index.js';

import { definePolicy } from '../utils/access.js';
import { ownedCrud } from './owned.js';
import { preparedPerDb } from './prepared.js';

/**
 * Keys: their owner's, or any superuser's (SPEC §2), who may revoke a leaked one (the secret is a
 * hash: never shown again). An account resource: scoped keys get 403.
 */
export const apiKeyPolicy = definePolicy<ApiKey>({
  noun: 'API key',
  owner: apiKeys.owner_id,
  project: apiKeys.project_id,
  scopedKey: 'none',
  superuserSeesAll: true,
});

const baseCrud = ownedCrud<ApiKey, NewApiKey>(apiKeys, apiKeyPolicy);

/** The owned-resource crud, with every change forgetting the cached keys (see cacheApiKeys). */
export const apiKeyCrud: typeof baseCrud = {
  ...baseCrud,
  update: async (db, principal, id, values) => {
    const key = await baseCrud.update(db, principal, id, values);
    forgetApiKeys(db);
    return key;
  },
  remove: async (db, principal, id) => {
    await baseCrud.remove(db, principal, id);
    forgetApiKeys(db);
  },
};

// The project was deleted between the check and the insert: as if it had been missing all along.
constraintAnswers({ api_keys_project_id_projects_id_fk: { status: 404, detail: 'Project not found' } });

/** A key that still works: not revoked and not expired (what stats call active and the limit counts). */
export const activeKey = sql`${apiKeys.status} = 'active' and (${apiKeys.expires_at} is null or ${apiKeys.expires_at} > now())`;

/** The owner's keys that count toward MAX_API_KEYS_PER_USER: revoked and expired ones do not. */
export function countActiveByOwner(db: Db, ownerId: string): Promise<number> {
  return apiKeyCrud.countOwnedBy(db, ownerId, activeKey);
}

/**
 * The owner's key rows, revoked and expired ones included, counted up to `upTo`: what
 * MAX_API_KEYS_KEPT_PER_USER bounds (otherwise creating and revoking keys would add rows without end).
 */
export function countKeptByOwner(db: Db, ownerId: string, upTo: number): Promise<number> {
  return apiKeyCrud.countOwnedBy(db, ownerId, undefined, upTo);
}

/** Records use at most once a minute per key, so authentication rarely writes. */
export async function touchLastUsed(db: Db, key: Pick<ApiKey, 'id' | 'key_hash'>): Promise<void> {
  await db
    .update(apiKeys)
    .set({ last_used_at: sql`now()`, updated_at: sql`${apiKeys.updated_at}` })
    .where(and(eq(apiKeys.id, key.id), sql`(${apiKeys.last_used_at} is null or ${apiKeys.last_used_at} < now() - interval '1 minute')`));
  keyCaches.get(rootOf(db))?.evict(key.key_hash);
}

// ==================== Cache of keys by hash ====================

/** The channel the api_keys trigger (migration 0005) notifies with the hash of a changed or deleted key. */
export const API_KEY_CHANGED_CHANNEL = 'keel_api_key_changed';
const keyCaches = new WeakMap<Db, RowCache<ApiKey>>();

const byHash = preparedPerDb('api_key_by_hash', (db, name) =>
  db
    .select()
    .from(apiKeys)
    .where(eq(apiKeys.key_hash, sql.placeholder('hash')))
    .prepare(name),
);

/**
 * Keeps keys read by hash (every API-key request) in memory, exact as the user cache is: the
 * trigger's notifications evict other nodes' writes (a cascade from a deleted project or user
 * included), this process forgets on its own writes (after commit too), and while the
 * notification connection is down the cache is off. The owner is read through the user cache.
 */
export async function cacheApiKeys(database: Database): Promise<void> {
  if (keyCaches.has(database.db)) return;
  const cache = new RowCache<ApiKey>({ ttlMs: 30_000, maxEntries: 10_000, enabled: false });
  keyCaches.set(database.db, cache);
  await database.listen(API_KEY_CHANGED_CHANNEL, {
    message: (hash) => cache.evict(hash),
    status: (reliable) => cache.setEnabled(reliable),
  });
}

/** The key with this hash, through the cache when this database has one. The row is frozen: it is shared. */
export async function getByHashCached(db: Db, hash: string): Promise<ApiKey | undefined> {
  const read = async () => {
    const [key] = await byHash(db).execute({ hash });
    return key && Object.freeze(key);
  };
  const cache = keyCaches.get(db);
  return cache ? cache.load(hash, read) : read();
}

/**
 * Forgets every cached key, now and at commit: after a write here that changes or deletes keys
 * (embedded, nothing else tells the cache; deleting a project deletes its keys).
 */
export function forgetApiKeys(db: Db): void {
  const cache = keyCaches.get(rootOf(db));
  if (!cache) return;
  const clear = () => cache.setEnabled(cache.isEnabled);
  clear();
  afterCommit(db, clear);
}
