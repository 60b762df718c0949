import { z } from 'zod';

import { Id, MAX_INSTANT_MS, Pagination, STORABLE_YEARS_ERROR, Text, Timestamp, withinStorableYears } from './common.js';

/** A decimal string with up to 12 decimal places (credits), as accepted in bodies: never a JSON number. */
export const MoneyInput = z
  .string()
  .regex(/^-?\d{1,15}(\.\d{1,12})?$/, { error: 'Input should be a decimal string with at most 15 digits before the point and 12 after it' });

/** An amount above zero (a budget), its pattern without a sign: what a client generator shows is what is taken. */
export const PositiveMoneyInput = z
  .string()
  .regex(/^\d{1,15}(\.\d{1,12})?$/, { error: 'Input should be a positive decimal string with at most 15 digits before the point and 12 after it' })
  .refine((v) => /[1-9]/.test(v), { error: 'Input should be a positive decimal string' });

const Money = z.string().meta({ description: 'Credits as a decimal string (exact, up to 12 decimal places)' });

export const Balance = z
  .object({
    balance: Money.meta({ description: 'Credits on the account: the sum of its ledger' }),
    reserved: Money.meta({ description: 'Held by model calls in progress' }),
    available: Money.meta({ description: 'What new calls may reserve: balance - reserved' }),
    billing_enabled: z.boolean().meta({ description: 'Whether model calls are paid from the balance (BILLING_ENABLED)' }),
  })
  .meta({ id: 'Balance' });

export const TransactionType = z.enum(['grant', 'usage', 'refund', 'adjustment']);

export const CreditTransactionPublic = z
  .object({
    id: Id,
    type: TransactionType,
    amount: Money.meta({ description: 'Signed: usage is negative' }),
    balance_after: Money,
    description: z.string().nullable(),
    usage_record_id: Id.nullable(),
    api_key_id: Id.nullable(),
    project_id: Id.nullable(),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'CreditTransactionPublic' });

export const CreditGrant = z
  .strictObject({
    user_id: Id,
    amount: MoneyInput.refine((v) => /[1-9]/.test(v), { error: 'Input should not be zero' }).meta({
      description: 'Credits to add (decimal string); negative only with type `adjustment`',
    }),
    description: Text.trim().min(1).max(1000),
    type: z.enum(['grant', 'refund', 'adjustment']).default('grant'),
  })
  .refine((body) => body.type === 'adjustment' || !body.amount.startsWith('-'), {
    error: 'Input should be positive: only an adjustment may take credits away',
    path: ['amount'],
  })
  .meta({ id: 'CreditGrant' });
export type CreditGrant = z.infer<typeof CreditGrant>;

export const TransactionIdParams = z.object({ transaction_id: Id });

/** `?user_id=`: whose credits a read is of (superusers: any user's; default the caller's). */
const OfUser = { user_id: Id.optional().meta({ description: 'Superusers: another user’s account, read as that user would (default: the caller’s own). Others may name only their own id (403 otherwise).' }) };

/** `?user_id=` alone (the balance). */
export const AccountQuery = z.strictObject(OfUser);

/** `?limit=&offset=&user_id=` (the ledger). */
export const TransactionsQuery = Pagination.extend(OfUser);

const GROUPS = ['model', 'day', 'api_key'] as const;

/** An instant of a summary's range: ISO 8601 with an offset, or a bare date (midnight UTC), in the years 1 to 9999 UTC. */
const RangeBound = () =>
  // Its own words: a union's refusal said only "Invalid input", naming neither form.
  z
    .union([z.iso.datetime({ offset: true }), z.iso.date()], { error: 'Input should be an ISO 8601 date (2026-03-01) or date-time with an offset (2026-03-01T00:00:00Z)' })
    .refine(withinStorableYears, { error: STORABLE_YEARS_ERROR });

const BARE_DATE = /^\d{4}-\d{2}-\d{2}$/;
export const DAY_MS = 86_400_000;

/**
 * The instant a summary's range ends before (exclusive). A bare date names a whole day, so
 * `to=2026-03-31` takes in the 31st: the range ends at the next midnight UTC — at the last
 * storable instant for 9999-12-31, whose next midnight PostgreSQL's ISO 8601 does not write.
 * A date-time is the end itself.
 */
export function summaryEnd(to: string): Date {
  return BARE_DATE.test(to) ? new Date(Math.min(Date.parse(to) + DAY_MS, MAX_INSTANT_MS)) : new Date(to);
}

/** `?from=&to=&group_by=`: a time range (ISO 8601; a bare date is a whole day UTC) and groups, comma-separated. */
export const SummaryQuery = z.strictObject({
  ...OfUser,
  from: RangeBound().optional().meta({ description: 'Start (inclusive); default: 30 days before `to` (at the earliest 0001-01-01)' }),
  to: RangeBound()
    .optional()
    .meta({ description: 'End: a date-time is exclusive; a bare date includes that whole day (`to=2026-03-31` ends at 2026-04-01T00:00:00Z). Default: now' }),
  group_by: z
    .string()
    .default('model,day')
    .transform((value, ctx) => {
      const parts = value.split(',').map((p) => p.trim());
      const bad = parts.filter((p) => !(GROUPS as readonly string[]).includes(p));
      if (bad.length || !parts.length) {
        ctx.addIssue({ code: 'custom', message: `Input should be one or more of ${GROUPS.join(', ')}, comma-separated` });
        return z.NEVER;
      }
      return [...new Set(parts)] as (typeof GROUPS)[number][];
    })
    .meta({ description: 'model, day, api_key, or several comma-separated (default: model,day)' }),
}).refine((q) => !q.from || new Date(q.from) < (q.to ? summaryEnd(q.to) : new Date()), { error: 'Input should be before `to` (default: now)', path: ['from'] });

const Totals = {
  calls: z.number().int(),
  input_tokens: z.number().int(),
  cached_input_tokens: z.number().int(),
  cache_write_tokens: z.number().int(),
  output_tokens: z.number().int(),
  reasoning_tokens: z.number().int(),
  cost: Money,
};

export const UsageSummary = z
  .object({
    from: Timestamp,
    to: Timestamp.describe('The exclusive end the summary covers (a bare date given: the next midnight UTC)'),
    group_by: z.array(z.enum(GROUPS)),
    data: z.array(
      z.object({
        model: z.string().optional(),
        day: z.string().optional().meta({ description: 'YYYY-MM-DD (UTC)' }),
        api_key_id: Id.nullable().optional(),
        ...Totals,
      }),
    ),
    total: z.object(Totals),
  })
  .meta({ id: 'UsageSummary' });
