import { z } from 'zod';

import { Id, integerParam, Pagination, Text, Timestamp } from './common.js';

export const RunStatus = z.enum(['queued', 'running', 'completed', 'failed', 'cancelled']);
export const MultitaskStrategy = z
  .enum(['reject', 'enqueue', 'interrupt'])
  .describe('When the thread already has an active run: `reject` answers 409, `enqueue` queues this run behind it, `interrupt` cancels it.');

const Input = Text.min(1).describe('The text of a user message, appended to the thread before the run (at most MAX_MESSAGE_CHARS characters).');

export const RunCreate = z
  .strictObject({
    agent_id: Id.optional().describe('Default: the user\'s default agent.'),
    input: Input.optional().describe('The text of a user message, appended to the thread before the run (at most MAX_MESSAGE_CHARS characters). Without it the run answers the thread as it is: a thread with no message for the model to read answers 422.'),
    model: z.string().min(1).max(255).optional().describe('A catalog model (id or alias) instead of the agent\'s.'),
    multitask_strategy: MultitaskStrategy.default('reject'),
  })
  .meta({ id: 'RunCreate' });
export type RunCreate = z.infer<typeof RunCreate>;

/**
 * A retry's query: how it meets a run active on the thread now. Not the retried run's strategy: a
 * retry of an old `interrupt` run cancelled whatever run the thread had then, one the user never named.
 */
export const RunRetryQuery = z.strictObject({
  multitask_strategy: MultitaskStrategy.default('reject').describe(
    'When the thread has an active run now: `reject` (default) answers 409 naming it, `enqueue` queues the retry behind it, `interrupt` cancels it. The retried run\'s own strategy is not reused.',
  ),
});
export type RunRetryQuery = z.infer<typeof RunRetryQuery>;

export const RunCreateWithThread = z
  .strictObject({
    agent_id: Id.optional().describe('Default: the user\'s default agent.'),
    input: Input,
    model: z.string().min(1).max(255).optional(),
    thread: z.strictObject({ title: Text.trim().max(255).default(''), project_id: Id.nullable().optional() }).optional(),
  })
  .meta({ id: 'RunCreateWithThread' });
export type RunCreateWithThread = z.infer<typeof RunCreateWithThread>;

export const RunUsage = z
  .object({ input_tokens: z.number().int(), output_tokens: z.number().int(), cached_input_tokens: z.number().int(), reasoning_tokens: z.number().int() })
  .meta({ id: 'RunUsage' });

export const RunPublic = z
  .object({
    id: Id,
    owner_id: Id,
    thread_id: Id,
    project_id: Id.nullable(),
    agent_id: Id.nullable(),
    agent_version: z.number().int(),
    model: z.string(),
    status: RunStatus,
    multitask_strategy: MultitaskStrategy,
    input: z.string().nullable(),
    error: z.string().nullable().describe('Why the run failed, in words the user can act on.'),
    usage: RunUsage,
    cost: z.string().describe('Decimal string, credits (USD).'),
    steps: z.number().int(),
    attempts: z.number().int(),
    started_at: Timestamp.nullable(),
    ended_at: Timestamp.nullable(),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'RunPublic' });

export const RunIdParams = z.object({ run_id: Id });
export const ThreadIdParams = z.object({ thread_id: Id });

export const RunListQuery = Pagination.extend({ status: RunStatus.optional() });
export type RunListQuery = z.infer<typeof RunListQuery>;

export const RunEventsQuery = z.strictObject({
  after: integerParam(0, Number.MAX_SAFE_INTEGER).optional().describe('Resume after this event seq (as the `Last-Event-ID` header does).'),
});
