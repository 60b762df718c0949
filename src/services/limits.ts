import { type Db, transaction } from '../core/db.js';
import { ConflictError } from '../core/errors.js';

import * as userCrud from '../crud/user.js';

export interface PerUserLimit {
  /** What is counted, for the message: `Project` → "Project limit reached (100 per user)". */
  what: string;
  max: number;
  /** How many the user has now (inside the transaction, after the lock). */
  count: (tx: Db) => Promise<number>;
  /** The 409's detail, when the default ("<what> limit reached (<max> per user)") does not say what to do. */
  detail?: string;
}

/**
 * Creates under per-user limits: lock the user's row, count, refuse with 409 at a limit, insert.
 * The lock (NO KEY UPDATE: crud/user.ts) serializes concurrent creations of one user, so count-then-insert
 * cannot overshoot; the user's model calls are held and settled meanwhile.
 */
export async function createWithinLimit<T>(db: Db, userId: string, limits: PerUserLimit | PerUserLimit[], insert: (tx: Db) => Promise<T>): Promise<T> {
  return transaction(db, async (tx) => {
    await userCrud.lockUser(tx, userId);
    for (const limit of Array.isArray(limits) ? limits : [limits]) {
      if ((await limit.count(tx)) >= limit.max) throw new ConflictError(limit.detail ?? `${limit.what} limit reached (${limit.max} per user)`);
    }
    return insert(tx);
  });
}
