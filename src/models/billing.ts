import { sql } from 'drizzle-orm';
import { bigint, boolean, check, index, integer, numeric, pgEnum, pgTable, text, timestamp, uniqueIndex, uuid, varchar } from 'drizzle-orm/pg-core';

import { apiKeys } from './api-key.js';
import { baseColumns } from './columns.js';
import { users } from './user.js';

/** Money: credits (= USD of the catalog's prices) with 12 decimal places, exact. */
export const money = (name: string) => numeric(name, { precision: 30, scale: 12 });

// ==================== Usage records ====================

/**
 * One row per model call (per model tried when fallbacks run), written after the answer in
 * batches. `api_key_id`, `project_id`, `agent_id` and `run_id` are kept as history (no foreign key:
 * a deleted key's usage still sums up under its id).
 */
export const usageRecords = pgTable(
  'usage_records',
  {
    ...baseColumns,
    /** Null for calls made for no user (system work). */
    owner_id: uuid('owner_id').references(() => users.id, { onDelete: 'cascade' }),
    api_key_id: uuid('api_key_id'),
    project_id: uuid('project_id'),
    agent_id: uuid('agent_id'),
    run_id: uuid('run_id'),
    model: text('model').notNull(),
    provider: text('provider').notNull(),
    operation: varchar('operation', { length: 16 }).notNull(),
    input_tokens: integer('input_tokens').notNull(),
    cached_input_tokens: integer('cached_input_tokens').notNull(),
    cache_write_tokens: integer('cache_write_tokens').notNull(),
    output_tokens: integer('output_tokens').notNull(),
    reasoning_tokens: integer('reasoning_tokens').notNull(),
    cost: money('cost').notNull(),
    latency_ms: integer('latency_ms').notNull(),
    time_to_first_token_ms: integer('time_to_first_token_ms'),
    status: varchar('status', { length: 16 }).notNull(),
    error: text('error'),
    /** The provider reported no usage (an aborted stream): tokens are estimated. */
    estimated: boolean('estimated').notNull(),
    attempts: integer('attempts').notNull(),
    started_at: timestamp('started_at', { withTimezone: true }).notNull(),
  },
  (t) => [
    index('ix_usage_records_owner_id_created_at').on(t.owner_id, t.created_at),
    index('ix_usage_records_api_key_id_created_at').on(t.api_key_id, t.created_at),
    index('ix_usage_records_project_id_created_at').on(t.project_id, t.created_at),
  ],
);

export type UsageRecordRow = typeof usageRecords.$inferSelect;
export type NewUsageRecordRow = typeof usageRecords.$inferInsert;

// ==================== Credits ====================

/**
 * A user's credits: `balance` always equals the sum of the user's ledger; `reserved` is what
 * running calls hold (the sum of their reservations). A call may reserve only `balance - reserved`.
 */
export const creditAccounts = pgTable(
  'credit_accounts',
  {
    ...baseColumns,
    user_id: uuid('user_id')
      .notNull()
      .unique('uq_credit_accounts_user_id')
      .references(() => users.id, { onDelete: 'cascade' }),
    balance: money('balance').notNull().default('0'),
    reserved: money('reserved').notNull().default('0'),
    /**
     * How many ledger entries the account has: the ledger list's total, kept by a trigger on every
     * insert into credit_transactions (migrations 0016-0017), so a page of a long history is not a
     * count of it (300,000 entries: 0.4 s on PGlite).
     */
    entries: bigint('entries', { mode: 'number' }).notNull().default(0),
  },
  (t) => [check('ck_credit_accounts_reserved', sql`${t.reserved} >= 0`)],
);

export type CreditAccount = typeof creditAccounts.$inferSelect;

export const creditTransactionType = pgEnum('credit_transaction_type', ['grant', 'usage', 'refund', 'adjustment']);

/** The ledger: every change of a balance, signed (`usage` negative), with the balance after it. */
export const creditTransactions = pgTable(
  'credit_transactions',
  {
    ...baseColumns,
    owner_id: uuid('owner_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    type: creditTransactionType('type').notNull(),
    amount: money('amount').notNull(),
    balance_after: money('balance_after').notNull(),
    description: text('description'),
    /** usage: the call's usage record (written in a later batch), key and project. */
    usage_record_id: uuid('usage_record_id'),
    api_key_id: uuid('api_key_id'),
    project_id: uuid('project_id'),
    /** grant/refund/adjustment: the superuser who made it. */
    created_by: uuid('created_by').references(() => users.id, { onDelete: 'set null' }),
  },
  (t) => [
    // The ledger's order (newest first, ties by id): a page is read off the index, never sorted.
    index('ix_credit_transactions_owner_id_created_at_id').on(t.owner_id, t.created_at, t.id),
    index('ix_credit_transactions_created_by').on(t.created_by),
    // One usage entry per call: a settlement sent twice (a retry, and its first attempt reaching
    // the server late) fails whole the second time, balance included, instead of charging again.
    uniqueIndex('ux_credit_transactions_usage_record_id').on(t.usage_record_id).where(sql`${t.type} = 'usage'`),
  ],
);

export type CreditTransaction = typeof creditTransactions.$inferSelect;
export type NewCreditTransaction = typeof creditTransactions.$inferInsert;

/**
 * Credits (and API-key budget) held by one running call. Settling deletes the row; the sweep
 * releases rows past `expires_at` (their process died before settling).
 */
export const creditReservations = pgTable(
  'credit_reservations',
  {
    ...baseColumns,
    expires_at: timestamp('expires_at', { withTimezone: true }).notNull(),
    user_id: uuid('user_id').references(() => users.id, { onDelete: 'cascade' }),
    api_key_id: uuid('api_key_id').references(() => apiKeys.id, { onDelete: 'set null' }),
    /** Held from the user's account (0 when billing is off). */
    account_amount: money('account_amount').notNull(),
    /** Held from the API key's budget (0 when the key has none). */
    key_amount: money('key_amount').notNull(),
  },
  (t) => [
    index('ix_credit_reservations_expires_at').on(t.expires_at),
    index('ix_credit_reservations_user_id').on(t.user_id),
    index('ix_credit_reservations_api_key_id').on(t.api_key_id),
  ],
);
