import { z } from 'zod';

import { Id, Metadata, Pagination, Text, Timestamp } from './common.js';

// ==================== Threads ====================

export const ThreadStatus = z.enum(['idle', 'busy']).describe('`busy` while a run works on the thread; set by runs, read-only for clients.');

const ThreadFields = {
  title: Text.trim().max(255),
  project_id: Id.nullable(),
  metadata: Metadata,
};

export const ThreadCreate = z
  .strictObject({
    title: ThreadFields.title.default(''),
    project_id: ThreadFields.project_id.optional(),
    metadata: ThreadFields.metadata.default({}),
  })
  .meta({ id: 'ThreadCreate' });
export type ThreadCreate = z.infer<typeof ThreadCreate>;

export const ThreadUpdate = z.strictObject(ThreadFields).partial().meta({ id: 'ThreadUpdate' });
export type ThreadUpdate = z.infer<typeof ThreadUpdate>;

export const ThreadPublic = z
  .object({
    id: Id,
    owner_id: Id,
    project_id: Id.nullable(),
    title: z.string(),
    status: ThreadStatus,
    metadata: z.record(z.string(), z.unknown()),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'ThreadPublic' });

/** `?project_id=` and `?status=` narrow the list. */
export const ThreadListQuery = Pagination.extend({ project_id: Id.optional(), status: ThreadStatus.optional() });
export type ThreadListQuery = z.infer<typeof ThreadListQuery>;

// ==================== Messages ====================

export const MessageRole = z.enum(['user', 'assistant', 'system', 'tool']);

const CLIENT_ROLE = 'Clients post user messages; assistant and tool messages come from runs, and the system prompt from the agent';

const MessageFields = {
  // The length limit is the MAX_MESSAGE_CHARS setting, checked by the service (422 string_too_long).
  content: Text.min(1).describe('The text of the message; at most MAX_MESSAGE_CHARS characters (default 100000).'),
  metadata: Metadata,
};

export const MessageCreate = z
  .strictObject({
    role: z.literal('user', { error: CLIENT_ROLE }).default('user'),
    content: MessageFields.content,
    metadata: MessageFields.metadata.default({}),
  })
  .meta({ id: 'MessageCreate' });
export type MessageCreate = z.infer<typeof MessageCreate>;

export const MessageUpdate = z
  .strictObject(MessageFields)
  .partial()
  .meta({ id: 'MessageUpdate', description: 'Any message\'s metadata; the content of user messages only.' });
export type MessageUpdate = z.infer<typeof MessageUpdate>;

export const MessageToolCall = z
  .object({ id: z.string(), name: z.string(), arguments: z.record(z.string(), z.unknown()) })
  .meta({ id: 'MessageToolCall' });

export const MessagePublic = z
  .object({
    id: Id,
    thread_id: Id,
    role: MessageRole,
    content: z.string(),
    tool_calls: z.array(MessageToolCall).nullable(),
    tool_call_id: z.string().nullable(),
    run_id: Id.nullable(),
    metadata: z.record(z.string(), z.unknown()),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'MessagePublic' });

/** Oldest first; `?after=<message id>` continues after that message (cursor paging). */
export const MessageListQuery = Pagination.extend({ after: Id.optional() });
export type MessageListQuery = z.infer<typeof MessageListQuery>;
