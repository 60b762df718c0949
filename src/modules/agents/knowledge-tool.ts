/**
 * The built-in `knowledge_search` tool: searches only the folders and entries assigned to the
 * run's agent version, as the run's owner (and, when a project-scoped key started the run, within
 * the project the run recorded as its scope), and answers the model with compact passages and their sources.
 */
import { z } from 'zod';

import { BadRequestError, NotFoundError } from '../../core/errors.js';

import * as userCrud from '../../crud/user.js';
import { type KnowledgeHit, type KnowledgeSearchDeps, searchKnowledge } from '../../services/knowledge/search.js';
import type { Principal } from '../../utils/authentication.js';
import type { ToolCallContext, ToolImplementation, ToolImplementations, ToolSource } from './tools.js';

/** Most characters of passage text one answer carries: the model's context is not the place for whole documents. */
export const KNOWLEDGE_TOOL_MAX_CHARS = 12_000;
const DEFAULT_TOP_K = 5;

/** The tool's input as TOOL_DEFINITIONS tells the model; checked again here, since a model may send anything. */
const KnowledgeSearchInput = z.object({
  query: z.string().trim().min(1).max(2_000),
  top_k: z.number().int().min(1).max(20).optional(),
});

/**
 * The run's owner as a principal: the owner's documents, narrowed to the project the run's
 * project-scoped key was limited to. That scope is the run's own (recorded at its start), not read
 * from the key, whose row a delete may have taken (its cancel still on the way to this worker).
 */
async function principalOf(deps: KnowledgeSearchDeps, context: ToolCallContext): Promise<Principal> {
  const user = await userCrud.getByIdCached(deps.db, context.owner_id);
  if (!user) throw new NotFoundError('the owner of this run no longer exists');
  return { user, apiKeyId: context.api_key_id, apiKeyLimits: null, scopeProjectId: context.scope_project_id };
}

export interface KnowledgePassage extends ToolSource {
  text: string;
}

/** The hits as the model reads them: best first, the text cut so that all of it fits KNOWLEDGE_TOOL_MAX_CHARS. */
export function passagesOf(hits: KnowledgeHit[], maxChars = KNOWLEDGE_TOOL_MAX_CHARS): KnowledgePassage[] {
  let room = maxChars;
  const passages: KnowledgePassage[] = [];
  for (const hit of hits) {
    if (room <= 0) break;
    const text = hit.text.length > room ? `${hit.text.slice(0, room)}…` : hit.text;
    room -= text.length;
    passages.push({ entry_id: hit.entry_id, filename: hit.filename, chunk_index: hit.chunk_index, heading_path: hit.heading_path, score: hit.score, text });
  }
  return passages;
}

export function knowledgeSearchTool(deps: KnowledgeSearchDeps): ToolImplementation {
  return async (input, context) => {
    const parsed = KnowledgeSearchInput.safeParse(input);
    if (!parsed.success) throw new BadRequestError(`invalid input: ${z.prettifyError(parsed.error)}`);
    const { folder_ids, entry_ids } = context.agent.knowledge;
    if (!folder_ids.length && !entry_ids.length) return { passages: [], note: 'No knowledge is assigned to this agent; answer without it.' };
    const principal = await principalOf(deps, context);
    const result = await searchKnowledge(deps, principal, {
      query: parsed.data.query,
      folderIds: folder_ids,
      entryIds: entry_ids,
      topK: parsed.data.top_k ?? DEFAULT_TOP_K,
      // The run's cancel, deadline or shutdown aborts the query's embedding call too.
      signal: context.signal,
      // The run's call context: the embedding is metered to the run and its agent, the key's limits read by the meter.
      context: { user_id: context.owner_id, api_key_id: context.api_key_id, api_key_limits: undefined, project_id: context.project_id, agent_id: context.agent.id, run_id: context.run_id },
    });
    const passages = passagesOf(result.data);
    context.cite(passages.map(({ text: _text, ...source }) => source));
    if (!passages.length) return { passages, note: 'Nothing in the assigned knowledge matched; try other words, or answer without it.' };
    return { passages };
  };
}

/** The tools every server has (a server's own implementations, e.g. in tests, take precedence). */
export function builtinTools(deps: KnowledgeSearchDeps): ToolImplementations {
  return { knowledge_search: knowledgeSearchTool(deps) };
}
