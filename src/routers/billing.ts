import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';

import { Balance, CreditGrant, CreditTransactionPublic, SummaryQuery, TransactionIdParams, UsageSummary } from '../schemas/billing.js';
import { authErrors, ErrorBody, listOf, Pagination } from '../schemas/common.js';

import * as billingService from '../services/billing-service.js';
import { contextOf } from '../services/context.js';
import { ensureSuperuser, requireUser } from '../utils/authentication.js';

const tags = ['billing'];

/** Credits (balance, ledger, grants) and usage. Personal: a superuser sees their own here too. */
export const billingRouter: FastifyPluginAsyncZod = async (app) => {
  app.addHook('onRequest', requireUser);
  // What this process charged the caller before this read is in it: a balance read right after a call shows the call.
  app.addHook('preHandler', async (request) => {
    if (request.method === 'GET') await app.meter.written(request.principal.user.id);
  });

  app.get(
    '/billing/balance',
    {
      schema: {
        operationId: 'get_balance',
        summary: 'Get Balance',
        description: 'The caller’s credits. A project-scoped key reads its account’s balance.',
        tags,
        response: { 200: Balance, ...authErrors },
      },
    },
    async (request) => billingService.balance(contextOf(request)),
  );

  app.get(
    '/billing/transactions',
    {
      schema: {
        operationId: 'list_transactions',
        summary: 'List Transactions',
        description: 'The ledger, newest first: grants, usage (negative), refunds, adjustments, each with the balance after it. A project-scoped key sees its project’s usage entries.',
        tags,
        querystring: Pagination,
        response: { 200: listOf(CreditTransactionPublic), ...authErrors },
      },
    },
    async (request) => billingService.listTransactions(contextOf(request), request.query),
  );

  app.get(
    '/billing/transactions/:transaction_id',
    {
      schema: {
        operationId: 'get_transaction',
        summary: 'Get Transaction',
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
        description: 'Superusers only: grant (default), refund, or adjust (may be negative) a user’s credits. The balance and its ledger entry change together. 404: no such user; 409: an adjustment that would take more than is available.',
        tags,
        body: CreditGrant,
        response: { 200: CreditTransactionPublic, 404: ErrorBody, 409: ErrorBody, ...authErrors },
      },
      // Before the body is read: a caller who may not grant learns that (403), not what its body lacks (422).
      onRequest: async (request) => ensureSuperuser(request.principal),
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
        description: 'Model calls, tokens and cost in [from, to), grouped by model and day unless `group_by` says otherwise. A project-scoped key sees its project’s usage.',
        tags,
        querystring: SummaryQuery,
        response: { 200: UsageSummary, ...authErrors },
      },
    },
    async (request) => billingService.summary(contextOf(request), request.query),
  );
};
