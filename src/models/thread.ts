import { sql } from 'drizzle-orm';
import { bigint, index, jsonb, pgEnum, pgTable, text, uniqueIndex, uuid, varchar } from 'drizzle-orm/pg-core';

import { baseColumns } from './columns.js';
import { projects } from './project.js';
import { runs } from './run.js';
import { users } from './user.js';

/** `busy` while a run works on the thread (set by runs only; clients read it). */
export const threadStatus = pgEnum('thread_status', ['idle', 'busy']);

export const threads = pgTable(
  'threads',
  {
    ...baseColumns,
    owner_id: uuid('owner_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    project_id: uuid('project_id').references(() => projects.id, { onDelete: 'cascade' }),
    title: varchar('title', { length: 255 }).notNull().default(''),
    status: threadStatus('status').notNull().default('idle'),
    metadata: jsonb('metadata').$type<Record<string, unknown>>().notNull().default({}),
  },
  (t) => [index('ix_threads_owner_id_created_at').on(t.owner_id, t.created_at), index('ix_threads_project_id_created_at').on(t.project_id, t.created_at)],
);

export const messageRole = pgEnum('message_role', ['user', 'assistant', 'system', 'tool']);

/** A tool call an assistant message asks for: the id its tool message answers, the tool, its input. */
export interface MessageToolCall {
  id: string;
  name: string;
  arguments: Record<string, unknown>;
}

export const messages = pgTable(
  'messages',
  {
    ...baseColumns,
    thread_id: uuid('thread_id')
      .notNull()
      .references(() => threads.id, { onDelete: 'cascade' }),
    /** Creation order within the thread (1, 2, ...), given under the thread's lock: the list and cursor order. */
    seq: bigint('seq', { mode: 'number' }).notNull(),
    role: messageRole('role').notNull(),
    content: text('content').notNull().default(''),
    tool_calls: jsonb('tool_calls').$type<MessageToolCall[]>(),
    tool_call_id: varchar('tool_call_id', { length: 255 }),
    /** The run that wrote the message (assistant and tool messages); kept, unlinked, when the run is deleted. */
    run_id: uuid('run_id').references(() => runs.id, { onDelete: 'set null' }),
    metadata: jsonb('metadata').$type<Record<string, unknown>>().notNull().default({}),
  },
  (t) => [
    uniqueIndex('ux_messages_thread_id_seq').on(t.thread_id, t.seq),
    index('ix_messages_run_id').on(t.run_id).where(sql`${t.run_id} is not null`),
  ],
);

export type Thread = typeof threads.$inferSelect;
export type NewThread = typeof threads.$inferInsert;
export type Message = typeof messages.$inferSelect;
export type NewMessage = typeof messages.$inferInsert;
