import { z } from 'zod';

import { TOOL_NAMES } from '../modules/agents/tools.js';
import { Id, integerParam, Metadata, Pagination, Tags, Text, Timestamp } from './common.js';

/** Longest system prompt, in characters. */
export const SYSTEM_PROMPT_MAX_CHARS = 100_000;
/** Most knowledge folders (and, apart, entries) one agent searches. */
export const KNOWLEDGE_MAX_IDS = 100;

const unique = <T>(items: T[]) => [...new Set(items)];

const IdList = z.array(Id).max(KNOWLEDGE_MAX_IDS).overwrite(unique);

export const AgentKnowledge = z
  .strictObject({ folder_ids: IdList.default([]), entry_ids: IdList.default([]) })
  .meta({ id: 'AgentKnowledge', description: 'The knowledge folders and entries the agent searches (with the knowledge_search tool).' });
export type AgentKnowledge = z.infer<typeof AgentKnowledge>;

export const AgentKnowledgePublic = z
  .object({
    agent_id: Id,
    version: z.number().int().describe('The agent\'s current version: a change of its knowledge makes a new one.'),
    folder_ids: z.array(Id),
    entry_ids: z.array(Id),
    folders: z.array(z.object({ id: Id, name: z.string() })).describe('The assigned folders that still exist, with their names.'),
    entries: z
      .array(z.object({ id: Id, filename: z.string(), folder_id: Id, status: z.enum(['pending', 'processing', 'ready', 'failed']) }))
      .describe('The assigned entries that still exist, with their names and ingestion status.'),
  })
  .meta({ id: 'AgentKnowledgePublic' });

const ToolName = z.enum(TOOL_NAMES, { error: (issue) => `Unknown tool ${JSON.stringify(issue.input)}; the tools are: ${TOOL_NAMES.join(', ')}` });

/** What the agent does: a change to any of these makes a new version. */
const BehaviourFields = {
  system_prompt: Text.max(SYSTEM_PROMPT_MAX_CHARS),
  model: z.string().trim().min(1).max(255).describe('A catalog model id or alias (stored as the id); it must be enabled and able to chat.'),
  temperature: z.number().min(0).max(2).nullable(),
  max_output_tokens: z.number().int().min(1).max(1_000_000).nullable(),
  tools: z.array(ToolName).max(64).overwrite(unique),
  knowledge: AgentKnowledge,
};

const AgentFields = {
  name: Text.trim().min(1).max(255),
  description: Text.max(10_000).nullable(),
  project_id: Id.nullable(),
  ...BehaviourFields,
  is_default: z.boolean().describe("The user's default agent (runs started without an agent use it); setting one unsets the previous."),
  tags: Tags,
  metadata: Metadata,
};

export const AgentCreate = z
  .strictObject({
    ...AgentFields,
    description: AgentFields.description.optional(),
    project_id: AgentFields.project_id.optional(),
    system_prompt: AgentFields.system_prompt.default(''),
    temperature: AgentFields.temperature.optional(),
    max_output_tokens: AgentFields.max_output_tokens.optional(),
    tools: AgentFields.tools.default([]),
    knowledge: AgentFields.knowledge.default({ folder_ids: [], entry_ids: [] }),
    is_default: AgentFields.is_default.default(false),
    tags: AgentFields.tags.default([]),
    metadata: AgentFields.metadata.default({}),
  })
  .meta({ id: 'AgentCreate' });
export type AgentCreate = z.infer<typeof AgentCreate>;

export const AgentUpdate = z.strictObject(AgentFields).partial().meta({ id: 'AgentUpdate' });
export type AgentUpdate = z.infer<typeof AgentUpdate>;

const BehaviourPublic = {
  system_prompt: z.string(),
  model: z.string(),
  temperature: z.number().nullable(),
  max_output_tokens: z.number().int().nullable(),
  tools: z.array(z.string()),
  knowledge: z.object({ folder_ids: z.array(Id), entry_ids: z.array(Id) }),
};

export const AgentPublic = z
  .object({
    id: Id,
    owner_id: Id,
    project_id: Id.nullable(),
    name: z.string(),
    description: z.string().nullable(),
    ...BehaviourPublic,
    is_default: z.boolean(),
    tags: z.array(z.string()),
    metadata: z.record(z.string(), z.unknown()),
    version: z.number().int().describe('The current version number (see /agents/{id}/versions).'),
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'AgentPublic' });

export const AgentVersionPublic = z
  .object({
    id: Id,
    agent_id: Id,
    version: z.number().int(),
    ...BehaviourPublic,
    created_at: Timestamp,
    updated_at: Timestamp,
  })
  .meta({ id: 'AgentVersionPublic' });

export const AgentIdParams = z.object({ agent_id: Id });
export const AgentVersionParams = z.object({ agent_id: Id, version: integerParam(1, 2_147_483_647) });

/** `?project_id=` lists the agents of one project. */
export const AgentListQuery = Pagination.extend({ project_id: Id.optional() });
export type AgentListQuery = z.infer<typeof AgentListQuery>;
