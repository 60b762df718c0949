import type { FastifyRequest } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { AccountQuery, Balance, CreditGrant, CreditTransactionPublic, SummaryQuery, TransactionIdParams, TransactionsQuery, UsageSummary } from '../schemas/billing.js';
import { authErrors, ErrorBody, listOf } from '../schemas/common.js';

import * as billingService from '../services/billing-service.js';
import { contextOf } from '../services/context.js';
import { ensureSuperuser, requireUser } from '../utils/authentication.js';

const tags = ['billing'];

/**
 * Credits (balance, ledger, grants) and usage. Personal: each caller reads their own account; a
 * superuser reads another's by naming it (`?user_id=`) and any ledger entry by its id.
 */
export const billingRouter: FastifyPluginAsyncZod = async (app) => {
  app.addHook('onRequest', requireUser);
  /**
   * What this process charged the account read before the read is in it: a balance read right after
   * a call shows the call. Whoever may not read that account learns so (403) before anything is written.
   */
  const chargesWritten = async (request: FastifyRequest) => {
    const { user_id: userId } = request.query as { user_id?: string };
    await app.meter.written(billingService.accountOf(request.principal, userId));
  };

  app.get(
    '/billing/balance',
    {
      schema: {
        operationId: 'get_balance',
        summary: 'Get Balance',
        description: 'The caller’s credits (a superuser: any user’s, with `user_id`). A project-scoped key reads its account’s balance.',
        tags,
        querystring: AccountQuery,
        response: { 200: Balance, 404: ErrorBody, ...authErrors },
      },
      preHandler: chargesWritten,
    },
    async (request) => billingService.balance(contextOf(request), request.query.user_id),
  );

  app.get(
    '/billing/transactions',
    {
      schema: {
        operationId: 'list_transactions',
        summary: 'List Transactions',
        description:
          'The ledger, newest first: grants, usage (negative), refunds, adjustments, each with the balance after it (a superuser: any user’s, with `user_id`). A project-scoped key sees its project’s usage entries.',
        tags,
        querystring: TransactionsQuery,
        response: { 200: listOf(CreditTransactionPublic), 404: ErrorBody, ...authErrors },
      },
      preHandler: chargesWritten,
    },
    async (request) => billingService.listTransactions(contextOf(request), request.query),
  );

  app.get(
    '/billing/transactions/:transaction_id',
    {
      schema: {
        operationId: 'get_transaction',
        summary: 'Get Transaction',
        description: 'One ledger entry of the caller’s (a superuser: anyone’s, such as the grant a `POST /billing/credits` names in its Location).',
        tags,
        params: TransactionIdParams,
        response: { 200: CreditTransactionPublic, 404: ErrorBody, ...authErrors },
      },
    },
    async (request) => billingService.getTransaction(contextOf(request), request.params.transaction_id),
  );

  app.post(
    '/billing/credits',
    {
      schema: {
        operationId: 'add_credits',
        summary: 'Add Credits',
        description: 'Superusers only: grant (default), refund, or adjust (may be negative) a user’s credits. The balance and its ledger entry change together. 404: no such user; 409: an adjustment that would take more than is available, or an amount that would take the balance past the most an account holds (999999999999999999.999999999999).',
        tags,
        body: CreditGrant,
        response: { 200: CreditTransactionPublic, 404: ErrorBody, 409: ErrorBody, ...authErrors },
      },
      // Before the body is read: a caller who may not grant learns that (403), not what its body lacks (422).
      onRequest: async (request) => ensureSuperuser(request.principal),
      // What this process charged the account, and its credit window's block no call is using, are
      // written and given back first: an adjustment right after the user's calls was refused (409)
      // for credit "held for calls not yet settled" though none was in progress.
      preHandler: async (request) => app.meter.written(request.body.user_id),
    },
    async (request, reply) => {
      const created = await billingService.grant(contextOf(request), request.body);
      void reply.header('location', `${app.prefix}/billing/transactions/${created.id}`);
      return created;
    },
  );

  app.get(
    '/billing/summary',
    {
      schema: {
        operationId: 'get_usage_summary',
        summary: 'Get Usage Summary',
        description:
          'Model calls, tokens and cost from `from` (inclusive) to `to`: a date-time `to` is exclusive, a bare-date `to` includes that whole day (UTC); grouped by model and day unless `group_by` says otherwise (a superuser: any user’s, with `user_id`). A project-scoped key sees its project’s usage. Grouped by `day`, the range may span at most BILLING_SUMMARY_MAX_DAYS days (366 by default; 422 on `from` past it); otherwise any range.',
        tags,
        querystring: SummaryQuery,
        response: { 200: UsageSummary, 404: ErrorBody, ...authErrors },
      },
      preHandler: chargesWritten,
    },
    async (request) => billingService.summary(contextOf(request), request.query),
  );
};
