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

export async function getByName(db: Db, name: string): Promise<ProviderRow | undefined> {
  const [row] = await db.select().from(providers).where(eq(providers.name, name));
  return row;
}
