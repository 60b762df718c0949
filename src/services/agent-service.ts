import { type Db, transaction } from '../core/db.js';
import { UnprocessableError } from '../core/errors.js';

import { type Agent, agents, type AgentVersion } from '../models/index.js';

import type { AgentCreate, AgentKnowledge, AgentListQuery, AgentUpdate } from '../schemas/agent.js';

import { agentCrud, agentPolicy, clearDefault, pruneVersions, versionCrud } from '../crud/agent.js';
import type { CursorPage } from '../crud/child.js';
import { type KnowledgeRefs, usableKnowledge } from '../crud/knowledge.js';
import { matching } from '../crud/owned.js';
import * as userCrud from '../crud/user.js';
import type { ModelManager } from '../modules/ai-models/index.js';
import { refuseScopedKey } from '../utils/access.js';
import type { ServiceContext } from './context.js';
import { createWithinLimit } from './limits.js';
import { placeInProject } from './project-service.js';

// ==================== Rules ====================

/** What an agent does: a change to any of these makes a new version. */
const BEHAVIOUR = ['system_prompt', 'model', 'temperature', 'max_output_tokens', 'tools', 'knowledge'] as const;
type Behaviour = Pick<Agent, (typeof BEHAVIOUR)[number]>;

/** The behaviour fields a change sets (undefined: left as they are). */
const behaviourChanges = (input: AgentUpdate): Partial<Behaviour> => Object.fromEntries(BEHAVIOUR.filter((key) => input[key] !== undefined).map((key) => [key, input[key]]));

function behaviourOf(row: Behaviour): Behaviour {
  const { system_prompt, model, temperature, max_output_tokens, tools, knowledge } = row;
  return { system_prompt, model, temperature, max_output_tokens, tools, knowledge: { folder_ids: knowledge.folder_ids, entry_ids: knowledge.entry_ids } };
}

const sameBehaviour = (a: Behaviour, b: Behaviour) => JSON.stringify(behaviourOf(a)) === JSON.stringify(behaviourOf(b));

const versionOf = (agent: Agent) => ({ agent_id: agent.id, version: agent.version, ...behaviourOf(agent) });

/**
 * The id an agent calls an enabled chat model named by id or alias with (the catalog id; a pinned
 * snapshot's own, see `ModelCatalog.modelAsCalled`); 422 naming the model otherwise.
 * Whether its provider has credentials is not asked: they may be set after the agent is saved.
 */
export function catalogModel(models: ModelManager, name: string): string {
  const model = models.modelAsCalled(name);
  const issue = (msg: string) => new UnprocessableError({ loc: ['body', 'model'], msg, type: 'value_error' });
  if (!model) throw issue(`Unknown model ${JSON.stringify(name)}; GET /models lists the catalog`);
  if (!model.enabled) throw issue(`Model ${JSON.stringify(model.id)} is disabled`);
  if (!model.capabilities.includes('chat')) throw issue(`Model ${JSON.stringify(model.id)} cannot chat; an agent needs a chat model`);
  return model.id;
}

type Knowledge = Agent['knowledge'];

/** Where a request names the knowledge: PATCH and POST in `knowledge`, PUT /agents/{id}/knowledge in the body itself. */
type KnowledgeLoc = string[];

/**
 * Every folder and entry given to an agent must be one its owner may search (with a project-scoped
 * key: one of the key's project); 422 naming each one that is not (unknown, deleted, or another
 * user's — told apart from nothing, so no one learns which ids exist).
 */
async function checkKnowledge(ctx: ServiceContext, db: Db, ownerId: string, knowledge: Knowledge, loc: KnowledgeLoc): Promise<void> {
  const usable = await usableKnowledge(db, ownerId, ctx.principal.scopeProjectId, knowledge);
  const found = new Set([...usable.folders, ...usable.entries].map((ref) => ref.id));
  const issues = (['folder_ids', 'entry_ids'] as const).flatMap((field) =>
    knowledge[field].flatMap((id, i) =>
      found.has(id) ? [] : [{ loc: [...loc, field, String(i)], msg: `${field === 'folder_ids' ? 'Folder' : 'Entry'} ${id} not found among your knowledge base`, type: 'value_error' }],
    ),
  );
  if (issues.length) throw new UnprocessableError(issues);
}

/**
 * Agents (or versions) as the caller may see them: a project-scoped key sees in their `knowledge`
 * only the ids of its project's folders and entries, the only knowledge it may read (an account's
 * agent it reads may name every project's); the others see every id. The agents a scoped key
 * reads are its own account's, as is the knowledge it may read: one query for all the rows.
 */
async function withSeenKnowledge<T extends { knowledge: Knowledge }>(ctx: ServiceContext, rows: T[]): Promise<T[]> {
  const { scopeProjectId: scope, user } = ctx.principal;
  if (scope === null || rows.length === 0) return rows;
  const named = { folder_ids: [...new Set(rows.flatMap((row) => row.knowledge.folder_ids))], entry_ids: [...new Set(rows.flatMap((row) => row.knowledge.entry_ids))] };
  const seen = await usableKnowledge(ctx.db, user.id, scope, named);
  return rows.map((row) => ({ ...row, knowledge: seenIds(row.knowledge, seen) }));
}

/** Of the assignment `knowledge`, the ids of what `seen` holds, in the assignment's order. */
function seenIds(knowledge: Knowledge, seen: KnowledgeRefs): Knowledge {
  const folders = new Set(seen.folders.map((folder) => folder.id));
  const entries = new Set(seen.entries.map((entry) => entry.id));
  return { folder_ids: knowledge.folder_ids.filter((id) => folders.has(id)), entry_ids: knowledge.entry_ids.filter((id) => entries.has(id)) };
}

/**
 * The knowledge a change by the caller sets: what it sent, and — for a project-scoped key — the ids
 * of the agent's knowledge it is not shown (other projects', which the owner assigned): it reads
 * the assignment without them (withSeenKnowledge), and writing back what it read dropped them.
 */
async function keepingUnseen(ctx: ServiceContext, tx: Db, current: Agent, sent: Knowledge): Promise<Knowledge> {
  const scope = ctx.principal.scopeProjectId;
  if (scope === null) return sent;
  const seen = seenIds(current.knowledge, await usableKnowledge(tx, current.owner_id, scope, current.knowledge));
  const kept = (ids: string[], shown: string[], sentIds: string[]) => {
    const skip = new Set([...shown, ...sentIds]);
    return [...sentIds, ...ids.filter((id) => !skip.has(id))];
  };
  return { folder_ids: kept(current.knowledge.folder_ids, seen.folder_ids, sent.folder_ids), entry_ids: kept(current.knowledge.entry_ids, seen.entry_ids, sent.entry_ids) };
}

/** withSeenKnowledge for one agent (or version). */
async function seenOne<T extends { knowledge: Knowledge }>(ctx: ServiceContext, row: T): Promise<T> {
  const [seen] = await withSeenKnowledge(ctx, [row]);
  return seen!;
}

/** The default agent is the account's: a project-scoped key may not change which agent it is (403). */
function checkDefaultChange(ctx: ServiceContext, from: boolean, to: boolean | undefined): void {
  if (to !== undefined && to !== from) refuseScopedKey(ctx.principal);
}

// ==================== Agents ====================

/** The agent, if the caller may read it (404 otherwise); its knowledge as seenOne shows it. */
export async function get(ctx: ServiceContext, id: string): Promise<Agent> {
  return seenOne(ctx, await visible(ctx, id));
}

/** The agent, if the caller may read it, with every knowledge id: what reads of its own parts check first. */
function visible(ctx: ServiceContext, id: string): Promise<Agent> {
  return agentCrud.getVisible(ctx.db, ctx.principal, id);
}

export async function list(ctx: ServiceContext, query: AgentListQuery) {
  const page = await agentCrud.list(ctx.db, ctx.principal, query, matching({ project_id: agents.project_id }, query));
  return { ...page, data: await withSeenKnowledge(ctx, page.data) };
}

/** A new agent and its version 1, in one transaction; `is_default` takes the default from the previous one. */
export async function create(ctx: ServiceContext, input: AgentCreate): Promise<Agent> {
  const ownerId = ctx.principal.user.id;
  const projectId = await placeInProject(ctx, agentPolicy, ownerId, input.project_id);
  checkDefaultChange(ctx, false, input.is_default);
  const model = catalogModel(ctx.models, input.model);
  await checkKnowledge(ctx, ctx.db, ownerId, input.knowledge, ['body', 'knowledge']);
  const limit = { what: 'Agent', max: ctx.settings.MAX_AGENTS_PER_USER, count: (tx: Db) => agentCrud.countOwnedBy(tx, ownerId) };
  // The owner's row is locked (the limit) before any agent row: default changes take the same order.
  const agent = await createWithinLimit(ctx.db, ownerId, limit, async (tx) => {
    if (input.is_default) await clearDefault(tx, ownerId, null);
    const row = await agentCrud.create(tx, { ...input, project_id: projectId, model, owner_id: ownerId, version: 1 });
    await versionCrud.create(tx, versionOf(row));
    return row;
  });
  ctx.log.info({ agentId: agent.id, projectId, model }, 'agent created');
  return seenOne(ctx, agent);
}

/**
 * A change in one transaction: a change to what the agent does (prompt, model, parameters, tools,
 * knowledge — values that differ, not fields merely sent) makes the next version (the oldest
 * past AGENT_VERSIONS_KEPT that no run names are deleted); becoming the
 * default unsets the previous default. The owner's row is locked first when the default changes,
 * so concurrent changes of one user's default run one after the other and the last one wins.
 */
export async function update(ctx: ServiceContext, id: string, input: AgentUpdate): Promise<Agent> {
  return seenOne(ctx, await change(ctx, id, input, ['body', 'knowledge']));
}

/** `update`, with where the request named the knowledge (for its 422s). */
async function change(ctx: ServiceContext, id: string, input: AgentUpdate, knowledgeLoc: KnowledgeLoc): Promise<Agent> {
  const { principal } = ctx;
  const model = input.model === undefined ? undefined : catalogModel(ctx.models, input.model);
  // The owner never changes: read without a lock, to lock the owner's row before the agent's.
  const ownerId = input.is_default || input.project_id !== undefined ? (await agentCrud.getVisible(ctx.db, principal, id, 'write')).owner_id : null;
  const projectId = input.project_id === undefined ? undefined : await placeInProject(ctx, agentPolicy, ownerId!, input.project_id);
  return transaction(ctx.db, async (tx) => {
    if (input.is_default) await userCrud.lockUser(tx, ownerId!);
    const current = await agentCrud.lockVisible(tx, principal, id, 'write', 'update');
    checkDefaultChange(ctx, current.is_default, input.is_default);
    if (input.knowledge) {
      await checkKnowledge(ctx, tx, current.owner_id, input.knowledge, knowledgeLoc);
      input = { ...input, knowledge: await keepingUnseen(ctx, tx, current, input.knowledge) };
    }
    const next = { ...behaviourOf(current), ...behaviourChanges(input), ...(model === undefined ? {} : { model }) };
    const changed = !sameBehaviour(current, next);
    if (input.is_default && !current.is_default) await clearDefault(tx, current.owner_id, current.id);
    const row = await agentCrud.update(tx, principal, id, {
      ...input,
      ...(model === undefined ? {} : { model }),
      ...(projectId === undefined ? {} : { project_id: projectId }),
      ...(changed ? { version: current.version + 1 } : {}),
    });
    if (changed) {
      await versionCrud.create(tx, versionOf(row));
      await pruneVersions(tx, row.id, row.version, ctx.settings.AGENT_VERSIONS_KEPT);
    }
    return row;
  });
}

export function remove(ctx: ServiceContext, id: string): Promise<void> {
  return agentCrud.remove(ctx.db, ctx.principal, id);
}

// ==================== Knowledge ====================

/**
 * The agent's knowledge with the names of what it names (gone ones, or ones a project-scoped key
 * may not see, are left out of `folders` and `entries`; of a scoped key's ids too).
 */
export interface KnowledgeView extends Knowledge, KnowledgeRefs {
  agent_id: string;
  version: number;
}

/** `agent` as stored (every id): a project-scoped key is shown the ids of what it may see, the refs (as withSeenKnowledge shows them). */
async function knowledgeView(ctx: ServiceContext, agent: Agent): Promise<KnowledgeView> {
  const refs = await usableKnowledge(ctx.db, agent.owner_id, ctx.principal.scopeProjectId, agent.knowledge);
  const { folder_ids, entry_ids } = ctx.principal.scopeProjectId === null ? agent.knowledge : seenIds(agent.knowledge, refs);
  return { agent_id: agent.id, version: agent.version, folder_ids, entry_ids, ...refs };
}

export async function getKnowledge(ctx: ServiceContext, id: string): Promise<KnowledgeView> {
  return knowledgeView(ctx, await visible(ctx, id));
}

/** Replaces what the agent searches: a change is a change of behaviour, so it makes a new version (as PATCH does). */
export async function setKnowledge(ctx: ServiceContext, id: string, knowledge: AgentKnowledge): Promise<KnowledgeView> {
  return knowledgeView(ctx, await change(ctx, id, { knowledge }, ['body']));
}

// ==================== Versions ====================

export async function listVersions(ctx: ServiceContext, agentId: string, page: CursorPage) {
  const agent = await visible(ctx, agentId);
  const versions = await versionCrud.list(ctx.db, agent.id, page);
  return { ...versions, data: await withSeenKnowledge(ctx, versions.data) };
}

export async function getVersion(ctx: ServiceContext, agentId: string, version: number): Promise<AgentVersion> {
  const agent = await visible(ctx, agentId);
  return seenOne(ctx, await versionCrud.getIn(ctx.db, agent.id, version));
}
