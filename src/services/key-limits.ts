/**
 * The limits of API keys (`max_budget`, `rpm`) as the meter needs them on every call, without a
 * query: each authentication through a key refreshes its entry (it has just read the row), and an
 * entry older than KEY_LIMITS_TTL_MS is read again (a change made on another node shows within it).
 */
import { eq } from 'drizzle-orm';

import type { Db } from '../core/db.js';

import { apiKeys } from '../models/index.js';

export interface KeyLimits {
  max_budget: string | null;
  rpm: number | null;
}

export const KEY_LIMITS_TTL_MS = 10_000;
const MAX_ENTRIES = 100_000;

interface Entry extends KeyLimits {
  at: number;
}

const caches = new WeakMap<Db, Map<string, Entry>>();

function cacheOf(db: Db): Map<string, Entry> {
  let cache = caches.get(db);
  if (!cache) {
    cache = new Map();
    caches.set(db, cache);
  }
  return cache;
}

/** Records a key's limits as just read (authentication, an update through the API). */
export function rememberKeyLimits(db: Db, key: { id: string; max_budget: string | null; rpm: number | null }): void {
  const cache = cacheOf(db);
  if (cache.size >= MAX_ENTRIES && !cache.has(key.id)) cache.delete(cache.keys().next().value as string);
  cache.set(key.id, { max_budget: key.max_budget, rpm: key.rpm, at: Date.now() });
}

export function forgetKeyLimits(db: Db, id: string): void {
  cacheOf(db).delete(id);
}

/** The cached limits when fresh (no I/O), else undefined: call `loadKeyLimits`. */
export function cachedKeyLimits(db: Db, id: string): KeyLimits | undefined {
  const entry = cacheOf(db).get(id);
  return entry && Date.now() - entry.at < KEY_LIMITS_TTL_MS ? entry : undefined;
}

/** Reads the key's limits (a deleted key has none) and caches them. */
export async function loadKeyLimits(db: Db, id: string): Promise<KeyLimits> {
  const [row] = await db.select({ id: apiKeys.id, max_budget: apiKeys.max_budget, rpm: apiKeys.rpm }).from(apiKeys).where(eq(apiKeys.id, id));
  const limits = row ?? { id, max_budget: null, rpm: null };
  rememberKeyLimits(db, limits);
  return limits;
}
