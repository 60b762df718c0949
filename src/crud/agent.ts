import { and, eq, lte, ne, sql } from 'drizzle-orm';

import type { Db } from '../core/db.js';
import { constraintAnswers } from '../core/error-mapping.js';

import { type Agent, agents, type AgentVersion, agentVersions, knowledgeEntries, knowledgeFolders, type NewAgent, type NewAgentVersion, runs } from '../models/index.js';

import { definePolicy } from '../utils/access.js';
import { childCrud } from './child.js';
import { ownedCrud } from './owned.js';

/**
 * Agents: their owner's (or any superuser's). A project-scoped key reads its project's agents and
 * the account's agents that have no project, and changes or creates only its project's.
 */
export const agentPolicy = definePolicy<Agent>({
  noun: 'Agent',
  owner: agents.owner_id,
  project: agents.project_id,
  scopedKey: 'write',
  scopedKeyReadsUnassigned: true,
  superuserSeesAll: true,
});

export const agentCrud = ownedCrud<Agent, NewAgent>(agents, agentPolicy);

/** An agent's versions, newest first, addressed by number. */
export const versionCrud = childCrud<AgentVersion, NewAgentVersion>(agentVersions, {
  noun: 'Agent version',
  parent: agentVersions.agent_id,
  order: agentVersions.version,
  direction: 'desc',
  key: agentVersions.version,
});

constraintAnswers({
  // The project was deleted between the check and the write: as if it had been missing all along.
  agents_project_id_projects_id_fk: { status: 404, detail: 'Project not found' },
  // Default changes lock the owner's row first, so only a write outside them can meet this.
  ux_agents_owner_id_default: { status: 409, detail: 'Another agent of this user became the default at the same time; try again' },
});

/** Makes every other agent of the owner not the default (before one becomes it, in the same transaction). */
export async function clearDefault(db: Db, ownerId: string, exceptId: string | null): Promise<void> {
  const others = exceptId === null ? undefined : ne(agents.id, exceptId);
  await db
    .update(agents)
    .set({ is_default: false })
    .where(and(eq(agents.owner_id, ownerId), eq(agents.is_default, true), others));
}

/**
 * Deletes the agent's versions older than its newest `kept` (up to `current`) that no run names: a
 * run's `agent_version` stays readable (GET /agents/{id}/versions/{n}, a retry's model), and the
 * version a run about to start pins is the current one, never deleted.
 */
export async function pruneVersions(db: Db, agentId: string, current: number, kept: number): Promise<void> {
  await db
    .delete(agentVersions)
    .where(
      and(
        eq(agentVersions.agent_id, agentId),
        lte(agentVersions.version, current - kept),
        sql`not exists (select 1 from ${runs} where ${runs.agent_id} = ${agentId} and ${runs.agent_version} = ${agentVersions.version})`,
      ),
    );
}

/** Of the assignment's `field` ids (kept in order), those `table` still has a row for: SQL over the agents row being updated. */
function stillThere(field: 'folder_ids' | 'entry_ids', table: typeof knowledgeFolders | typeof knowledgeEntries) {
  return sql`coalesce((select jsonb_agg(ref.id order by ref.n) from jsonb_array_elements_text(${agents.knowledge} -> ${field}) with ordinality as ref(id, n)
    where exists (select 1 from ${table} where ${table.id} = ref.id::uuid)), '[]'::jsonb)`;
}

/**
 * Takes the folders and entries that no longer exist out of the owner's agents' knowledge, in the
 * transaction that deleted them (a folder, an entry, a project's): an agent read and written back
 * as read (a fetch-edit-save client) was otherwise refused with 422 for an id it never chose to
 * keep. The current assignment only: versions keep what the agent searched then (a gone id finds
 * nothing). Ids stored were validated UUIDs, hence the casts; an agent whose knowledge all still
 * exists is left alone (no row written).
 */
export async function forgetDeletedKnowledge(db: Db, ownerId: string): Promise<void> {
  const kept = sql`jsonb_build_object('folder_ids', ${stillThere('folder_ids', knowledgeFolders)}, 'entry_ids', ${stillThere('entry_ids', knowledgeEntries)})`;
  await db
    .update(agents)
    .set({ knowledge: sql`${kept}` })
    .where(and(eq(agents.owner_id, ownerId), sql`${agents.knowledge} is distinct from ${kept}`));
}

/** The user's default agent, if they have one. */
export async function getDefault(db: Db, ownerId: string): Promise<Agent | undefined> {
  const [row] = await db
    .select()
    .from(agents)
    .where(and(eq(agents.owner_id, ownerId), eq(agents.is_default, true)));
  return row;
}
