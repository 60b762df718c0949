import { and, count, desc, eq, inArray, sql, type SQLWrapper } from 'drizzle-orm';

import { afterCommit, type Database, type Db, rootOf } from '../core/db.js';
import { constraintAnswers } from '../core/error-mapping.js';
import { RowCache } from '../core/row-cache.js';

import { type NewUser, type User, users } from '../models/index.js';

import { isEmptyChange } from './owned.js';
import type { Page, PageOf } from './page.js';
import { preparedAnywhere, preparedPerDb } from './prepared.js';

const byId = preparedPerDb('user_by_id', (db, name) =>
  db
    .select()
    .from(users)
    .where(eq(users.id, sql.placeholder('id')))
    .prepare(name),
);

// Two sign-ups with one email at once: the loser hears what a later one would.
constraintAnswers({ ix_users_email_lower: { status: 409, detail: 'The user with this email already exists in the system' } });

export async function getById(db: Db, id: string): Promise<User | undefined> {
  const [user] = await byId(db).execute({ id });
  return user;
}

// ==================== Cache of authenticated users ====================

/** The channel the users table's trigger (migration 0001) notifies with the id of a changed user. */
export const USER_CHANGED_CHANNEL = 'keel_user_changed';
const caches = new WeakMap<Db, RowCache<User>>();

/**
 * Keeps users read by id (every authenticated request) in memory. Exact, not eventually: this
 * process evicts on its own writes (after commit), the trigger's notifications evict other nodes'
 * writes, and while the notification connection is down the cache is off.
 */
export async function cacheUsers(database: Database): Promise<void> {
  if (caches.has(database.db)) return;
  const cache = new RowCache<User>({ ttlMs: 30_000, maxEntries: 10_000, enabled: false });
  caches.set(database.db, cache);
  await database.listen(USER_CHANGED_CHANNEL, {
    message: (id) => cache.evict(id),
    status: (reliable) => cache.setEnabled(reliable),
  });
}

/** getById through the cache, when this database has one. The row is frozen: it is shared. */
export async function getByIdCached(db: Db, id: string): Promise<User | undefined> {
  const cache = caches.get(db);
  if (!cache) return getById(db, id);
  return cache.load(id, async () => {
    const user = await getById(db, id);
    return user && Object.freeze(user);
  });
}

/**
 * Called after every write to a user: evicts now (a write outside a transaction is committed) and
 * again at commit (inside one, a concurrent read may cache the old row until then).
 */
function forget(db: Db, id: string): void {
  const cache = caches.get(rootOf(db));
  if (!cache) return;
  cache.evict(id);
  afterCommit(db, () => cache.evict(id));
}

export async function getByEmail(db: Db, email: string): Promise<User | undefined> {
  const [user] = await db
    .select()
    .from(users)
    // Lowercased here, not by SQL lower(): the per-account rate limits key on the same JS
    // lowercase, so no spelling can reach an account under a different counter.
    .where(sql`lower(${users.email}) = ${email.trim().toLowerCase()}`);
  return user;
}

export async function create(db: Db, values: NewUser): Promise<User> {
  const [user] = await db.insert(users).values(values).returning();
  return user!;
}

export async function update(db: Db, id: string, values: Partial<NewUser>): Promise<User | undefined> {
  if (isEmptyChange(values)) return getById(db, id);
  const [user] = await db.update(users).set(values).where(eq(users.id, id)).returning();
  forget(db, id);
  return user;
}

/**
 * Sets fields and moves the token version on, killing every token issued before. With `fromVersion`,
 * only while the version is still that one (undefined otherwise): a token can be spent only once.
 */
export async function updateRevokingTokens(db: Db, id: string, values: Partial<NewUser>, fromVersion?: number): Promise<User | undefined> {
  const target = fromVersion === undefined ? eq(users.id, id) : and(eq(users.id, id), eq(users.token_version, fromVersion));
  const [user] = await db
    .update(users)
    .set({ ...values, token_version: sql`${users.token_version} + 1` })
    .where(target)
    .returning();
  forget(db, id);
  return user;
}

export async function remove(db: Db, id: string): Promise<void> {
  await db.delete(users).where(eq(users.id, id));
  forget(db, id);
}

export async function list(db: Db, page: Page): Promise<PageOf<User>> {
  const [data, [total]] = await Promise.all([
    db.select().from(users).orderBy(desc(users.created_at), desc(users.id)).limit(page.limit).offset(page.offset),
    db.select({ value: count() }).from(users),
  ]);
  return { data, count: total?.value ?? 0 };
}

export async function countActiveSuperusers(db: Db): Promise<number> {
  const [row] = await db
    .select({ value: count() })
    .from(users)
    .where(sql`${users.is_superuser} and ${users.is_active}`);
  return row?.value ?? 0;
}

/*
 * Users-row locks. A transaction that only serializes per-user writes takes FOR NO KEY UPDATE: it
 * conflicts with itself (and with FOR UPDATE), so two such transactions of one user still run one
 * after the other, but not with the KEY SHARE lock a foreign-key check takes on the users row. Every
 * row that references users(id) takes that KEY SHARE as it is inserted, among them a model call's
 * hold (its reservation) and settlement (its ledger entry): under FOR UPDATE those waited for the
 * whole locking transaction (a run start, a limit's count), and a settlement did so holding the
 * user's credit account, a deadlock as soon as that transaction wanted it
 * (test/integration/owner-lock-billing.test.ts). A transaction that deletes the users row takes
 * FOR UPDATE from its first lock on it (the DELETE needs it anyway): taken later, KEY SHARE holders
 * let in meanwhile would make the DELETE wait for them while it holds their billing rows.
 */

/** Any constant works, as long as every Keel process uses the same one (see crud/model-override.ts for the others). */
const SUPERUSER_CHANGE_LOCK_KEY = 7_424_911_004;

/**
 * Serializes the changes that could leave no active superuser (a demotion, a deactivation, a
 * delete — a user's own delete whoever they were at authentication): each takes this lock first, inside its transaction, and holds it until it ends, so the
 * next one's last-superuser check counts what the one before committed. A transaction-scoped
 * advisory lock, not the superusers' rows: FOR UPDATE on them (what a delete would need) made every
 * superuser's model calls (KEY SHARE through their hold's and ledger entry's foreign keys) wait for
 * any user's delete, and FOR NO KEY UPDATE their run starts (lockUser) still
 * (test/integration/superuser-lock.test.ts). Nothing else takes it.
 */
export async function lockSuperusers(db: Db): Promise<void> {
  await db.execute(sql`select pg_advisory_xact_lock(${SUPERUSER_CHANGE_LOCK_KEY}::bigint)`);
}

// Every creation under a per-user limit takes it (a new thread's run start too): prepared once, for every transaction.
const userLocked = preparedAnywhere('users_lock_no_key_update', (db, name) =>
  db
    .select({ id: users.id })
    .from(users)
    .where(eq(users.id, sql.placeholder('id') as unknown as string))
    .for('no key update')
    .prepare(name),
);

/**
 * Serializes per-user writes that check a limit first (count, then insert) inside a transaction:
 * FOR NO KEY UPDATE, so that the user's model calls are held and settled meanwhile (above).
 */
export async function lockUser(db: Db, id: string): Promise<void> {
  await userLocked(db).execute({ id });
}

/**
 * The KEY SHARE lock that inserting a row which references the user takes at the insert's end (its
 * foreign key's check), taken earlier: before the rows the transaction locks first otherwise, so
 * that it waits for a delete of the user (which holds the users row FOR UPDATE, then locks what
 * references it) before it holds any of those, rather than hold them and wait for the delete.
 */
export async function lockUserKeyShare(db: Db, id: string | SQLWrapper): Promise<void> {
  // `id` may be a subquery (knowledge.ts lockEntryOwnerKeyShare): nothing is locked when it finds no row.
  await db.select({ id: users.id }).from(users).where(typeof id === 'string' ? eq(users.id, id) : inArray(users.id, id)).for('key share');
}

/** The lock of a transaction that deletes the user (FOR UPDATE, above): taken before any weaker lock on the row. */
export async function lockUserForDelete(db: Db, id: string): Promise<void> {
  await db.select({ id: users.id }).from(users).where(eq(users.id, id)).for('update');
}

