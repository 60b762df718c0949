import { sql } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';

import { integrityAnswer } from '../../src/core/error-mapping.js';

import { agents } from '../../src/models/index.js';

import { useTestApp } from '../helpers/app.js';
import { bearer, createProject, createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { apiOf, createKey, expectValidationError, type ListBody } from '../helpers/http.js';
import { createFolder } from '../helpers/knowledge.js';

const ctx = useTestApp({ MAX_AGENTS_PER_USER: '4' });
const api = apiOf(ctx);

interface AgentBody {
  id: string;
  owner_id: string;
  project_id: string | null;
  name: string;
  system_prompt: string;
  model: string;
  temperature: number | null;
  max_output_tokens: number | null;
  tools: string[];
  knowledge: { folder_ids: string[]; entry_ids: string[] };
  is_default: boolean;
  tags: string[];
  metadata: Record<string, unknown>;
  version: number;
}

interface VersionBody {
  agent_id: string;
  version: number;
  system_prompt: string;
  model: string;
  temperature: number | null;
  tools: string[];
}

async function createAgent(owner: TestUser, body: Record<string, unknown> = {}, headers = owner.headers): Promise<AgentBody> {
  const response = await api('POST', '/agents', headers, { name: 'Helper', model: 'gpt-4.1', ...body });
  expect(response.statusCode, response.body).toBe(200);
  return response.json<AgentBody>();
}

async function patch(owner: TestUser, id: string, body: Record<string, unknown>): Promise<AgentBody> {
  const response = await api('PATCH', `/agents/${id}`, owner.headers, body);
  expect(response.statusCode, response.body).toBe(200);
  return response.json<AgentBody>();
}

const versions = async (owner: TestUser, id: string, query = '') => (await api('GET', `/agents/${id}/versions${query}`, owner.headers)).json<ListBody<VersionBody>>();

/** The ids of the user's default agents, straight from the table. */
async function defaults(owner: TestUser): Promise<string[]> {
  const rows = await ctx.app.db.select({ id: agents.id }).from(agents).where(sql`${agents.owner_id} = ${owner.user.id} and ${agents.is_default}`);
  return rows.map((row) => row.id);
}

describe('creating an agent', () => {
  it('fills the defaults, starts at version 1 and records it', async () => {
    const alice = await createUser(ctx.app);
    const agent = await createAgent(alice, { tags: ['a', 'b', 'a'], knowledge: { folder_ids: [] } });
    expect(agent).toMatchObject({
      owner_id: alice.user.id,
      project_id: null,
      description: null,
      system_prompt: '',
      model: 'gpt-4.1',
      temperature: null,
      max_output_tokens: null,
      tools: [],
      knowledge: { folder_ids: [], entry_ids: [] },
      is_default: false,
      tags: ['a', 'b'],
      metadata: {},
      version: 1,
    });
    const list = await versions(alice, agent.id);
    expect(list.count).toBe(1);
    expect(list.data[0]).toMatchObject({ agent_id: agent.id, version: 1, model: 'gpt-4.1', system_prompt: '', tools: [] });
  });

  it('stores the model an alias names under its catalog id, and a pinned snapshot as it is (the agent calls that snapshot)', async () => {
    const alice = await createUser(ctx.app);
    expect((await createAgent(alice, { model: 'gpt-5-1' })).model).toBe('gpt-5.1');
    expect((await createAgent(alice, { model: 'gpt-4o-2024-11-20' })).model).toBe('gpt-4o-2024-11-20');
  });

  it('answers 422 naming an unknown, a disabled or a non-chat model, and an unknown tool', async () => {
    const alice = await createUser(ctx.app);
    const admin = await superuserHeaders(ctx.app);
    const unknown = await api('POST', '/agents', alice.headers, { name: 'a', model: 'gpt-0-imaginary' });
    expect(expectValidationError(unknown, ['body', 'model'], 'value_error').detail[0]!.msg).toContain('"gpt-0-imaginary"');
    const embedding = await api('POST', '/agents', alice.headers, { name: 'a', model: 'text-embedding-3-small' });
    expect(expectValidationError(embedding, ['body', 'model']).detail[0]!.msg).toContain('cannot chat');
    const custom = { id: 'agents-test-model', provider: 'openai', pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '2' } };
    expect((await api('POST', '/models', admin, custom)).statusCode).toBe(200);
    expect((await api('PATCH', `/models/${custom.id}`, admin, { enabled: false })).statusCode).toBe(200);
    const disabled = await api('POST', '/agents', alice.headers, { name: 'a', model: custom.id });
    expect(expectValidationError(disabled, ['body', 'model']).detail[0]!.msg).toContain('disabled');
    const tool = await api('POST', '/agents', alice.headers, { name: 'a', model: 'gpt-4.1', tools: ['knowledge_search', 'shell'] });
    expect(expectValidationError(tool, ['body', 'tools', '1'], 'enum').detail[0]!.msg).toBe('Unknown tool "shell"; the tools are: knowledge_search');
    expect((await api('GET', '/agents', alice.headers)).json<ListBody<AgentBody>>().count).toBe(0);
  });

  it('bounds what a client sends: metadata size and depth, tags, prompt, parameters', async () => {
    const alice = await createUser(ctx.app);
    const base = { name: 'a', model: 'gpt-4.1' };
    const deep = { a: { b: { c: { d: { e: { f: 1 } } } } } };
    expectValidationError(await api('POST', '/agents', alice.headers, { ...base, metadata: { blob: 'x'.repeat(17_000) } }), ['body', 'metadata'], 'value_error');
    expectValidationError(await api('POST', '/agents', alice.headers, { ...base, metadata: deep }), ['body', 'metadata'], 'value_error');
    expect((await api('POST', '/agents', alice.headers, { ...base, metadata: deep.a })).statusCode).toBe(200);
    // Deeper than any call stack (a text: the test's own JSON.stringify would overflow): refused, not a 500.
    const abyss = `{"name":"a","model":"gpt-4.1","metadata":${'{"a":'.repeat(20_000)}1${'}'.repeat(20_000)}}`;
    const tooDeep = await api('POST', '/agents', { ...alice.headers, 'content-type': 'application/json' }, abyss);
    expect(expectValidationError(tooDeep, ['body', 'metadata'], 'value_error').detail[0]!.msg).toMatch(/deeper than 5 levels/);
    expectValidationError(await api('POST', '/agents', alice.headers, { ...base, tags: Array.from({ length: 33 }, (_, i) => `t${i}`) }), ['body', 'tags']);
    expectValidationError(await api('POST', '/agents', alice.headers, { ...base, system_prompt: 'p'.repeat(100_001) }), ['body', 'system_prompt'], 'string_too_long');
    expectValidationError(await api('POST', '/agents', alice.headers, { ...base, max_output_tokens: 0 }), ['body', 'max_output_tokens'], 'greater_than_equal');
    expectValidationError(await api('POST', '/agents', alice.headers, { ...base, knowledge: { folder_ids: ['nope'] } }), ['body', 'knowledge', 'folder_ids', '0']);
  });

  it('stops at MAX_AGENTS_PER_USER with 409', async () => {
    const alice = await createUser(ctx.app);
    for (let i = 0; i < 4; i++) await createAgent(alice);
    const refused = await api('POST', '/agents', alice.headers, { name: 'fifth', model: 'gpt-4.1' });
    expect(refused.statusCode).toBe(409);
    expect(refused.json()).toEqual({ detail: 'Agent limit reached (4 per user)' });
  });
});

describe('versions', () => {
  it('makes a version for each change to what the agent does, and none for the rest', async () => {
    const alice = await createUser(ctx.app);
    const agent = await createAgent(alice, { system_prompt: 'one' });
    expect((await patch(alice, agent.id, { system_prompt: 'two' })).version).toBe(2);
    // Renames, tags, metadata, the default flag and the project are not what the agent does.
    const project = await createProject(ctx.app, alice.headers);
    const renamed = await patch(alice, agent.id, { name: 'Renamed', description: 'd', tags: ['x'], metadata: { k: 1 }, is_default: true, project_id: project.id });
    expect(renamed.version).toBe(2);
    // Sending the values it already has changes nothing either (an alias of its model included).
    expect((await patch(alice, agent.id, { system_prompt: 'two', model: 'gpt-4.1', tools: [] })).version).toBe(2);
    expect((await patch(alice, agent.id, {})).version).toBe(2);
    // Several fields at once: one version.
    const changed = await patch(alice, agent.id, { temperature: 0.5, max_output_tokens: 100, tools: ['knowledge_search'], model: 'gpt-4.1-mini' });
    expect(changed.version).toBe(3);
    const folder = await createFolder(ctx.app, alice.headers);
    expect((await patch(alice, agent.id, { knowledge: { folder_ids: [folder.id] } })).version).toBe(4);
    expect((await patch(alice, agent.id, { temperature: null })).version).toBe(5);

    const list = await versions(alice, agent.id);
    expect(list.count).toBe(5);
    expect(list.data.map((v) => v.version)).toEqual([5, 4, 3, 2, 1]);
    expect((await versions(alice, agent.id, '?limit=2&offset=1')).data.map((v) => v.version)).toEqual([4, 3]);
    const first = await api('GET', `/agents/${agent.id}/versions/1`, alice.headers);
    expect(first.json()).toMatchObject({ version: 1, system_prompt: 'one', model: 'gpt-4.1', temperature: null, tools: [] });
    expect((await api('GET', `/agents/${agent.id}/versions/3`, alice.headers)).json()).toMatchObject({ temperature: 0.5, max_output_tokens: 100, tools: ['knowledge_search'], model: 'gpt-4.1-mini' });
    expect((await api('GET', `/agents/${agent.id}`, alice.headers)).json()).toMatchObject({ version: 5, temperature: null, name: 'Renamed' });
  });

  it('answers 404 for a missing version and for another user’s agent, 422 for a malformed number', async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const agent = await createAgent(alice);
    const missing = await api('GET', `/agents/${agent.id}/versions/2`, alice.headers);
    expect(missing.statusCode).toBe(404);
    expect(missing.json()).toEqual({ detail: 'Agent version not found' });
    for (const url of [`/agents/${agent.id}/versions`, `/agents/${agent.id}/versions/1`]) {
      const response = await api('GET', url, bob.headers);
      expect(response.statusCode, url).toBe(404);
      expect(response.json()).toEqual({ detail: 'Agent not found' });
      expect((await api('GET', url)).statusCode).toBe(401);
    }
    expectValidationError(await api('GET', `/agents/${agent.id}/versions/0`, alice.headers), ['path', 'version']);
    expectValidationError(await api('GET', `/agents/${agent.id}/versions/one`, alice.headers), ['path', 'version']);
    // Written as no path writes a number: version 1 to Number(), not here.
    expectValidationError(await api('GET', `/agents/${agent.id}/versions/0x1`, alice.headers), ['path', 'version']);
    expectValidationError(await api('GET', `/agents/${agent.id}/versions/1e0`, alice.headers), ['path', 'version']);
    expectValidationError(await api('GET', `/agents/not-a-uuid/versions`, alice.headers), ['path', 'agent_id']);
  });

  it('refuses a change naming an unknown model or tool and keeps the version', async () => {
    const alice = await createUser(ctx.app);
    const agent = await createAgent(alice);
    expectValidationError(await api('PATCH', `/agents/${agent.id}`, alice.headers, { model: 'gpt-0-imaginary', system_prompt: 'new' }), ['body', 'model']);
    expect((await api('GET', `/agents/${agent.id}`, alice.headers)).json()).toMatchObject({ version: 1, system_prompt: '' });
    expect((await versions(alice, agent.id)).count).toBe(1);
  });

  it('deletes the versions with the agent', async () => {
    const alice = await createUser(ctx.app);
    const agent = await createAgent(alice);
    await patch(alice, agent.id, { system_prompt: 'v2' });
    expect((await api('DELETE', `/agents/${agent.id}`, alice.headers)).json()).toEqual({ message: 'Agent deleted successfully' });
    const rows = await ctx.app.db.execute(sql`select count(*)::int as n from agent_versions where agent_id = ${agent.id}`);
    expect((rows as { rows: { n: number }[] }).rows[0]!.n).toBe(0);
  });
});

describe('the default agent', () => {
  it('is one per user: a new default unsets the previous one', async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const first = await createAgent(alice, { is_default: true });
    const bobs = await createAgent(bob, { is_default: true });
    const second = await createAgent(alice, { is_default: true });
    expect(await defaults(alice)).toEqual([second.id]);
    expect((await api('GET', `/agents/${first.id}`, alice.headers)).json()).toMatchObject({ is_default: false });
    await patch(alice, first.id, { is_default: true });
    expect(await defaults(alice)).toEqual([first.id]);
    // Unsetting leaves the user without a default; another user's default is never touched.
    await patch(alice, first.id, { is_default: false });
    expect(await defaults(alice)).toEqual([]);
    expect(await defaults(bob)).toEqual([bobs.id]);
  });

  it('is enforced by the database (a partial unique index), answered 409', async () => {
    const alice = await createUser(ctx.app);
    const agent = await createAgent(alice, { is_default: true });
    let failure: { code?: string; constraint?: string } | undefined;
    try {
      await ctx.app.db.insert(agents).values({ owner_id: alice.user.id, name: 'sneaky', model: 'gpt-4.1', is_default: true });
    } catch (error) {
      for (let e: unknown = error; e; e = (e as { cause?: unknown }).cause) if (typeof (e as { code?: unknown }).code === 'string') failure = e;
    }
    expect(failure?.code).toBe('23505');
    expect(integrityAnswer(failure as { code: string })).toEqual({ status: 409, detail: 'Another agent of this user became the default at the same time; try again' });
    expect(await defaults(alice)).toEqual([agent.id]);
  });

  it('stays one when two agents are made the default at the same time', async () => {
    const alice = await createUser(ctx.app);
    const a = await createAgent(alice);
    const b = await createAgent(alice);
    const c = await createAgent(alice, { is_default: true });
    for (let round = 0; round < 5; round++) {
      const [first, second] = await Promise.all([
        api('PATCH', `/agents/${a.id}`, alice.headers, { is_default: true }),
        api('PATCH', `/agents/${b.id}`, alice.headers, { is_default: true, system_prompt: `round ${round}` }),
      ]);
      expect([first.statusCode, second.statusCode], `${first.body} ${second.body}`).toEqual([200, 200]);
      const winners = await defaults(alice);
      expect(winners).toHaveLength(1);
      expect([a.id, b.id]).toContain(winners[0]);
      expect(winners).not.toContain(c.id);
      await patch(alice, winners[0]!, { is_default: false });
    }
    // Each round made one version of b, none lost to the race.
    expect((await api('GET', `/agents/${b.id}`, alice.headers)).json()).toMatchObject({ version: 6 });
  });
});

describe('projects and scoped keys', () => {
  it('takes only the caller’s own project (404 otherwise), at creation and in a change', async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const bobs = await createProject(ctx.app, bob.headers);
    const own = await createProject(ctx.app, alice.headers);
    for (const response of [
      await api('POST', '/agents', alice.headers, { name: 'a', model: 'gpt-4.1', project_id: bobs.id }),
      await api('PATCH', `/agents/${(await createAgent(alice)).id}`, alice.headers, { project_id: bobs.id }),
    ]) {
      expect(response.statusCode).toBe(404);
      expect(response.json()).toEqual({ detail: 'Project not found' });
    }
    const agent = await createAgent(alice, { project_id: own.id });
    expect(agent.project_id).toBe(own.id);
    expect((await api('GET', `/agents?project_id=${own.id}`, alice.headers)).json<ListBody<AgentBody>>().data.map((x) => x.id)).toEqual([agent.id]);
    // The project's agents go with it.
    expect((await api('DELETE', `/projects/${own.id}`, alice.headers)).statusCode).toBe(200);
    expect((await api('GET', `/agents/${agent.id}`, alice.headers)).statusCode).toBe(404);
  });

  it('lets a scoped key read the account’s agents without a project, and change or create only in its project', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers, 'Scope');
    const other = await createProject(ctx.app, alice.headers, 'Other');
    const unassigned = await createAgent(alice, { is_default: true });
    const elsewhere = await createAgent(alice, { project_id: other.id });
    const key = bearer((await createKey(ctx.app, alice, { name: 'scoped', project_id: project.id })).key);

    expect((await api('GET', `/agents/${unassigned.id}`, key)).statusCode).toBe(200);
    expect((await api('GET', `/agents/${unassigned.id}/versions/1`, key)).statusCode).toBe(200);
    expect((await api('GET', `/agents/${elsewhere.id}/versions`, key)).statusCode).toBe(404);
    // It reads them but may not change them: refused (403, SPEC §2: allowed to see, not to change), not "not found".
    for (const [method, path, body] of [
      ['PATCH', '', { name: 'x' }],
      ['PATCH', '', { system_prompt: 'taken over' }],
      ['PATCH', '', {}],
      ['DELETE', '', undefined],
      ['PUT', '/knowledge', { folder_ids: [], entry_ids: [] }],
    ] as const) {
      const response = await api(method, `/agents/${unassigned.id}${path}`, key, body);
      expect(response.statusCode, `${method} ${path} ${JSON.stringify(body)}`).toBe(403);
      expect(response.json()).toEqual({ detail: 'This API key is limited to one project' });
    }
    expect((await api('GET', `/agents/${unassigned.id}`, alice.headers)).json()).toMatchObject({ name: unassigned.name, system_prompt: unassigned.system_prompt, version: 1 });
    // Another project's agent it cannot see at all: 404, as a missing one.
    for (const [method, body] of [['PATCH', { name: 'x' }], ['DELETE', undefined]] as const) {
      const response = await api(method, `/agents/${elsewhere.id}`, key, body);
      expect(response.statusCode, method).toBe(404);
      expect(response.json()).toEqual({ detail: 'Agent not found' });
    }
    // Left out, the project is the key's own; another one, or none, is refused.
    const created = await createAgent(alice, {}, key);
    expect(created.project_id).toBe(project.id);
    expect((await api('GET', '/agents?limit=100', key)).json<ListBody<AgentBody>>().data.map((x) => x.id).sort()).toEqual([created.id, unassigned.id].sort());
    for (const body of [{ project_id: null }, { project_id: other.id }]) {
      const response = await api('POST', '/agents', key, { name: 'a', model: 'gpt-4.1', ...body });
      expect(response.statusCode, JSON.stringify(body)).toBe(403);
      expect(response.json()).toEqual({ detail: 'This API key is limited to one project' });
    }
    // Its agents stay in its project, and the account's default is not the key's to change.
    for (const body of [{ project_id: other.id }, { project_id: null }, { is_default: true }]) {
      expect((await api('PATCH', `/agents/${created.id}`, key, body)).statusCode, JSON.stringify(body)).toBe(403);
    }
    expect((await api('POST', '/agents', key, { name: 'a', model: 'gpt-4.1', is_default: true })).statusCode).toBe(403);
    expect((await api('PATCH', `/agents/${created.id}`, key, { system_prompt: 'mine', is_default: false })).json()).toMatchObject({ version: 2, is_default: false });
    expect(await defaults(alice)).toEqual([unassigned.id]);
  });

  it('gives a superuser’s scoped key the superuser’s own agents without a project, not every user’s', async () => {
    const alice = await createUser(ctx.app);
    const admin = await createUser(ctx.app, { superuser: true });
    const project = await createProject(ctx.app, admin.headers, 'Scope');
    const alices = await createAgent(alice);
    const own = await createAgent(admin);
    const key = bearer((await createKey(ctx.app, admin, { name: 'scoped', project_id: project.id })).key);

    // Outside a project (SPEC §3: "the account's agents that have no project"): the key's account is the superuser's.
    for (const path of [`/agents/${alices.id}`, `/agents/${alices.id}/versions`]) {
      const response = await api('GET', path, key);
      expect(response.statusCode, path).toBe(404);
      expect(response.json()).toEqual({ detail: 'Agent not found' });
    }
    expect((await api('GET', '/agents?limit=100', key)).json<ListBody<AgentBody>>().data.map((x) => x.id)).toEqual([own.id]);
    // The superuser's own token still sees every user's agents.
    expect((await api('GET', `/agents/${alices.id}`, admin.headers)).statusCode).toBe(200);
  });
});
