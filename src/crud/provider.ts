import { eq } from 'drizzle-orm';

import type { Db } from '../core/db.js';

import { type NewProviderRow, type ProviderRow, providers } from '../models/index.js';

import { definePolicy } from '../utils/access.js';
import { ownedCrud } from './owned.js';

/**
 * Provider records are administration: the routes admit superusers only (who see every record);
 * a project-scoped key is refused. `owner_id` records who created one.
 */
export const providerPolicy = definePolicy<ProviderRow>({
  noun: 'Provider',
  owner: providers.owner_id,
  project: null,
  scopedKey: 'none',
  superuserSeesAll: true,
});

export const providerCrud = ownedCrud<ProviderRow, NewProviderRow>(providers, providerPolicy);

export function listAll(db: Db): Promise<ProviderRow[]> {
  return db.select().from(providers);
}

/**
 * A provider record by name, its row locked until the transaction ends: shared by a model write
 * that names it (so its delete waits for that model, then sees it), for update by its delete (so
 * such a write waits, then finds it gone). Undefined when there is none.
 */
export async function lockByName(tx: Db, name: string, strength: 'share' | 'update'): Promise<ProviderRow | undefined> {
  const [row] = await tx.select().from(providers).where(eq(providers.name, name)).for(strength);
  return row;
}
