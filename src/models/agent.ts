import { sql } from 'drizzle-orm';
import { boolean, doublePrecision, index, integer, jsonb, pgTable, text, uniqueIndex, uuid, varchar } from 'drizzle-orm/pg-core';

import { baseColumns } from './columns.js';
import { projects } from './project.js';
import { users } from './user.js';

/** The knowledge an agent searches: folders and single entries, by id. */
export interface AgentKnowledge {
  folder_ids: string[];
  entry_ids: string[];
}

/** What an agent does: every change to one of these makes a new numbered version. */
const behaviourColumns = {
  system_prompt: text('system_prompt').notNull().default(''),
  /** A catalog model id (an alias given by the client is stored as the id it names). */
  model: varchar('model', { length: 255 }).notNull(),
  temperature: doublePrecision('temperature'),
  max_output_tokens: integer('max_output_tokens'),
  tools: jsonb('tools').$type<string[]>().notNull().default([]),
  knowledge: jsonb('knowledge').$type<AgentKnowledge>().notNull().default({ folder_ids: [], entry_ids: [] }),
};

export const agents = pgTable(
  'agents',
  {
    ...baseColumns,
    owner_id: uuid('owner_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    project_id: uuid('project_id').references(() => projects.id, { onDelete: 'cascade' }),
    name: varchar('name', { length: 255 }).notNull(),
    description: text('description'),
    ...behaviourColumns,
    is_default: boolean('is_default').notNull().default(false),
    tags: jsonb('tags').$type<string[]>().notNull().default([]),
    metadata: jsonb('metadata').$type<Record<string, unknown>>().notNull().default({}),
    /** The number of the current version (a row of agent_versions). */
    version: integer('version').notNull().default(1),
  },
  (t) => [
    index('ix_agents_owner_id_created_at').on(t.owner_id, t.created_at),
    index('ix_agents_project_id_created_at').on(t.project_id, t.created_at),
    // One default agent per user, whatever the code does.
    uniqueIndex('ux_agents_owner_id_default').on(t.owner_id).where(sql`${t.is_default}`),
  ],
);

/** A snapshot of what an agent did from one change to the next; a run pins the version it ran. */
export const agentVersions = pgTable(
  'agent_versions',
  {
    ...baseColumns,
    agent_id: uuid('agent_id')
      .notNull()
      .references(() => agents.id, { onDelete: 'cascade' }),
    version: integer('version').notNull(),
    ...behaviourColumns,
  },
  (t) => [uniqueIndex('ux_agent_versions_agent_id_version').on(t.agent_id, t.version)],
);

export type Agent = typeof agents.$inferSelect;
export type NewAgent = typeof agents.$inferInsert;
export type AgentVersion = typeof agentVersions.$inferSelect;
export type NewAgentVersion = typeof agentVersions.$inferInsert;
