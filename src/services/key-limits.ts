/**
 * The limits of an API key (`max_budget`, `rpm`) as the model meter enforces them. A request's
 * calls carry them from authentication (read through the exact API-key cache, so a change shows at
 * once on every node); a call without them (no request behind it) reads the row.
 */
import { eq } from 'drizzle-orm';

import type { Db } from '../core/db.js';

import { apiKeys } from '../models/index.js';

export interface KeyLimits {
  max_budget: string | null;
  rpm: number | null;
}

/** Reads the key's limits (a deleted key has none). */
export async function loadKeyLimits(db: Db, id: string): Promise<KeyLimits> {
  const [row] = await db.select({ max_budget: apiKeys.max_budget, rpm: apiKeys.rpm }).from(apiKeys).where(eq(apiKeys.id, id));
  return row ?? { max_budget: null, rpm: null };
}
