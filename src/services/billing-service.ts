/** Credits and usage as the API shows them: balance, ledger, grants, usage summary. */
import { DEFAULT_SUMMARY_DAYS } from '../core/config.js';
import { databaseError } from '../core/db-errors.js';
import { ConflictError, NotFoundError, UnprocessableError } from '../core/errors.js';

import type { CreditTransaction } from '../models/index.js';

import { type CreditGrant, DAY_MS, summaryEnd } from '../schemas/billing.js';
import { MIN_INSTANT_MS } from '../schemas/common.js';

import * as billingCrud from '../crud/billing.js';
import type { Page } from '../crud/page.js';
import * as userCrud from '../crud/user.js';
import { addCosts } from '../modules/ai-models/index.js';
import { ensureSuperuser, type Principal } from '../utils/authentication.js';
import type { ServiceContext } from './context.js';
import { formatMoney, nothingLeft } from './money.js';


/**
 * Whose account a read is of: the caller's, or the user a superuser names (`user_id`). Anyone else
 * naming another user is refused (403), a project-scoped key too (SPEC §3: no account resources).
 */
export function accountOf(principal: Principal, userId: string | undefined): string {
  // The query's schema (Id) has put the id in lower case, as ids are stored and credit windows kept.
  if (userId === undefined || userId === principal.user.id) return principal.user.id;
  ensureSuperuser(principal);
  return userId;
}

/**
 * Who a read of that account goes as: the caller, or the named user as they would read it
 * themselves (signed in, no key), so the ledger's and usage's own policies apply unchanged.
 */
async function readerOf(ctx: ServiceContext, userId: string | undefined): Promise<Principal> {
  const id = accountOf(ctx.principal, userId);
  if (id === ctx.principal.user.id) return ctx.principal;
  const user = await userCrud.getById(ctx.db, id);
  if (!user) throw new NotFoundError('User not found');
  return { user, apiKeyId: null, apiKeyLimits: null, scopeProjectId: null };
}

/** The account's balance: a scoped key reads it too (it is what its calls are paid from). */
export async function balance(ctx: ServiceContext, userId?: string) {
  const reader = await readerOf(ctx, userId);
  const { balance, reserved } = await billingCrud.getBalance(ctx.db, reader.user.id);
  return {
    balance: formatMoney(balance),
    reserved: formatMoney(reserved),
    available: addCosts(balance, `-${reserved}`),
    billing_enabled: ctx.settings.BILLING_ENABLED,
  };
}

function present(row: CreditTransaction): CreditTransaction {
  return { ...row, amount: formatMoney(row.amount), balance_after: formatMoney(row.balance_after) };
}

export async function listTransactions(ctx: ServiceContext, query: Page & { user_id?: string }) {
  const reader = await readerOf(ctx, query.user_id);
  const { data, count } = await billingCrud.listTransactions(ctx.db, reader, query);
  return { data: data.map(present), count };
}

/** One ledger entry: the caller's own, or any for a superuser (the entry a grant's Location names). */
export async function getTransaction(ctx: ServiceContext, id: string) {
  return present(billingCrud.transactionEntryPolicy.check(ctx.principal, await billingCrud.transactionCrud.getById(ctx.db, id), 'read'));
}

/** The largest balance `numeric(30, 12)` stores. */
const MAX_BALANCE = `${'9'.repeat(18)}.${'9'.repeat(12)}`;

/** A superuser's grant, refund or adjustment: the balance and its ledger entry change together. */
export async function grant(ctx: ServiceContext, input: CreditGrant) {
  const user = await userCrud.getById(ctx.db, input.user_id);
  if (!user) throw new NotFoundError('User not found');
  const id = await billingCrud
    .changeBalance(ctx.db, { userId: user.id, type: input.type, amount: input.amount, description: input.description, createdBy: ctx.principal.user.id })
    .catch(async (error: unknown) => {
      // Past numeric(30, 12) (22003): every amount a body takes is storable, the sum may not be.
      // Said as the adjustment below it is, with the limit, not as a 422 on a body that is valid.
      if (databaseError(error)?.code !== '22003') throw error;
      const { balance } = await billingCrud.getBalance(ctx.db, user.id);
      throw new ConflictError(`The ${input.type} would take the balance past the most an account holds (${MAX_BALANCE}): balance ${formatMoney(balance)}, amount ${formatMoney(input.amount)}`);
    });
  if (id === null) {
    const { balance, reserved } = await billingCrud.getBalance(ctx.db, user.id);
    // What calls in progress hold is named only when they hold something ("0 of it held" read as the reason).
    const held = nothingLeft(reserved) ? '' : `, ${formatMoney(reserved)} of it held for calls not yet settled`;
    throw new ConflictError(`The adjustment would leave less than nothing: balance ${formatMoney(balance)}${held}`);
  }
  ctx.log.info({ userId: user.id, type: input.type, transactionId: id }, 'credits changed');
  const row = await billingCrud.transactionCrud.getById(ctx.db, id);
  return present(row!);
}

export interface SummaryQuery {
  user_id?: string;
  from?: string;
  to?: string;
  group_by: billingCrud.GroupBy[];
}

/** A length in days as a client reads it: whole, or to two places. */
const formatDays = (days: number): string => `${Number.isInteger(days) ? days : days.toFixed(2)} days`;

/** Usage summed by model, day and/or API key; a scoped key sees its project's usage only. */
export async function summary(ctx: ServiceContext, query: SummaryQuery) {
  const to = query.to ? summaryEnd(query.to) : new Date();
  // A range ending early in the year 1 starts at its first instant, not in the year 0 (which PostgreSQL refuses).
  const from = query.from ? new Date(query.from) : new Date(Math.max(to.getTime() - DEFAULT_SUMMARY_DAYS * DAY_MS, MIN_INSTANT_MS));
  const reader = await readerOf(ctx, query.user_id);
  // Refused before any statement: a range of years by day answered one group per day, model and
  // key. The range's length is capped (so at most one day group more, a range's partial first and
  // last days), wherever it starts: a year from any instant, in any offset, is taken.
  const maxDays = ctx.settings.BILLING_SUMMARY_MAX_DAYS;
  if (query.group_by.includes('day') && to.getTime() - from.getTime() > maxDays * DAY_MS) {
    throw new UnprocessableError({
      loc: ['query', 'from'],
      msg: `A summary grouped by day spans at most ${maxDays} days (BILLING_SUMMARY_MAX_DAYS); [from, to) spans ${formatDays((to.getTime() - from.getTime()) / DAY_MS)}: narrow it, or group by model or api_key alone`,
      type: 'value_error',
    });
  }
  const visible = billingCrud.usagePolicy.where(reader, 'read');
  const rows = await billingCrud.summarize(ctx.db, visible, from, to, query.group_by);
  const total = { calls: 0, input_tokens: 0, cached_input_tokens: 0, cache_write_tokens: 0, output_tokens: 0, reasoning_tokens: 0, cost: '0' };
  const data = rows.map((row) => {
    total.calls += row.calls;
    total.input_tokens += row.input_tokens;
    total.cached_input_tokens += row.cached_input_tokens;
    total.cache_write_tokens += row.cache_write_tokens;
    total.output_tokens += row.output_tokens;
    total.reasoning_tokens += row.reasoning_tokens;
    total.cost = addCosts(total.cost, row.cost);
    return { ...row, cost: formatMoney(row.cost) };
  });
  return { from, to, group_by: query.group_by, data, total };
}
