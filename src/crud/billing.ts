/**
 * Credits, reservations and usage records. The statements that move money are single SQL
 * statements (data-modifying CTEs): each is atomic on its own, so a balance and its ledger entry, or
 * a reservation and the amount it holds, can never be half-written.
 */
import { randomUUID } from 'node:crypto';

import { and, asc, count, desc, eq, getTableColumns, gte, inArray, lt, type SQL, sql } from 'drizzle-orm';
import type { AnyPgColumn, PgDialect } from 'drizzle-orm/pg-core';

import type { Db } from '../core/db.js';
import { transaction } from '../core/db.js';

import { creditAccounts, type CreditTransaction, creditTransactions, type NewCreditTransaction, usageRecords } from '../models/index.js';

import { definePolicy } from '../utils/access.js';
import type { Principal } from '../utils/authentication.js';
import { storableText } from '../utils/text.js';
import { batchedById } from './batch.js';
import { ownedCrud, queryRows as rows } from './owned.js';
import type { Page, PageOf } from './page.js';
import { preparedAnywhere, preparedPerDb } from './prepared.js';

// ==================== Policies ====================

/** The ledger is personal (a superuser sees their own); a scoped key reads its project's entries. */
const TRANSACTION_ACCESS = { noun: 'Transaction', owner: creditTransactions.owner_id, project: creditTransactions.project_id, scopedKey: 'read' } as const;

export const transactionPolicy = definePolicy<CreditTransaction>({ ...TRANSACTION_ACCESS, superuserSeesAll: false });

export const transactionCrud = ownedCrud<CreditTransaction, NewCreditTransaction>(creditTransactions, transactionPolicy);

const NEWEST_FIRST = [desc(creditTransactions.created_at), desc(creditTransactions.id)];

/**
 * One page of the ledger the caller reads, newest first (ties by id), and its total. A ledger grows
 * by an entry per call (300,000 a year for a busy account), so unlike other lists (`pageOf`) the
 * total is not `count(*) over ()`: that window ran every one of the account's entries through it
 * and a sort on every page (0.5-0.9 s on PGlite, whose one thread every other request waits for).
 * The page's ids come from the index in the list's order (ix_credit_transactions_owner_id_created_at_id,
 * so a first page reads 20 entries, and an offset steps over index entries, not whole rows) and
 * only they are read whole. The total comes in the same statement: a whole account's ledger's is the
 * count its account keeps (`credit_accounts.entries`, by a trigger: migrations 0016-0017), so a page of a
 * long history does not count it (300,000 entries: 0.4 s on PGlite); a project-scoped key's is counted.
 */
export async function listTransactions(db: Db, principal: Principal, page: Page): Promise<PageOf<CreditTransaction>> {
  const visible = transactionPolicy.where(principal, 'read');
  const ids = db.select({ id: creditTransactions.id }).from(creditTransactions).where(visible).orderBy(...NEWEST_FIRST).limit(page.limit).offset(page.offset);
  const total =
    principal.scopeProjectId === null
      ? db.select({ value: sql`coalesce(max(${creditAccounts.entries}), 0)` }).from(creditAccounts).where(eq(creditAccounts.user_id, principal.user.id))
      : db.select({ value: count() }).from(creditTransactions).where(visible);
  const found = await db
    .select({ ...getTableColumns(creditTransactions), total: sql<number>`(${total})`.mapWith(Number) })
    .from(creditTransactions)
    .where(inArray(creditTransactions.id, ids))
    .orderBy(...NEWEST_FIRST);
  const data = found.map(({ total: _total, ...row }) => row);
  // A page past the end has no row to carry the total: only then is it counted apart.
  return { data, count: found[0]?.total ?? (page.offset > 0 ? Number((await total)[0]?.value ?? 0) : 0) };
}

/** One entry by id: a superuser reads every user's (the grant a `POST /billing/credits` names in its Location). */
export const transactionEntryPolicy = definePolicy<CreditTransaction>({ ...TRANSACTION_ACCESS, superuserSeesAll: true });

/** Usage is personal too; a scoped key reads the usage of its project. */
export const usagePolicy = definePolicy<{ owner_id: string | null; project_id: string | null }>({
  noun: 'Usage record',
  owner: usageRecords.owner_id,
  project: usageRecords.project_id,
  scopedKey: 'read',
  superuserSeesAll: false,
  ownerOf: (row) => row.owner_id ?? '',
});

// ==================== Accounts ====================

export interface Balance {
  balance: string;
  reserved: string;
}

const balancesOf = preparedPerDb('credit_balances_by_users', (db, name) =>
  db
    .select({ id: creditAccounts.user_id, balance: sql<string>`${creditAccounts.balance}::text`, reserved: sql<string>`${creditAccounts.reserved}::text` })
    .from(creditAccounts)
    .where(sql`${creditAccounts.user_id} = any(${sql.placeholder('ids')})`)
    .prepare(name),
);
/** Balances by user id: reads arriving together (every run's start reads one) share one statement, as reads by id do. */
const balanceOf = batchedById<Balance & { id: string }>((db, ids) => balancesOf(db).execute({ ids }));

export async function getBalance(db: Db, userId: string): Promise<Balance> {
  const row = await balanceOf(db, userId);
  return row ? { balance: row.balance, reserved: row.reserved } : { balance: '0', reserved: '0' };
}

export interface LedgerChange {
  userId: string;
  type: 'grant' | 'refund' | 'adjustment';
  /** Signed decimal string. */
  amount: string;
  description: string | null;
  createdBy: string;
}

/**
 * Adds `amount` to the user's balance and writes its ledger entry, in one statement. A negative
 * amount applies only while it leaves the balance at or above what running calls hold (null otherwise).
 */
export async function changeBalance(db: Db, change: LedgerChange): Promise<string | null> {
  const { userId, type, amount, description, createdBy } = change;
  const account = amount.startsWith('-')
    ? sql`update credit_accounts set balance = balance + ${amount}::numeric, updated_at = ${nextEntryTime(sql`updated_at`)}
          where user_id = ${userId} and balance - reserved + ${amount}::numeric >= 0 returning balance, updated_at as at`
    : sql`insert into credit_accounts (user_id, balance, updated_at) values (${userId}, ${amount}::numeric, clock_timestamp())
          on conflict (user_id) do update set balance = credit_accounts.balance + excluded.balance, updated_at = ${nextEntryTime(sql`credit_accounts.updated_at`)}
          returning balance, updated_at as at`;
  const [row] = await rows<{ id: string }>(
    db,
    sql`with a as (${account})
        insert into credit_transactions (owner_id, type, amount, balance_after, description, created_by, created_at, updated_at)
        select ${userId}, ${type}, ${amount}::numeric, balance, ${description}, ${createdBy}, at, at from a
        returning id`,
  );
  return row?.id ?? null;
}

/** The sum of the user's ledger (what the balance must always equal). */
export async function ledgerSum(db: Db, userId: string): Promise<string> {
  const [row] = await rows<{ sum: string }>(db, sql`select coalesce(sum(amount), 0)::text as sum from credit_transactions where owner_id = ${userId}`);
  return row?.sum ?? '0';
}

/** A key's spend and what running calls hold of its budget. */
export async function keySpend(db: Db, apiKeyId: string): Promise<{ spent: string; reserved: string }> {
  const budget = await keyBudget(db, apiKeyId);
  return budget ? { spent: budget.spent, reserved: budget.reserved } : { spent: '0', reserved: '0' };
}

export interface KeyBudget {
  maxBudget: string | null;
  spent: string;
  reserved: string;
  /** The key is revoked (a revoked key's budget holds nothing: see `holdKey`). */
  revoked: boolean;
  /** Its owner is deactivated. */
  ownerInactive: boolean;
}

/** A key's budget, spend and what running calls hold of it, and whether it or its owner still works; null when the key is gone (deleted). */
export async function keyBudget(db: Db, apiKeyId: string): Promise<KeyBudget | null> {
  const [row] = await rows<{ max_budget: string | null; spent: string; reserved: string; revoked: boolean; owner_inactive: boolean }>(
    db,
    sql`select k.max_budget::text as max_budget, k.spent::text as spent, k.budget_reserved::text as reserved,
          k.status <> 'active' as revoked, not coalesce(u.is_active, false) as owner_inactive
        from api_keys k left join users u on u.id = k.owner_id where k.id = ${apiKeyId}`,
  );
  return row ? { maxBudget: row.max_budget, spent: row.spent, reserved: row.reserved, revoked: row.revoked, ownerInactive: row.owner_inactive } : null;
}

// ==================== Reservations ====================

export interface Hold {
  id: string;
  userId: string | null;
  apiKeyId: string | null;
  /** Held from the account (null: the account is not charged). */
  accountAmount: string | null;
  /** What `balance - reserved` must cover for the hold to be taken, when more than `accountAmount` (a credit window's block). */
  accountCover?: string;
  /** Held from the key's budget (null: the key has no budget). */
  keyAmount: string | null;
  ttlSeconds: number;
  /** A credit window's block: commits only once it is on disk (DURABLE_COMMIT), not asynchronously. */
  durable?: boolean;
}

export type HoldOutcome = 'held' | 'balance' | 'budget';

class Refused extends Error {
  constructor(readonly outcome: HoldOutcome) {
    super(outcome);
  }
}

/**
 * Holds and settlements commit without waiting for the WAL flush (`synchronous_commit = off` for
 * their own transaction only): on this machine's PostgreSQL that wait is ~6 ms, far beyond what a
 * call may add. Each statement stays atomic, and a database crash can only lose the newest ones
 * whole (docs/decisions.md): a lost hold's call settles against no reservation, which still
 * charges it; a lost settlement leaves its reservation to expire, the call uncharged. WAL is written
 * in order, so anything that reached disk carries every hold before it.
 */
const ASYNC_COMMIT = sql`s as (select set_config('synchronous_commit', 'off', true) as setting)`;

/**
 * A credit window's block is held with the commit waiting for the WAL flush: its process serves
 * calls from the block in memory for up to ~30 s, so a block's hold lost in a crash would leave
 * those calls with no row behind them while another process takes the same credit again (an
 * overdraft of up to a block). Blocks are taken rarely (each serves many calls), so the wait costs
 * a call little; set explicitly, it holds whatever the server's default.
 */
const DURABLE_COMMIT = sql`s as (select set_config('synchronous_commit', 'on', true) as setting)`;

/**
 * A user deactivated, or a key revoked, after its call was authenticated holds nothing: the call
 * is refused as one made with those credentials now is (the usage meter's `notEnoughCredits` and
 * `overBudget` tell it from a shortage). Checked in the hold's own statement (the user's row by its
 * key, the key's on the row the hold updates anyway), so it costs no statement; a deleted user's
 * account, or a deleted key's row, is gone and refuses alike.
 */
const holdAccount = (hold: Hold, amount: string) =>
  sql`update credit_accounts set reserved = reserved + ${amount}::numeric
      where user_id = ${hold.userId} and balance - reserved >= ${hold.accountCover ?? amount}::numeric
        and exists (select 1 from users u where u.id = credit_accounts.user_id and u.is_active) returning user_id`;

const holdKey = (hold: Hold, amount: string) =>
  sql`update api_keys set budget_reserved = budget_reserved + ${amount}::numeric
      where id = ${hold.apiKeyId} and status = 'active' and (max_budget is null or max_budget - spent - budget_reserved >= ${amount}::numeric)
        and exists (select 1 from users u where u.id = api_keys.owner_id and u.is_active) returning id`;

const insertHold = (hold: Hold, from: SQL) =>
  sql`insert into credit_reservations (id, expires_at, user_id, api_key_id, account_amount, key_amount)
      select ${hold.id}, now() + ${hold.ttlSeconds} * interval '1 second', ${hold.userId}::uuid, ${hold.apiKeyId}::uuid,
             ${hold.accountAmount ?? '0'}::numeric, ${hold.keyAmount ?? '0'}::numeric ${from}
      returning id`;

/**
 * Holds a call's worst-case cost: from the account (`balance - reserved` must cover it) and/or the
 * key's budget (`max_budget - spent - budget_reserved` must). One conditional UPDATE each, so
 * concurrent calls can never hold more than there is; with only one of the two (the usual case) the
 * whole hold is one statement, with both a transaction that refuses as a whole.
 */
export async function hold(db: Db, h: Hold): Promise<HoldOutcome> {
  const { accountAmount, keyAmount } = h;
  const commit = h.durable ? DURABLE_COMMIT : ASYNC_COMMIT;
  if (accountAmount !== null && keyAmount === null) {
    const held = await rows(db, sql`with ${commit}, a as (${holdAccount(h, accountAmount)}) ${insertHold(h, sql`from a, s`)}`);
    return held.length ? 'held' : 'balance';
  }
  if (accountAmount === null && keyAmount !== null) {
    const held = await rows(db, sql`with ${commit}, k as (${holdKey(h, keyAmount)}) ${insertHold(h, sql`from k, s`)}`);
    return held.length ? 'held' : 'budget';
  }
  if (accountAmount === null || keyAmount === null) return 'held';
  try {
    return await transaction(db, async (tx) => {
      await rows(tx, sql`with ${commit} select 1 from s`);
      // The account's row before the key's, the order settlements and the sweep lock them in
      // (key first, concurrent holds and settlements on one key deadlocked on PostgreSQL).
      if (!(await rows(tx, holdAccount(h, accountAmount))).length) throw new Refused('balance');
      if (!(await rows(tx, holdKey(h, keyAmount))).length) throw new Refused('budget');
      await rows(tx, insertHold(h, sql``));
      return 'held' as const;
    });
  } catch (error) {
    if (error instanceof Refused) return error.outcome;
    throw error;
  }
}

export interface Settlement {
  /** The reservation to release (null: nothing was held). */
  reservationId: string | null;
  /**
   * Set when the reservation is a credit window's block (see credit-window.ts): the call releases
   * this much of it and the row stays for the window's other calls. Null: the whole row goes.
   */
  release?: string | null;
  userId: string | null;
  apiKeyId: string | null;
  projectId: string | null;
  /** Exact cost of the call (decimal string). */
  cost: string;
  /** Debit the account and write the ledger's usage entry. */
  chargeAccount: boolean;
  /** Add the cost to the key's `spent` (its budget). */
  chargeKey: boolean;
  usageRecordId: string;
  description: string;
  /**
   * The call's usage row (`usageRowJson`, id `usageRecordId`), when the settlement writes it: a
   * settlement that charges the key but may write no ledger entry (billing off; or nothing held, and
   * the account may have no row). The row goes in with the key's spend, once by its id, so a retried
   * settlement that had committed moves the key's spend nothing again.
   */
  usage?: string;
  /**
   * The item as `settleMany` sends it (`settlementJson`), when made ahead: the usage meter makes it
   * as a call settles, after its answer, so that a flush only joins strings on the event loop.
   */
  json?: string;
}

/**
 * A settlement as one item of `settleMany`'s JSON parameter. Its ledger entry's id comes from here:
 * gen_random_uuid() as the column's default costs PGlite ~7 µs a row (its random bytes come
 * through the WebAssembly boundary), randomUUID() here a fraction of a µs.
 */
export function settlementJson(s: Settlement): string {
  return JSON.stringify({
    entry_id: randomUUID(),
    rid: s.reservationId,
    part: s.release ?? null,
    user_id: s.userId,
    api_key_id: s.apiKeyId,
    project_id: s.projectId,
    cost: s.cost,
    charge_account: s.chargeAccount,
    charge_key: s.chargeKey,
    usage_record_id: s.usageRecordId,
    description: s.description,
  });
}

/**
 * Ends a call in one statement: releases its reservation (if the sweep has not already), moves
 * the key's spend, debits the exact cost and writes the ledger entry with the balance after it.
 * Charging does not depend on the reservation still existing, so a call that outlived its
 * reservation's expiry is still paid for.
 */
export async function settle(db: Db, s: Settlement, retried = false): Promise<void> {
  const rid = s.reservationId;
  const part = s.release ?? null;
  // A retry after a failure the client could not tell from a lost reply (the statement may have
  // committed): nothing moves if the call's ledger entry is there already (looked up through the
  // index that keeps it one per call; a first attempt that commits only later is refused by it).
  // Only a settlement that charges an account can have an entry; one that writes its call's usage
  // row moves the key's spend by the row it inserts, none when the row is there already (and the
  // reservation is released once anyway): with no entry to find, that is what keeps the key's once.
  const once = retried && s.chargeAccount && s.userId !== null;
  const seen = once ? sql`, seen as (select 1 from credit_transactions where usage_record_id = ${s.usageRecordId}::uuid and type = 'usage')` : sql``;
  const fresh = once ? sql` and not exists (select 1 from seen)` : sql``;
  const usage = s.usage === undefined ? sql`` : sql`, ${usageRowCtes(sql`${jsonArray([s.usage])}`)}`;
  const spend = s.usage === undefined ? sql`${s.cost}::numeric` : sql`(select coalesce(sum(cost), 0) from ins)`;
  await rows(
    db,
    sql`with ${ASYNC_COMMIT}${seen}${usage}, rd as (delete from credit_reservations where id = ${rid}::uuid and ${part}::numeric is null and (select setting from s) is not null${fresh} returning account_amount, key_amount),
        rb as (update credit_reservations set account_amount = account_amount - ${part}::numeric where id = ${rid}::uuid and ${part}::numeric is not null${fresh} returning ${part}::numeric as account_amount, 0::numeric as key_amount),
        r as (select * from rd union all select * from rb),
        k as (
          update api_keys set spent = spent + ${spend},
            budget_reserved = greatest(budget_reserved - coalesce((select key_amount from r), 0), 0)
          where id = ${s.apiKeyId}::uuid and ${s.chargeKey}::boolean${fresh} returning id
        ),
        o as (
          -- Reads the reservation (r) first: the sweep and settleMany lock a reservation before its account.
          select user_id, balance, greatest(reserved - coalesce((select account_amount from r), 0), 0) as still_held from credit_accounts
          where user_id = ${s.userId}::uuid and ${s.chargeAccount}::boolean${fresh} for update
        ),
        a as (
          update credit_accounts c set balance = ${flooredBalance(sql`o.balance`, sql`${s.cost}::numeric`, sql`o.still_held`)}, reserved = o.still_held,
            updated_at = ${nextEntryTime(sql`c.updated_at`)}
          from o where c.user_id = o.user_id returning c.balance, o.balance - c.balance as debited, c.updated_at as at
        )
        insert into credit_transactions (owner_id, type, amount, balance_after, description, usage_record_id, api_key_id, project_id, created_at, updated_at)
        select ${s.userId}::uuid, 'usage', -debited, balance, ${chargedDescription(sql`${s.description}::text`, sql`${s.cost}::numeric`, sql`debited`)},
          ${s.usageRecordId}::uuid, ${s.apiKeyId}::uuid, ${s.projectId}::uuid, at, at
        from a where ${s.cost}::numeric > 0`,
  );
}

/**
 * Ends many calls in one statement, as `settle` ends one: the reservations released, each key's
 * spend and each account's balance moved by the sum of its calls, and one ledger entry per charged
 * call whose `balance_after` is the balance after it and the entries before it (in `batch` order),
 * so the ledger still adds up entry by entry.
 */
export async function settleMany(db: Db, batch: readonly Settlement[], retried = false): Promise<void> {
  if (batch.length === 1) return settle(db, batch[0]!, retried);
  const usage = batch.flatMap((s) => (s.usage === undefined ? [] : [s.usage]));
  const items = settlementItems(batch);
  const [withRows, only] = retried ? [settleManyWithRowsAgain, settleManyOnlyAgain] : [settleManyWithRows, settleManyOnly];
  await (usage.length ? withRows(db).execute({ usage: jsonArray(usage), items }) : only(db).execute({ items }));
}

/**
 * A flush's statement, prepared under its name with its JSON parameters as placeholders: on
 * PostgreSQL each connection parses and plans it once and runs a generic plan from the sixth run
 * on. Sent as text, the server parsed and planned it at every flush, and ran it on a custom plan,
 * which was slower to run than the generic one besides (a 128-row `writeUsage`'s backend CPU
 * 10.6 → 6.6 ms, medians: bench/RESULTS.md, stop 44); Drizzle no longer builds its text each time
 * either. PGlite's client prepares every text once already (pglite-client.ts).
 */
const flushStatement = (name: string, statement: () => SQL) =>
  preparedAnywhere(name, (db, statementName): FlushStatement => {
    const { dialect, _ } = db as unknown as { dialect: PgDialect; _: Pick<Db['_'], 'session'> };
    return _.session.prepareQuery(dialect.sqlToQuery(statement()), undefined, statementName, false) as unknown as FlushStatement;
  });

interface FlushStatement {
  execute(placeholders: Record<string, string>): Promise<{ rows: unknown[] }>;
}

/** The placeholders of a flush's statements: usage rows and settlement items, each a JSON array (`jsonArray`, `settlementItems`). */
const USAGE = sql`${sql.placeholder('usage')}`;
const ITEMS = sql`${sql.placeholder('items')}`;

const settleManyOnly = flushStatement('credit_settle_many', () => sql`with ${ASYNC_COMMIT}, ${settleCtes(ITEMS)} ${LEDGER_ENTRIES}`);
const settleManyWithRows = flushStatement('credit_settle_many_rows', () => sql`with ${ASYNC_COMMIT}, ${usageRowCtes(USAGE)}, ${settleCtes(ITEMS, true)} ${LEDGER_ENTRIES}`);
/** The same, retried (`settleMany(…, true)`): settlements already charged are left out (see `settleCtes`). */
const settleManyOnlyAgain = flushStatement('credit_settle_many_again', () => sql`with ${ASYNC_COMMIT}, ${settleCtes(ITEMS, false, true)} ${LEDGER_ENTRIES}`);
const settleManyWithRowsAgain = flushStatement('credit_settle_many_rows_again', () => sql`with ${ASYNC_COMMIT}, ${usageRowCtes(USAGE)}, ${settleCtes(ITEMS, true, true)} ${LEDGER_ENTRIES}`);

/** The items as `settleMany`'s one JSON parameter. */
const settlementItems = (batch: readonly Settlement[]): string => `[${batch.map((s) => s.json ?? settlementJson(s)).join(',')}]`;

/**
 * `settleMany`'s work up to its ledger entries (`e`): reservations released, keys' spend and
 * accounts' balances moved, for the settlements `items` (`settlementItems`). `withRows`: some
 * settlements write their usage rows (`usageRowCtes` before these): such a call moves its key's
 * spend only when its row was inserted now (see `settle`). `retried`: the batch may have committed
 * before (a reply lost, or saved at shutdown and taken back): as `settle`'s retry, a settlement
 * whose call has its ledger entry already moves nothing (looked up through the index that keeps
 * it one per call, ux_credit_transactions_usage_record_id; one committed after this statement began
 * is refused by it, the whole statement with it); one that writes its usage row moves its key's
 * spend only by a row inserted now, and a reservation is deleted once anyway.
 */
const settleCtes = (items: SQL, withRows = false, retried = false) =>
  sql`i as (
          select x.* from rows from (json_to_recordset(${items}::json) as (entry_id uuid, rid uuid, part numeric, user_id uuid, api_key_id uuid,
              project_id uuid, cost numeric, charge_account boolean, charge_key boolean, usage_record_id uuid, description text)) with ordinality
            as x(entry_id, rid, part, user_id, api_key_id, project_id, cost, charge_account, charge_key, usage_record_id, description, ord)
          ${retried ? sql`where not exists (select 1 from credit_transactions t where t.usage_record_id = x.usage_record_id and t.type = 'usage')` : sql``}
        ),
        r as (
          delete from credit_reservations where id in (select rid from i where rid is not null and part is null) and (select setting from s) is not null
          returning id, account_amount, key_amount
        ),
        b as (
          update credit_reservations c set account_amount = c.account_amount - g.part
          from (select rid, sum(part) as part from i where rid is not null and part is not null group by rid) g
          where c.id = g.rid returning c.id
        ),
        -- A deleted reservation's amounts go to the first of its items only: two releases of one
        -- reservation in a batch (a release saved twice, or kept twice) released it twice, and
        -- the account's reserved went below what its other holds still held.
        rf as (select distinct on (rid) rid, ord from i where rid is not null and part is null order by rid, ord),
        ir as (
          select i.*, case when i.part is null then coalesce(r.account_amount, 0) when b.id is not null then i.part else 0 end as account_release,
            coalesce(r.key_amount, 0) as key_release
          from i left join rf on rf.ord = i.ord left join r on r.id = rf.rid left join b on b.id = i.rid and i.part is not null
        ),
        k as (
          update api_keys t set spent = t.spent + g.cost, budget_reserved = greatest(t.budget_reserved - g.released, 0)
          from (select api_key_id, sum(${withRows ? sql`case when usage_record_id in (select id from x except select id from ins) then 0 else cost end` : sql`cost`}) as cost,
                  sum(key_release) as released from ir
                where charge_key and api_key_id is not null group by api_key_id) g
          where t.id = g.api_key_id returning t.id
        ),
        due as (select user_id, sum(cost) as cost, sum(account_release) as released, count(*) as entries from ir where charge_account and user_id is not null group by user_id),
        o as (
          select c.user_id, c.balance as prior_balance, greatest(c.reserved - due.released, 0) as still_held, due.cost, due.entries
          from credit_accounts c join due on due.user_id = c.user_id for update of c
        ),
        a as (
          -- The account's entries take the microseconds up to its new updated_at (their last one's time).
          update credit_accounts c set balance = ${flooredBalance(sql`o.prior_balance`, sql`o.cost`, sql`o.still_held`)}, reserved = o.still_held,
            updated_at = ${nextEntryTime(sql`c.updated_at`)} + (o.entries - 1) * interval '1 microsecond'
          from o where c.user_id = o.user_id returning c.user_id, o.prior_balance, o.still_held, o.entries, c.updated_at as last_at
        ),
        w as (
          select ir.*, a.prior_balance, a.still_held, sum(ir.cost) over (partition by ir.user_id order by ir.ord rows between unbounded preceding and current row) as spent,
            a.last_at - (a.entries - row_number() over (partition by ir.user_id order by ir.ord)) * interval '1 microsecond' as at
          from ir join a on a.user_id = ir.user_id
          where ir.charge_account
        ),
        e as (
          select w.*, ${flooredBalance(sql`prior_balance`, sql`spent`, sql`still_held`)} as balance_after,
            ${flooredBalance(sql`prior_balance`, sql`spent - cost`, sql`still_held`)} - ${flooredBalance(sql`prior_balance`, sql`spent`, sql`still_held`)} as debited
          from w
        )`;

/**
 * An account's balance after `cost` is charged to `balance`: never below what other calls still
 * hold (`held`, the account's `reserved` after this statement's releases), so never below zero
 * (SPEC §8: debits can never spend past zero) and never into credit another call in flight (or a
 * credit window's block) has held; a balance below that already is left as it is. A call's
 * reservation covers its estimate; what it costs beyond that (a provider that counts more tokens
 * than the estimate, or ignores the maximum) is charged only as far as the free balance goes.
 */
const flooredBalance = (balance: SQL, cost: SQL, held: SQL) => sql`least(${balance}, greatest(${held}, ${balance} - (${cost})))`;

/** A usage entry's description, saying so when the balance covered less than the call cost (its usage record keeps the cost). */
const chargedDescription = (description: SQL, cost: SQL, debited: SQL) =>
  sql`case when ${debited} < ${cost} then ${description} || ' (cost ' || trim_scale(${cost}) || '; the balance covered ' || trim_scale(${debited}) || ')' else ${description} end`;

/**
 * When an account's next ledger entry is made, set as the account's `updated_at` (which only a
 * change of its balance moves, with its entry: the last entry's time) in the update that holds its
 * row: the clock then — not the transaction's start, since a transaction that waited for another's
 * lock started earlier but made its balance later — and always after the account's last entry
 * (`last`, the locked row's). The ledger lists entries by time (newest first, ties by id), so each
 * must come after the one its `balance_after` follows: PGlite's clock ticks in milliseconds, and a
 * grant in the same millisecond as a settlement tied with it (or came before a batch's entries,
 * a microsecond apart), listed out of the chain's order.
 */
const nextEntryTime = (last: SQL) => sql`greatest(clock_timestamp(), ${last} + interval '1 microsecond')`;

/**
 * The batch's ledger entries. Each is a microsecond after the one before it of its account (the
 * order the batch made their balances in), the last at the account's new `updated_at`.
 */
const LEDGER_ENTRIES = sql`insert into credit_transactions (id, owner_id, type, amount, balance_after, description, usage_record_id, api_key_id, project_id, created_at, updated_at)
        select entry_id, user_id, 'usage', -debited, balance_after, ${chargedDescription(sql`description`, sql`cost`, sql`debited`)}, usage_record_id, api_key_id, project_id, at, at
        from e where cost > 0 order by ord`;

/** Releases every reservation past its expiry (its process died mid-call); returns how many. */
export function releaseExpired(db: Db): Promise<number> {
  return releaseWhere(db, sql`expires_at < now()`);
}

/**
 * Releases every reservation, expired or not; returns how many. Only for a database no other
 * process can be using (embedded, behind its data-dir lock), before this process holds anything.
 */
export function releaseAll(db: Db): Promise<number> {
  return releaseWhere(db, sql`true`);
}

async function releaseWhere(db: Db, condition: SQL): Promise<number> {
  const [row] = await rows<{ released: number }>(
    db,
    sql`with r as (
          delete from credit_reservations where ${condition} returning user_id, api_key_id, account_amount, key_amount
        ),
        a as (
          update credit_accounts c set reserved = greatest(c.reserved - s.amount, 0)
          from (select user_id, sum(account_amount) as amount from r where user_id is not null group by user_id) s
          where c.user_id = s.user_id returning 1
        ),
        k as (
          update api_keys t set budget_reserved = greatest(t.budget_reserved - s.amount, 0)
          from (select api_key_id, sum(key_amount) as amount from r where api_key_id is not null group by api_key_id) s
          where t.id = s.api_key_id returning 1
        )
        -- Reading a here runs it (its accounts locked) during this query; k, read by nothing, runs
        -- after it. Unread, both ran after the query in reverse order, the keys before the accounts:
        -- the other way round from holds and settlements, a deadlock with a hold of the key.
        select count(*)::int as released from r where (select count(*) from a) >= 0`,
  );
  return Number(row?.released ?? 0);
}

// ==================== Lock order ====================

/** What a deletion takes away with its billing rows (ON DELETE CASCADE): a user, an API key, or a project (its scoped keys). */
export type BillingRowsOf = { userId: string } | { apiKeyId: string } | { projectId: string };

/**
 * Locks the rows of `of` that holds and settlements lock, in the order they lock them: reservations,
 * then the credit account (FOR UPDATE), then API keys (FOR NO KEY UPDATE; each table's rows by id). A transaction
 * that deletes a user, a key or a project calls it before it locks anything else, the users row
 * included: it then waits for a hold or settlement in progress, or makes one wait, while holding
 * nothing that one needs. Without it, the delete held the owner's users row (lockUserForDelete, the
 * DELETE itself) and then waited, through ON DELETE CASCADE, for rows a settlement held, while the
 * settlement waited for that users row: its ledger entry's (and a hold's reservation's) foreign key
 * takes a KEY SHARE lock on it at the end of its statement, after its own row locks. PostgreSQL
 * broke the cycle after deadlock_timeout (1 s) by aborting one side, the delete's a 500. Holds and
 * settlements, one statement per call, keep their order and cost nothing more.
 */
export async function lockBillingRows(tx: Db, of: BillingRowsOf): Promise<void> {
  const keys =
    'userId' in of
      ? sql`select id from api_keys where owner_id = ${of.userId}::uuid`
      : 'apiKeyId' in of
        ? sql`select ${of.apiKeyId}::uuid`
        : sql`select id from api_keys where project_id = ${of.projectId}::uuid`;
  // A reservation goes with its user (cascade) or loses its key (set null): locked either way.
  const byUser = 'userId' in of ? sql`user_id = ${of.userId}::uuid or ` : sql``;
  await rows(tx, sql`select id from credit_reservations where ${byUser}api_key_id in (${keys}) order by id for update`);
  if ('userId' in of) await rows(tx, sql`select id from credit_accounts where user_id = ${of.userId}::uuid for update`);
  // NO KEY UPDATE: it waits for (and holds back) the holds and settlements that update the keys, but
  // not a row that references a key (a run started through it, KEY SHARE): under FOR UPDATE, a run
  // start that held the users row (lockUser) and then inserted its run waited for this delete, which
  // waited for that users row: a deadlock. The DELETE takes the rest once the users row is its own.
  await rows(tx, sql`select id from api_keys where id in (${keys}) order by id for no key update`);
}

// ==================== Usage records ====================

/** A usage row as the writer sends it: `charge_key` adds its cost to the key's `spent` on insert. */
/** Tokens by kind and their cost: a usage record's figures, and a summary group's sums. */
export interface UsageTotals {
  input_tokens: number;
  cached_input_tokens: number;
  cache_write_tokens: number;
  output_tokens: number;
  reasoning_tokens: number;
  cost: string;
}

export interface UsageRow extends UsageTotals {
  id: string;
  created_at: string;
  owner_id: string | null;
  api_key_id: string | null;
  project_id: string | null;
  agent_id: string | null;
  run_id: string | null;
  model: string;
  provider: string;
  operation: string;
  latency_ms: number;
  time_to_first_token_ms: number | null;
  status: string;
  error: string | null;
  estimated: boolean;
  attempts: number;
  started_at: string;
  charge_key: boolean;
}

/** A usage row as JSON, as `insertUsage` takes it ready-made (see Settlement.json for why). */
export const usageRowJson = (row: UsageRow): string => JSON.stringify(row);

const ID_FIRST = '{"id":"';
/** The id of a usage row as JSON: read off its start where `usageRowJson` put it (first), without parsing the row. */
export const usageRowId = (json: string): string => (json.startsWith(ID_FIRST) ? json.slice(ID_FIRST.length, ID_FIRST.length + 36) : (JSON.parse(json) as { id: string }).id);

/** The error a stripped usage row (`usageRowStripped`) carries: a note on the record, not the call's error. */
export const STRIPPED_USAGE_NOTE = 'usage record refused by the database: its tokens and times were not recorded';

/**
 * A usage row the database refused for its data (`usageRowJson`), kept to what settling and
 * summing its call needs: its id, whose row tells a retried settlement that had committed to move
 * the key's spend nothing again (without any row a retry after a lost reply charged the key twice),
 * who and what it was for (its model and provider as text can store them), and its cost, which
 * the key's spend takes anyway. What the provider reported (tokens, times) and the error's text,
 * where a refused value comes from, go; the error says so.
 *
 * Its status stays the call's (success, error or aborted: the statuses a call has): the note in
 * `error` is about the record, not the call. `error` would say a call that was answered and
 * charged failed, unlike its metrics and its ledger entry's description, and count it among a
 * model's failures.
 */
export function usageRowStripped(json: string): string {
  const row = JSON.parse(json) as UsageRow;
  return usageRowJson({
    ...row,
    model: storableText(row.model, row.model.length),
    provider: storableText(row.provider, row.provider.length),
    input_tokens: 0,
    cached_input_tokens: 0,
    cache_write_tokens: 0,
    output_tokens: 0,
    reasoning_tokens: 0,
    latency_ms: 0,
    time_to_first_token_ms: null,
    error: STRIPPED_USAGE_NOTE,
  });
}

/**
 * Writes a batch in one statement with one parameter (the rows as JSON, so the text never varies);
 * rows may come as objects or already as `usageRowJson`.
 * A row whose id is already stored is skipped (a retried batch is not doubled, nor is the key's
 * spend); a row whose user was deleted meanwhile is dropped. Returns how many were written.
 */
export async function insertUsage(db: Db, batch: readonly (UsageRow | string)[]): Promise<number> {
  const [row] = (await usageInserted(db).execute({ usage: jsonArray(batch) })).rows as { written: number }[];
  return Number(row?.written ?? 0);
}

const usageInserted = flushStatement('usage_insert', () => sql`with ${usageCtes(USAGE)} select count(*)::int as written from ins`);

/**
 * A flush in one statement: usage records (as `insertUsage`) and settlements (as `settleMany`)
 * together, so that each flush costs the database one statement and one commit, and a call's
 * usage record and ledger entry are written together or not at all. Settlements that move a key's
 * spend go apart (the usage rows may move the same key's, and one statement cannot update a row twice).
 */
export async function writeUsage(db: Db, usage: readonly (UsageRow | string)[], settlements: readonly Settlement[]): Promise<void> {
  if (!settlements.length) {
    await insertUsage(db, usage);
    return;
  }
  if (!usage.length || settlements.some((s) => s.chargeKey)) {
    if (usage.length) await insertUsage(db, usage);
    await settleMany(db, settlements);
    return;
  }
  await usageWritten(db).execute({ usage: jsonArray(usage), items: settlementItems(settlements) });
}

/** `insertUsage`'s work for the rows `json` (`jsonArray`): `ins` the rows written, `uk` the keys' spend moved by rows with `charge_key`. */
const usageCtes = (json: SQL) =>
  sql`${usageRowCtes(json)},
        uk as (
          update api_keys t set spent = t.spent + s.total
          from (select ins.api_key_id, sum(ins.cost) as total from ins join x on x.id = ins.id
                where x.charge_key and ins.api_key_id is not null group by ins.api_key_id) s
          where t.id = s.api_key_id returning 1
        )`;

const usageWritten = flushStatement('usage_write', () => sql`with ${ASYNC_COMMIT}, ${usageCtes(USAGE)}, ${settleCtes(ITEMS)} ${LEDGER_ENTRIES}`);

/** Usage rows as one JSON array, the parameter `usageRowCtes` reads. */
const jsonArray = (batch: readonly (UsageRow | string)[]): string => `[${batch.map((r) => (typeof r === 'string' ? r : usageRowJson(r))).join(',')}]`;

/** The rows `json` (`jsonArray`) as `x`, and those written (`ins`: not those whose id is stored already, nor those of users deleted meanwhile). */
const usageRowCtes = (json: SQL) =>
  sql`x as (
          select * from json_to_recordset(${json}::json) as x(
            id uuid, created_at timestamptz, owner_id uuid, api_key_id uuid, project_id uuid, agent_id uuid, run_id uuid,
            model text, provider text, operation text, input_tokens int, cached_input_tokens int, cache_write_tokens int,
            output_tokens int, reasoning_tokens int, cost numeric, latency_ms int, time_to_first_token_ms int, status text,
            error text, estimated boolean, attempts int, started_at timestamptz, charge_key boolean)
        ),
        ins as (
          insert into usage_records (id, created_at, updated_at, owner_id, api_key_id, project_id, agent_id, run_id, model,
            provider, operation, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost,
            latency_ms, time_to_first_token_ms, status, error, estimated, attempts, started_at)
          select id, created_at, created_at, owner_id, api_key_id, project_id, agent_id, run_id, model, provider, operation,
            input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost, latency_ms,
            time_to_first_token_ms, status, error, estimated, attempts, started_at
          from x where x.owner_id is null or exists (select 1 from users u where u.id = x.owner_id)
          on conflict (id) do nothing
          returning id, api_key_id, cost
        )`;

export const GROUP_BY = ['model', 'day', 'api_key'] as const;
export type GroupBy = (typeof GROUP_BY)[number];

export interface SummaryRow extends UsageTotals {
  model?: string;
  day?: string;
  api_key_id?: string | null;
  calls: number;
}

const GROUP_COLUMNS: Record<GroupBy, SQL> = {
  model: sql`${usageRecords.model}`,
  day: sql`to_char(${usageRecords.created_at} at time zone 'UTC', 'YYYY-MM-DD')`,
  api_key: sql`${usageRecords.api_key_id}`,
};
const GROUP_NAMES: Record<GroupBy, string> = { model: 'model', day: 'day', api_key: 'api_key_id' };

/** A count column summed over usage records (0 over none). */
const summed = (column: AnyPgColumn) => sql<number>`coalesce(sum(${column}), 0)`.mapWith(Number);

/** Usage records' tokens by kind and cost, summed: a select's columns (a summary's groups, a run's calls). */
export const usageTotalColumns = () => ({
  input_tokens: summed(usageRecords.input_tokens),
  cached_input_tokens: summed(usageRecords.cached_input_tokens),
  cache_write_tokens: summed(usageRecords.cache_write_tokens),
  output_tokens: summed(usageRecords.output_tokens),
  reasoning_tokens: summed(usageRecords.reasoning_tokens),
  cost: sql<string>`coalesce(sum(${usageRecords.cost}), 0)::text`,
});

/** Usage in [from, to) that `visible` selects, summed per group (all of it when `groupBy` is empty). */
export async function summarize(db: Db, visible: SQL | undefined, from: Date, to: Date, groupBy: readonly GroupBy[]): Promise<SummaryRow[]> {
  const groups: Record<string, SQL> = Object.fromEntries(groupBy.map((g) => [GROUP_NAMES[g], GROUP_COLUMNS[g]]));
  const keys = groupBy.map((g) => GROUP_COLUMNS[g]);
  return db
    .select({ ...groups, calls: sql<number>`count(*)`.mapWith(Number), ...usageTotalColumns() })
    .from(usageRecords)
    .where(and(visible, gte(usageRecords.created_at, from), lt(usageRecords.created_at, to)))
    .groupBy(...keys)
    .orderBy(...keys.map((k) => asc(k)));
}
