import { sql } from 'drizzle-orm';
import { boolean, check, index, integer, json, jsonb, numeric, pgEnum, pgTable, primaryKey, text, timestamp, uniqueIndex, uuid, varchar } from 'drizzle-orm/pg-core';

import { agents } from './agent.js';
import { apiKeys } from './api-key.js';
import { baseColumns } from './columns.js';
import { projects } from './project.js';
import { threads } from './thread.js';
import { users } from './user.js';

/** `queued → running → completed | failed | cancelled`; the last three are final and never change. */
export const runStatus = pgEnum('run_status', ['queued', 'running', 'completed', 'failed', 'cancelled']);
export const multitaskStrategy = pgEnum('multitask_strategy', ['reject', 'enqueue', 'interrupt']);

export const ACTIVE_RUN_STATUSES = ['queued', 'running'] as const;
export const FINAL_RUN_STATUSES = ['completed', 'failed', 'cancelled'] as const;

/** Tokens a run used, summed over its steps (SPEC §5). */
export interface RunUsage {
  input_tokens: number;
  output_tokens: number;
  cached_input_tokens: number;
  reasoning_tokens: number;
}

export const ZERO_RUN_USAGE: Readonly<RunUsage> = Object.freeze({ input_tokens: 0, output_tokens: 0, cached_input_tokens: 0, reasoning_tokens: 0 });

export const runs = pgTable(
  'runs',
  {
    ...baseColumns,
    owner_id: uuid('owner_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    thread_id: uuid('thread_id')
      .notNull()
      .references(() => threads.id, { onDelete: 'cascade' }),
    /**
     * The thread's project: what its usage is booked to (read at the start) and what a project-scoped
     * key's access to the run reads. An idle thread's move takes its runs along (setThreadRunsProject).
     */
    project_id: uuid('project_id').references(() => projects.id, { onDelete: 'set null' }),
    /** The API key that started the run (its budget and limits apply to the run's model calls). */
    api_key_id: uuid('api_key_id').references(() => apiKeys.id, { onDelete: 'set null' }),
    /**
     * The project a project-scoped key that started the run was limited to (null: the whole
     * account's caller): what the run reads on the caller's behalf (its knowledge searches) stays in
     * it. Recorded at the start, not read from the key, whose row may be gone (api_key_id set null)
     * while the run still works; a working run goes with the project, never outliving its scope.
     * Cleared once the run has ended and its thread moves (crud/run.ts, setThreadRunsProject), so
     * that the old project's delete does not take it; set only on runs that had not ended when
     * migration 0024 added it.
     */
    scope_project_id: uuid('scope_project_id').references(() => projects.id, { onDelete: 'cascade' }),
    agent_id: uuid('agent_id').references(() => agents.id, { onDelete: 'set null' }),
    /** The agent version the run runs (pinned when it was queued). */
    agent_version: integer('agent_version').notNull(),
    /** The catalog model the run calls: the request's `model`, else the agent version's. */
    model: varchar('model', { length: 255 }).notNull(),
    status: runStatus('status').notNull().default('queued'),
    /**
     * Queued behind the thread's active run (`multitask_strategy: enqueue`): such a run is `queued`
     * to clients but does not hold the thread, so the one-active-run index leaves it out.
     */
    waiting: boolean('waiting').notNull().default(false),
    multitask_strategy: multitaskStrategy('multitask_strategy').notNull().default('reject'),
    input: text('input'),
    /** The user message `input` became (null until the run holds the thread, or without input). */
    input_message_id: uuid('input_message_id'),
    error: text('error'),
    usage: jsonb('usage').$type<RunUsage>().notNull().default({ ...ZERO_RUN_USAGE }),
    cost: numeric('cost', { precision: 30, scale: 12 }).notNull().default('0'),
    /** Model calls completed (each one a step: an answer, or tool calls and their results). */
    steps: integer('steps').notNull().default(0),
    /** The worker holding the run while it is `running`, until `lease_expires_at` (renewed as it works). */
    lease_owner: varchar('lease_owner', { length: 255 }),
    lease_expires_at: timestamp('lease_expires_at', { withTimezone: true }),
    /** How many times a worker took the run (a resumed run after a crash counts again). */
    attempts: integer('attempts').notNull().default(0),
    /**
     * Scaled mode: no event of the run's log (its Redis stream) is numbered past this. A worker
     * raises it here before it appends past it (its claim gives it room: RUN_EVENT_SEQ_ROOM); one
     * handing the run back sets it to its exact last seq. A writer taking the run up numbers after
     * it and after the stream's top, so a stream that Redis lost with the worker (FLUSHDB, a restart
     * without persistence) never has a seq a client saw name another event. 1: the start's
     * run.queued. Embedded mode keeps its log in this database and leaves it at 1.
     */
    event_seq_ceiling: integer('event_seq_ceiling').notNull().default(1),
    started_at: timestamp('started_at', { withTimezone: true }),
    ended_at: timestamp('ended_at', { withTimezone: true }),
  },
  (t) => [
    index('ix_runs_owner_id_created_at').on(t.owner_id, t.created_at),
    index('ix_runs_thread_id_created_at').on(t.thread_id, t.created_at),
    index('ix_runs_agent_id').on(t.agent_id),
    index('ix_runs_project_id').on(t.project_id),
    index('ix_runs_api_key_id').on(t.api_key_id),
    index('ix_runs_scope_project_id').on(t.scope_project_id),
    // One active run per thread, whatever the code does: a second start meets this index (409).
    uniqueIndex('ux_runs_thread_id_active')
      .on(t.thread_id)
      .where(sql`${t.status} in ('queued', 'running') and not ${t.waiting}`),
    // The user's active runs (GET /runs/active, the per-user limit) and the sweeper's scans.
    index('ix_runs_owner_id_active').on(t.owner_id).where(sql`${t.status} in ('queued', 'running')`),
    check('ck_runs_waiting_queued', sql`not ${t.waiting} or ${t.status} = 'queued'`),
    index('ix_runs_status_lease').on(t.status, t.lease_expires_at).where(sql`${t.status} in ('queued', 'running') or ${t.lease_owner} is not null`),
  ],
);

/**
 * The append-only event log of a run (embedded mode; scaled mode keeps it in Redis Streams): one row
 * per stored batch of events (`seq` … `last_seq`, contiguous), as the log stores them together (a
 * start's `run.queued`, a flush of streamed deltas, a step's end). A row costs PGlite about as much
 * as an event did (the insert, its key, the foreign key's check), so a run's ~10 events cost ~3 rows.
 */
export const runEvents = pgTable(
  'run_events',
  {
    run_id: uuid('run_id')
      .notNull()
      .references(() => runs.id, { onDelete: 'cascade' }),
    /** The first event's seq. */
    seq: integer('seq').notNull(),
    last_seq: integer('last_seq').notNull(),
    /** The last event's name: whether the log has ended, without reading the events. */
    last_event: varchar('last_event', { length: 32 }).notNull(),
    /** `[{seq, event, data}]` in seq order; json, not jsonb: stored and read back as written, never queried into. */
    events: json('events').$type<StoredRunEvent[]>().notNull(),
    created_at: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
  },
  (t) => [primaryKey({ name: 'run_events_pkey', columns: [t.run_id, t.seq] })],
);

/** One event as a row of run_events holds it. */
export interface StoredRunEvent {
  seq: number;
  event: string;
  data: Record<string, unknown>;
}

export type Run = typeof runs.$inferSelect;
export type NewRun = typeof runs.$inferInsert;
export type RunStatus = Run['status'];
export type RunEventRow = typeof runEvents.$inferSelect;
