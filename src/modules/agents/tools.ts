import type { JSONSchema7 } from 'ai';

/**
 * The tools an agent may name in `tools`: the one registry of tool names. The runner gives each
 * name its implementation; an agent naming anything else is refused (422) when it is saved.
 */
export const TOOL_NAMES = ['knowledge_search'] as const;
export type ToolName = (typeof TOOL_NAMES)[number];

export function isToolName(name: string): name is ToolName {
  return (TOOL_NAMES as readonly string[]).includes(name);
}

// ==================== Definitions and implementations ====================

/** What the model is told about a tool: its purpose and the JSON Schema of its input. */
export interface ToolDefinition {
  description: string;
  parameters: JSONSchema7;
}

export const TOOL_DEFINITIONS: Readonly<Record<ToolName, ToolDefinition>> = {
  knowledge_search: {
    description: 'Searches the knowledge assigned to this agent (its folders and entries) and returns the most relevant passages with their sources.',
    parameters: {
      type: 'object',
      properties: {
        query: { type: 'string', description: 'What to look for, in words.' },
        top_k: { type: 'integer', minimum: 1, maximum: 20, description: 'How many passages to return (default 5).' },
      },
      required: ['query'],
      additionalProperties: false,
    },
  },
};

/** A passage a tool's answer drew on: what the run's final message cites (`metadata.sources`). */
export interface ToolSource {
  entry_id: string;
  filename: string;
  chunk_index: number;
  heading_path: string[];
  score: number;
}

/** What a tool implementation gets besides its input: whose run it serves, and the run's signal. */
export interface ToolCallContext {
  run_id: string;
  thread_id: string;
  owner_id: string;
  /** The thread's project (what the run's usage is booked to). */
  project_id: string | null;
  /** The API key that started the run, if one did (its budget and limits meter the tools' model calls). */
  api_key_id: string | null;
  /** The project a project-scoped key that started the run was limited to: what tools read stays in it (null: the owner's whole account). */
  scope_project_id: string | null;
  agent: { id: string; version: number; knowledge: { folder_ids: string[]; entry_ids: string[] } };
  /** Aborts with the run (cancel, deadline, shutdown): stop work and return. */
  signal: AbortSignal;
  /** Records the sources this call's answer drew on; the run's final message cites them. */
  cite: (sources: ToolSource[]) => void;
}

/** Runs one call of a tool; the result (text, or a value sent as JSON) goes back to the model. */
export type ToolImplementation = (input: unknown, context: ToolCallContext) => Promise<unknown>;

/**
 * The implementations a server has, by tool name (given to buildApp). A tool an agent names
 * without an implementation here answers the model with an error result; the run goes on.
 */
export type ToolImplementations = Partial<Record<ToolName, ToolImplementation>>;
