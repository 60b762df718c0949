/**
 * Agent knowledge (issue 9 item 5): GET/PUT /agents/{id}/knowledge, the built-in knowledge_search
 * tool in real runs (real ingestion, real search, a fake model that calls the tool), and the
 * citations a run's final message keeps in `metadata.sources`.
 */
import { eq } from 'drizzle-orm';
import { beforeAll, describe, expect, it } from 'vitest';

import { apiKeys } from '../../src/models/index.js';

import { useTestApp } from '../helpers/app.js';
import { madeFile, markdownBlocks, writeDocx, writePdf } from '../helpers/documents.js';
import { createProject, createUser, type TestUser } from '../helpers/factories.js';
import { apiOf, createKey, expectValidationError, type ListBody, xApiKey } from '../helpers/http.js';
import { createFolder, type EntryBody, ingested, uploaded } from '../helpers/knowledge.js';
import { createAgent, createThread, readEvents, type SseEvent, startRun, useRunServer } from '../helpers/runs.js';

const MODEL = 'fake-precise';
// AGENT_VERSIONS_KEPT: small, for 'keeps the newest versions' (the other tests make fewer).
const ctx = useTestApp({ MAX_RUN_STEPS: '4', AGENT_VERSIONS_KEPT: '3' });
const api = apiOf(ctx);
const server = useRunServer(ctx);

interface KnowledgeBody {
  agent_id: string;
  version: number;
  folder_ids: string[];
  entry_ids: string[];
  folders: { id: string; name: string }[];
  entries: { id: string; filename: string; folder_id: string; status: string }[];
}

interface Source {
  entry_id: string;
  filename: string;
  chunk_index: number;
  heading_path: string[];
  score: number;
}

interface Passage extends Source {
  text: string;
}

interface MessageBody {
  id: string;
  role: string;
  content: string;
  metadata: { sources?: Source[]; [key: string]: unknown };
}

const HANDBOOK = `# Handbook

## Billing

Invoices are sent on the first working day of every month. Refunds take ten days.

## Security

Passwords are hashed with Argon2id and never logged.
`;

async function putKnowledge(user: TestUser, agentId: string, body: Record<string, unknown>) {
  return api('PUT', `/agents/${agentId}/knowledge`, user.headers, body);
}

describe('GET and PUT /agents/{id}/knowledge', () => {
  it('assigns folders and entries with their names; a change makes a new version, the same assignment does not', async () => {
    const alice = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, alice.headers, { name: 'Handbook' });
    const other = await createFolder(ctx.app, alice.headers, { name: 'Other' });
    const entry = await uploaded(ctx.app, alice.headers, other.id, { filename: 'notes.md', content: '# Notes\n\nSome notes.', type: 'text/markdown' });
    const agent = await createAgent(ctx.app, alice.headers);

    const empty = await api('GET', `/agents/${agent.id}/knowledge`, alice.headers);
    expect(empty.statusCode).toBe(200);
    expect(empty.json()).toEqual({ agent_id: agent.id, version: 1, folder_ids: [], entry_ids: [], folders: [], entries: [] });

    const put = await putKnowledge(alice, agent.id, { folder_ids: [folder.id], entry_ids: [entry.id, entry.id] });
    expect(put.statusCode, put.body).toBe(200);
    const expected = {
      agent_id: agent.id,
      version: 2,
      folder_ids: [folder.id],
      entry_ids: [entry.id],
      folders: [{ id: folder.id, name: 'Handbook' }],
      entries: [{ id: entry.id, filename: 'notes.md', folder_id: other.id, status: expect.any(String) as string }],
    };
    expect(put.json()).toEqual(expected);
    expect((await api('GET', `/agents/${agent.id}/knowledge`, alice.headers)).json()).toEqual(expected);
    expect((await api('GET', `/agents/${agent.id}`, alice.headers)).json()).toMatchObject({ version: 2, knowledge: { folder_ids: [folder.id], entry_ids: [entry.id] } });
    expect((await api('GET', `/agents/${agent.id}/versions/2`, alice.headers)).json()).toMatchObject({ knowledge: { folder_ids: [folder.id], entry_ids: [entry.id] } });

    // The same assignment again: no new version. Fields left out are emptied (a PUT replaces).
    expect((await putKnowledge(alice, agent.id, { folder_ids: [folder.id], entry_ids: [entry.id] })).json<KnowledgeBody>().version).toBe(2);
    const cleared = (await putKnowledge(alice, agent.id, { folder_ids: [folder.id] })).json<KnowledgeBody>();
    expect(cleared).toMatchObject({ version: 3, entry_ids: [], entries: [] });

    // A deleted folder leaves the assignment (no new version: the version still names it, as what the agent searched then).
    expect((await api('DELETE', `/knowledge-base/folders/${folder.id}`, alice.headers)).statusCode).toBe(200);
    expect((await api('GET', `/agents/${agent.id}/knowledge`, alice.headers)).json()).toMatchObject({ version: 3, folder_ids: [], folders: [] });
    expect((await api('GET', `/agents/${agent.id}/versions/3`, alice.headers)).json()).toMatchObject({ knowledge: { folder_ids: [folder.id] } });
  });

  it('a deleted folder, entry or project leaves the agents that had it, so an agent read and written back as read is taken; an id never the owner\'s is still 422', async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    const [f1, f2, f3] = [await createFolder(ctx.app, alice.headers, { name: 'F1' }), await createFolder(ctx.app, alice.headers, { name: 'F2' }), await createFolder(ctx.app, alice.headers, { name: 'F3', project_id: project.id })];
    const [inF1, inF2, inF3] = await Promise.all([f1, f2, f3].map((folder, i) => uploaded(ctx.app, alice.headers, folder.id, { filename: `e${i}.md`, content: '# E\n\nText.', type: 'text/markdown' })));
    const knowledge = { folder_ids: [f1.id, f2.id, f3.id], entry_ids: [inF1!.id, inF2!.id, inF3!.id] };
    const agent = await createAgent(ctx.app, alice.headers, { knowledge });
    const untouched = await createAgent(ctx.app, alice.headers, { knowledge: { folder_ids: [f2.id], entry_ids: [] } });
    const bobFolder = await createFolder(ctx.app, bob.headers);
    const bobAgent = await createAgent(ctx.app, bob.headers, { knowledge: { folder_ids: [bobFolder.id], entry_ids: [] } });

    expect((await api('DELETE', `/knowledge-base/folders/${f1.id}`, alice.headers)).statusCode).toBe(200); // its entry with it
    expect((await api('DELETE', `/knowledge-base/entries/${inF2!.id}`, alice.headers)).statusCode).toBe(200);
    expect((await api('DELETE', `/projects/${project.id}`, alice.headers)).statusCode).toBe(200); // F3 and its entry with it
    const read = (await api('GET', `/agents/${agent.id}`, alice.headers)).json<{ version: number; knowledge: typeof knowledge }>();
    expect(read).toMatchObject({ version: 1, knowledge: { folder_ids: [f2.id], entry_ids: [] } });
    // Fetch, edit, save: the knowledge as read goes back.
    const saved = await api('PATCH', `/agents/${agent.id}`, alice.headers, { name: 'renamed', knowledge: read.knowledge });
    expect(saved.statusCode, saved.body).toBe(200);
    expect(saved.json()).toMatchObject({ version: 1, knowledge: { folder_ids: [f2.id], entry_ids: [] } });
    expect((await putKnowledge(alice, agent.id, read.knowledge)).statusCode).toBe(200);
    expect((await api('GET', `/agents/${untouched.id}`, alice.headers)).json()).toMatchObject({ knowledge: { folder_ids: [f2.id] } });
    expect((await api('GET', `/agents/${bobAgent.id}`, bob.headers)).json()).toMatchObject({ knowledge: { folder_ids: [bobFolder.id] } });
    // Sent again, the deleted folder is as unknown as any other id.
    expectValidationError(await putKnowledge(alice, agent.id, { folder_ids: [f2.id, f1.id] }), ['body', 'folder_ids', '1'], 'value_error');
    expectValidationError(await putKnowledge(alice, agent.id, { folder_ids: [bobFolder.id] }), ['body', 'folder_ids', '0'], 'value_error');
  });

  it("answers 404 for another user's agent, 422 naming each folder or entry the owner may not use", async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const agent = await createAgent(ctx.app, alice.headers);
    const bobFolder = await createFolder(ctx.app, bob.headers);
    const bobEntry = await uploaded(ctx.app, bob.headers, bobFolder.id, { filename: 'b.md', content: '# B\n\nBob.', type: 'text/markdown' });
    const aliceFolder = await createFolder(ctx.app, alice.headers);

    expect((await api('GET', `/agents/${agent.id}/knowledge`, bob.headers)).statusCode).toBe(404);
    expect((await putKnowledge(bob, agent.id, { folder_ids: [bobFolder.id] })).statusCode).toBe(404);
    expect((await api('GET', `/agents/${crypto.randomUUID()}/knowledge`, alice.headers)).statusCode).toBe(404);

    const refused = await putKnowledge(alice, agent.id, { folder_ids: [aliceFolder.id, bobFolder.id], entry_ids: [bobEntry.id] });
    const body = expectValidationError(refused, ['body', 'folder_ids', '1'], 'value_error');
    expect(body.detail).toContainEqual(expect.objectContaining({ loc: ['body', 'entry_ids', '0'] }));
    expect(body.detail.map((issue) => issue.msg).join(' ')).toContain(bobFolder.id);
    expect(body.detail.map((issue) => issue.msg).join(' ')).toContain(bobEntry.id);
    expect(body.detail).toHaveLength(2);
    expectValidationError(await putKnowledge(alice, agent.id, { folder_ids: [crypto.randomUUID()] }), ['body', 'folder_ids', '0'], 'value_error');
    expectValidationError(await putKnowledge(alice, agent.id, { folder_ids: ['nope'] }), ['body', 'folder_ids', '0']);
    expectValidationError(await putKnowledge(alice, agent.id, { folder_ids: [], extra: 1 }), ['body', 'extra'], 'extra_forbidden');
    // PATCH and POST check the same way, so nothing gets round the PUT.
    expectValidationError(await api('PATCH', `/agents/${agent.id}`, alice.headers, { knowledge: { entry_ids: [bobEntry.id] } }), ['body', 'knowledge', 'entry_ids', '0'], 'value_error');
    expectValidationError(await api('POST', '/agents', alice.headers, { name: 'x', model: MODEL, knowledge: { folder_ids: [bobFolder.id] } }), ['body', 'knowledge', 'folder_ids', '0'], 'value_error');
    // Nothing changed.
    expect((await api('GET', `/agents/${agent.id}/knowledge`, alice.headers)).json()).toMatchObject({ version: 1, folder_ids: [], entry_ids: [] });
  });

  it("a project-scoped key assigns only its project's folders", async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    const key = xApiKey((await createKey(ctx.app, alice, { name: 'scoped', project_id: project.id })).key);
    const accountFolder = await createFolder(ctx.app, alice.headers, { name: 'Account' });
    const projectFolder = await createFolder(ctx.app, alice.headers, { name: 'Project', project_id: project.id });
    const agent = await createAgent(ctx.app, alice.headers, { project_id: project.id });
    expectValidationError(await api('PUT', `/agents/${agent.id}/knowledge`, key, { folder_ids: [accountFolder.id] }), ['body', 'folder_ids', '0'], 'value_error');
    const put = await api('PUT', `/agents/${agent.id}/knowledge`, key, { folder_ids: [projectFolder.id] });
    expect(put.statusCode, put.body).toBe(200);
    expect(put.json()).toMatchObject({ version: 2, folders: [{ id: projectFolder.id, name: 'Project' }] });
  });

  it("a project-scoped key is shown only the ids of its project's knowledge in an agent (its knowledge, its reads, its list, its versions, its changes); the owner and an account key see every id", async () => {
    const alice = await createUser(ctx.app);
    const [mine, other] = [await createProject(ctx.app, alice.headers), await createProject(ctx.app, alice.headers)];
    const folderIn = async (name: string, projectId?: string) => {
      const folder = await createFolder(ctx.app, alice.headers, { name, ...(projectId ? { project_id: projectId } : {}) });
      const entry = await uploaded(ctx.app, alice.headers, folder.id, { filename: `${name}.md`, content: `# ${name}`, type: 'text/markdown' });
      return { folder, entry };
    };
    const [account, ours, theirs] = [await folderIn('Account'), await folderIn('Ours', mine.id), await folderIn('Theirs', other.id)];
    const assigned = { folder_ids: [account.folder.id, ours.folder.id, theirs.folder.id], entry_ids: [theirs.entry.id, ours.entry.id, account.entry.id] };
    const shown = { folder_ids: [ours.folder.id], entry_ids: [ours.entry.id] };
    // The account's agent (a scoped key reads it) and the project's (it may change it), named every project's knowledge by the owner.
    const accountAgent = await createAgent(ctx.app, alice.headers, { knowledge: assigned });
    const projectAgent = await createAgent(ctx.app, alice.headers, { project_id: mine.id, knowledge: assigned });
    const scoped = xApiKey((await createKey(ctx.app, alice, { name: 'scoped', project_id: mine.id })).key);
    const unscoped = xApiKey((await createKey(ctx.app, alice, { name: 'account' })).key);

    const knowledgeOf = async (headers: Record<string, string>, agentId: string) => {
      const read = await api('GET', `/agents/${agentId}/knowledge`, headers);
      expect(read.statusCode, read.body).toBe(200);
      return read.json<KnowledgeBody>();
    };
    const agentsSeen = async (headers: Record<string, string>) => {
      const listed = (await api('GET', '/agents?limit=100', headers)).json<ListBody<{ id: string; knowledge: unknown }>>().data;
      return Promise.all(
        [accountAgent, projectAgent].map(async (agent) => [
          (await api('GET', `/agents/${agent.id}`, headers)).json<{ knowledge: unknown }>().knowledge,
          listed.find((a) => a.id === agent.id)?.knowledge,
          (await api('GET', `/agents/${agent.id}/versions`, headers)).json<ListBody<{ knowledge: unknown }>>().data[0]?.knowledge,
          (await api('GET', `/agents/${agent.id}/versions/1`, headers)).json<{ knowledge: unknown }>().knowledge,
          (({ folder_ids, entry_ids }) => ({ folder_ids, entry_ids }))(await knowledgeOf(headers, agent.id)),
        ]),
      );
    };
    expect(await agentsSeen(scoped)).toEqual([Array(5).fill(shown), Array(5).fill(shown)]);
    const ourRefs = { folders: [{ id: ours.folder.id, name: 'Ours' }], entries: [expect.objectContaining({ id: ours.entry.id })] };
    expect(await knowledgeOf(scoped, accountAgent.id)).toMatchObject(ourRefs);
    for (const headers of [alice.headers, unscoped]) {
      expect(await agentsSeen(headers)).toEqual([Array(5).fill(assigned), Array(5).fill(assigned)]);
      expect((await knowledgeOf(headers, accountAgent.id)).folders.map((f) => f.name)).toEqual(['Account', 'Ours', 'Theirs']);
    }
    // The project's agent changed by the key (not its knowledge): the answer shows its project's ids; every id stays assigned.
    const renamed = await api('PATCH', `/agents/${projectAgent.id}`, scoped, { name: 'renamed' });
    expect(renamed.statusCode, renamed.body).toBe(200);
    expect(renamed.json()).toMatchObject({ name: 'renamed', version: 1, knowledge: shown });
    expect((await api('GET', `/agents/${projectAgent.id}`, alice.headers)).json()).toMatchObject({ knowledge: assigned });

    // The key writes back the knowledge it reads, with one more of its project's: what it is not shown stays assigned.
    const more = await folderIn('More', mine.id);
    const put = await api('PUT', `/agents/${projectAgent.id}/knowledge`, scoped, { folder_ids: [ours.folder.id, more.folder.id], entry_ids: [ours.entry.id] });
    expect(put.statusCode, put.body).toBe(200);
    expect(put.json()).toMatchObject({ version: 2, folder_ids: [ours.folder.id, more.folder.id], entry_ids: [ours.entry.id] });
    expect((await api('GET', `/agents/${projectAgent.id}`, alice.headers)).json()).toMatchObject({
      knowledge: { folder_ids: [ours.folder.id, more.folder.id, account.folder.id, theirs.folder.id], entry_ids: [ours.entry.id, theirs.entry.id, account.entry.id] },
    });
    // Its own project's knowledge it may take out; PATCH keeps the unseen ids as PUT does.
    const patched = await api('PATCH', `/agents/${projectAgent.id}`, scoped, { knowledge: { folder_ids: [], entry_ids: [] } });
    expect(patched.json()).toMatchObject({ version: 3, knowledge: { folder_ids: [], entry_ids: [] } });
    expect((await api('GET', `/agents/${projectAgent.id}`, alice.headers)).json()).toMatchObject({
      knowledge: { folder_ids: [account.folder.id, theirs.folder.id], entry_ids: [theirs.entry.id, account.entry.id] },
    });
  });
});

// ==================== Runs ====================

/** Scripts one knowledge_search call per query (one step), then the answer. */
function scriptSearches(queries: string[], answer = 'Here is what I found.') {
  server.fake.script(
    MODEL,
    { toolCalls: queries.map((query, i) => ({ id: `call_${i}`, name: 'knowledge_search', arguments: JSON.stringify({ query }) })), usage: { prompt_tokens: 5, completion_tokens: 5 } },
    { text: answer, usage: { prompt_tokens: 20, completion_tokens: 5 } },
  );
}

/** Runs the agent on a new thread to its end; its events and the thread's messages. */
async function runToEnd(user: { headers: Record<string, string> }, agentId: string, input = 'question') {
  const thread = await createThread(ctx.app, user.headers);
  const run = await startRun(ctx.app, user.headers, thread.id, { agent_id: agentId, input });
  const { events } = await readEvents(server.base, user.headers, run.id);
  expect(events.at(-1)!.event, JSON.stringify(events.at(-1))).toBe('run.completed');
  const messages = (await api('GET', `/threads/${thread.id}/messages?limit=100`, user.headers)).json<ListBody<MessageBody>>().data;
  return { run, events, messages };
}

const passagesOf = (events: SseEvent[]): Passage[] =>
  events.filter((e) => e.event === 'tool.result').flatMap((e) => {
    expect(e.data.is_error, String(e.data.content)).toBe(false);
    return (JSON.parse(e.data.content as string) as { passages: Passage[] }).passages;
  });

describe('AGENT_VERSIONS_KEPT', () => {
  it('keeps the newest versions and those a run names; editing goes on past it', async () => {
    const alice = await createUser(ctx.app);
    const agent = await createAgent(ctx.app, alice.headers);
    const thread = await createThread(ctx.app, alice.headers);
    const run = await startRun(ctx.app, alice.headers, thread.id, { agent_id: agent.id, input: 'hi' });
    expect(run.agent_version).toBe(1);
    for (let i = 2; i <= 7; i++) {
      const patched = await api('PATCH', `/agents/${agent.id}`, alice.headers, { system_prompt: `Prompt ${i}. ${'x'.repeat(10_000)}` });
      expect(patched.json()).toMatchObject({ version: i });
    }
    const versions = (await api('GET', `/agents/${agent.id}/versions`, alice.headers)).json<ListBody<{ version: number }>>();
    expect(versions.data.map((v) => v.version)).toEqual([7, 6, 5, 1]);
    expect((await api('GET', `/agents/${agent.id}/versions/1`, alice.headers)).statusCode).toBe(200); // the run's
    expect((await api('GET', `/agents/${agent.id}/versions/4`, alice.headers)).statusCode).toBe(404);
  });
});

describe('the knowledge_search tool in a run', () => {
  let alice: TestUser;
  let bob: TestUser;
  let handbook: { id: string };
  let markdown: EntryBody;
  let pdf: EntryBody;
  let docx: EntryBody;
  let elsewhere: EntryBody;
  let bobs: EntryBody;
  let bobFolder: { id: string };

  beforeAll(async () => {
    alice = await createUser(ctx.app);
    bob = await createUser(ctx.app);
    handbook = await createFolder(ctx.app, alice.headers, { name: 'Handbook' });
    markdown = await ingested(ctx.app, alice.headers, handbook.id, { filename: 'handbook.md', content: HANDBOOK, type: 'text/markdown' });
    const holidays = markdownBlocks('# Holidays\n\n## Leave\n\nEmployees receive twenty-five vacation days each year.');
    pdf = await ingested(ctx.app, alice.headers, handbook.id, { filename: 'holidays.pdf', content: await madeFile('holidays.pdf', (path) => writePdf(path, holidays)), type: 'application/pdf' });
    const expenses = markdownBlocks('# Expenses\n\n## Approval\n\nExpense reports are approved by the team lead within three days.');
    docx = await ingested(ctx.app, alice.headers, handbook.id, {
      filename: 'expenses.docx',
      content: await madeFile('expenses.docx', (path) => writeDocx(path, expenses)),
      type: 'application/vnd.openxmlformats-officedocument.wordprocessingml.document',
    });
    // The same words elsewhere: alice's folder not assigned, and bob's documents.
    const other = await createFolder(ctx.app, alice.headers, { name: 'Drafts' });
    elsewhere = await ingested(ctx.app, alice.headers, other.id, { filename: 'draft.md', content: '# Draft\n\nInvoices are sent by carrier pigeon (draft).', type: 'text/markdown' });
    bobFolder = await createFolder(ctx.app, bob.headers, { name: 'Handbook' });
    bobs = await ingested(ctx.app, bob.headers, bobFolder.id, { filename: 'bob.md', content: "# Bob\n\nInvoices are sent on Bob's birthday.", type: 'text/markdown' });
  });

  it('finds passages of a Markdown, a PDF and a DOCX file in the assigned folder and cites them in the final message', async () => {
    const agent = await createAgent(ctx.app, alice.headers, { tools: ['knowledge_search'], knowledge: { folder_ids: [handbook.id] } });
    scriptSearches(['when are invoices sent', 'vacation days', 'expense reports approved']);
    const { run, events, messages } = await runToEnd(alice, agent.id);

    const passages = passagesOf(events);
    const byEntry = (entry: EntryBody) => passages.filter((p) => p.entry_id === entry.id);
    expect(byEntry(markdown)[0]).toMatchObject({ filename: 'handbook.md', heading_path: ['Handbook', 'Billing'], chunk_index: expect.any(Number) as number });
    expect(byEntry(markdown)[0]!.text).toContain('Invoices are sent on the first working day');
    expect(byEntry(pdf)[0]).toMatchObject({ filename: 'holidays.pdf' });
    expect(byEntry(pdf)[0]!.text).toContain('twenty-five vacation days');
    expect(byEntry(docx)[0]).toMatchObject({ filename: 'expenses.docx' });
    expect(byEntry(docx)[0]!.text).toContain('approved by the team lead');
    // Only the assigned folder: not alice's drafts, never bob's documents.
    expect(passages.map((p) => p.entry_id)).not.toContain(elsewhere.id);
    expect(passages.map((p) => p.entry_id)).not.toContain(bobs.id);

    // The model got the passages as the tool's result.
    const second = server.fake.requestsFor(MODEL)[1]!.body.messages as { role: string; content: string }[];
    expect(second.filter((m) => m.role === 'tool').map((m) => m.content).join('\n')).toContain('Invoices are sent on the first working day');

    // The final assistant message cites each passage once; so does message.completed.
    const final = messages.at(-1)!;
    expect(final).toMatchObject({ role: 'assistant', content: 'Here is what I found.' });
    const cited = final.metadata.sources!;
    const keys = cited.map((s) => `${s.entry_id}:${s.chunk_index}`);
    expect(new Set(keys).size).toBe(keys.length);
    expect(new Set(cited.map((s) => s.entry_id))).toEqual(new Set([markdown.id, pdf.id, docx.id]));
    expect(cited).toContainEqual(expect.objectContaining({ entry_id: markdown.id, filename: 'handbook.md', heading_path: ['Handbook', 'Billing'], score: expect.any(Number) as number }));
    for (const source of cited) expect(Object.keys(source).sort()).toEqual(['chunk_index', 'entry_id', 'filename', 'heading_path', 'score']);
    const completed = events.filter((e) => e.event === 'message.completed').at(-1)!.data.message as MessageBody;
    expect(completed.id).toBe(final.id);
    expect(completed.metadata.sources).toEqual(cited);
    // Each tool message keeps what its call found; the step that asked cites nothing itself.
    const toolMessages = messages.filter((m) => m.role === 'tool');
    expect(toolMessages.every((m) => (m.metadata.sources ?? []).length > 0)).toBe(true);
    expect(messages.find((m) => m.role === 'assistant')!.metadata.sources).toBeUndefined();
    expect(run.agent_version).toBe(1);
  });

  it('an agent without the folder gets no passages from it; one without knowledge gets none at all', async () => {
    const draftsOnly = await createAgent(ctx.app, alice.headers, { tools: ['knowledge_search'], knowledge: { entry_ids: [elsewhere.id] } });
    scriptSearches(['invoices']);
    const drafts = await runToEnd(alice, draftsOnly.id);
    const found = passagesOf(drafts.events);
    expect(found.map((p) => p.entry_id)).toEqual([elsewhere.id]);
    expect(drafts.messages.at(-1)!.metadata.sources!.map((s) => s.entry_id)).toEqual([elsewhere.id]);

    const bare = await createAgent(ctx.app, alice.headers, { tools: ['knowledge_search'] });
    scriptSearches(['invoices'], 'Nothing to cite.');
    const none = await runToEnd(alice, bare.id);
    expect(passagesOf(none.events)).toEqual([]);
    expect(JSON.parse(none.events.find((e) => e.event === 'tool.result')!.data.content as string)).toMatchObject({ note: expect.stringContaining('No knowledge') as string });
    expect(none.messages.at(-1)!.metadata.sources).toBeUndefined();

    // Bob's agent on his own folder of the same name finds his document only.
    const bobsAgent = await createAgent(ctx.app, bob.headers, { tools: ['knowledge_search'], knowledge: { folder_ids: [bobFolder.id] } });
    scriptSearches(['invoices']);
    const bobRun = await runToEnd(bob, bobsAgent.id);
    expect(passagesOf(bobRun.events).map((p) => p.entry_id)).toEqual([bobs.id]);
  });

  it("a run started by a project-scoped key searches only the key's project, even in the account's agent", async () => {
    const carol = await createUser(ctx.app);
    const project = await createProject(ctx.app, carol.headers);
    const accountFolder = await createFolder(ctx.app, carol.headers, { name: 'Account' });
    const projectFolder = await createFolder(ctx.app, carol.headers, { name: 'Project', project_id: project.id });
    const accountEntry = await ingested(ctx.app, carol.headers, accountFolder.id, { filename: 'account.md', content: '# Account\n\nInvoices: the account copy.', type: 'text/markdown' });
    const projectEntry = await ingested(ctx.app, carol.headers, projectFolder.id, { filename: 'project.md', content: '# Project\n\nInvoices: the project copy.', type: 'text/markdown' });
    const agent = await createAgent(ctx.app, carol.headers, { tools: ['knowledge_search'], knowledge: { folder_ids: [accountFolder.id, projectFolder.id] } });

    scriptSearches(['invoices']);
    const own = await runToEnd(carol, agent.id);
    expect(new Set(passagesOf(own.events).map((p) => p.entry_id))).toEqual(new Set([accountEntry.id, projectEntry.id]));

    const key = xApiKey((await createKey(ctx.app, carol, { name: 'scoped', project_id: project.id })).key);
    scriptSearches(['invoices']);
    const scoped = await runToEnd({ headers: key }, agent.id);
    expect(passagesOf(scoped.events).map((p) => p.entry_id)).toEqual([projectEntry.id]);
  });

  it("a run whose project-scoped key is deleted mid-run (its cancel still on the way) still searches only the key's project", async () => {
    const dave = await createUser(ctx.app);
    const project = await createProject(ctx.app, dave.headers);
    const otherProject = await createProject(ctx.app, dave.headers);
    const folderIn = async (name: string, projectId?: string) => {
      const folder = await createFolder(ctx.app, dave.headers, { name, ...(projectId ? { project_id: projectId } : {}) });
      const entry = await ingested(ctx.app, dave.headers, folder.id, { filename: `${name}.md`, content: `# ${name}\n\nInvoices: the ${name} copy.`, type: 'text/markdown' });
      return { folder, entry };
    };
    const own = await folderIn('own', project.id);
    const other = await folderIn('other', otherProject.id);
    const account = await folderIn('account');
    // The account's agent (a scoped key may run it) names knowledge of every project.
    const agent = await createAgent(ctx.app, dave.headers, { tools: ['knowledge_search'], knowledge: { folder_ids: [own.folder.id, other.folder.id, account.folder.id] } });
    const created = await createKey(ctx.app, dave, { name: 'scoped', project_id: project.id });
    const key = xApiKey(created.key);
    const thread = await createThread(ctx.app, key);

    // The step that asks for the search is held back until the key is gone.
    server.fake.script(
      MODEL,
      { toolCalls: [{ id: 'call_0', name: 'knowledge_search', arguments: JSON.stringify({ query: 'invoices' }) }], chunkDelayMs: 500, usage: { prompt_tokens: 5, completion_tokens: 5 } },
      { text: 'Here is what I found.', usage: { prompt_tokens: 20, completion_tokens: 5 } },
    );
    const asked = server.fake.requestsFor(MODEL).length;
    const run = await startRun(ctx.app, key, thread.id, { agent_id: agent.id, input: 'question' });
    await server.fake.waitFor(() => server.fake.requestsFor(MODEL).length > asked);
    // The key's row goes as a delete on another node takes it, before its cancel reaches this worker
    // (the run's api_key_id set null by the foreign key).
    await ctx.app.db.delete(apiKeys).where(eq(apiKeys.id, created.id));

    const { events } = await readEvents(server.base, dave.headers, run.id);
    expect(events.at(-1)!.event, JSON.stringify(events.at(-1))).toBe('run.completed');
    expect(passagesOf(events).map((p) => p.entry_id)).toEqual([own.entry.id]);
  });

  it('answers the model with an error result for bad input, and the run goes on', async () => {
    const agent = await createAgent(ctx.app, alice.headers, { tools: ['knowledge_search'], knowledge: { folder_ids: [handbook.id] } });
    server.fake.script(MODEL, { toolCalls: [{ id: 'bad', name: 'knowledge_search', arguments: JSON.stringify({ query: '', top_k: 50 }) }] }, { text: 'Sorry.' });
    const thread = await createThread(ctx.app, alice.headers);
    const run = await startRun(ctx.app, alice.headers, thread.id, { agent_id: agent.id, input: 'q' });
    const { events } = await readEvents(server.base, alice.headers, run.id);
    expect(events.at(-1)!.event).toBe('run.completed');
    const result = events.find((e) => e.event === 'tool.result')!.data;
    expect(result).toMatchObject({ is_error: true });
    expect(result.content).toContain('invalid input');
  });
});
