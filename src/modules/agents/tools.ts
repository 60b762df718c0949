/**
 * The tools an agent may name in `tools`: the one registry of tool names. The runner gives each
 * name its implementation; an agent naming anything else is refused (422) when it is saved.
 */
export const TOOL_NAMES = ['knowledge_search'] as const;
export type ToolName = (typeof TOOL_NAMES)[number];

export function isToolName(name: string): name is ToolName {
  return (TOOL_NAMES as readonly string[]).includes(name);
}
