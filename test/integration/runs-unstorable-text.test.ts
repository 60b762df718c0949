/**
 * What a model sends that PostgreSQL cannot store as it came — half of a UTF-16 surrogate pair
 * standing alone (jsonb refuses its escape, 22P02; text would keep U+FFFD) — in a run's answer, its
 * tool calls (arguments, id, name) and what reaches the thread and the events from them: stored
 * with U+FFFD in its place, as a NUL is, so the run completes instead of failing on a database error.
 */
import { beforeAll, describe, expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { type FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey, type ListBody } from '../helpers/http.js';
import { createAgent, createThread, readEvents, startRun, useRunServer, waitForRun } from '../helpers/runs.js';

const MODEL = 'fake-precise';
const searched: unknown[] = [];

const ctx = useTestApp(
  { MODEL_MAX_RETRIES: '0', MAX_RUN_STEPS: '3' },
  {
    tools: {
      knowledge_search: async (input) => {
        searched.push(input);
        // A tool's text as a document may hold it (a NUL, half of a pair).
        if ((input as { query?: unknown }).query === 'odd result') return 'pass\u0000age \udc00';
        return { passages: [{ text: 'found', source: 'doc.md' }] };
      },
    },
  },
);
const api = apiOf(ctx);
const server = useRunServer(ctx);
let fake: FakeModelServer;
let base: string;
beforeAll(() => {
  ({ fake, base } = server);
});

interface MessageBody {
  role: string;
  content: string;
  tool_calls: { id: string; name: string; arguments: Record<string, unknown> }[] | null;
  tool_call_id: string | null;
  metadata: Record<string, unknown>;
}

async function threadMessages(owner: TestUser, threadId: string): Promise<MessageBody[]> {
  const response = await api('GET', `/threads/${threadId}/messages?limit=100`, owner.headers);
  expect(response.statusCode).toBe(200);
  return response.json<ListBody<MessageBody>>().data;
}

async function setup(agent: Record<string, unknown> = {}) {
  const owner = await createUser(ctx.app);
  await createAgent(ctx.app, owner.headers, { is_default: true, ...agent });
  const thread = await createThread(ctx.app, owner.headers);
  return { owner, thread };
}

describe('a model\'s unpaired surrogates', () => {
  it('in a tool call\'s arguments (a value and a key) are stored as U+FFFD: the step is written and the run completes', async () => {
    fake.script(MODEL, { toolCalls: [{ id: 'call_half', name: 'knowledge_search', arguments: '{"query":"a\\ud800b","\\udc00":1}' }] }, { text: 'done' });
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'search half' });
    const { events } = await readEvents(base, owner.headers, run.id);
    expect(await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed'])).toMatchObject({ status: 'completed', error: null });
    const stored = await threadMessages(owner, thread.id);
    const call = stored.find((m) => m.tool_calls)!.tool_calls![0]!;
    expect(call.arguments).toEqual({ query: 'a\uFFFDb', '\uFFFD': 1 });
    // The event says what the thread holds.
    expect(events.find((e) => e.event === 'tool.call')!.data.arguments).toEqual({ query: 'a\uFFFDb', '\uFFFD': 1 });
    expect(stored.map((m) => m.role)).toEqual(['user', 'assistant', 'tool', 'assistant']);
  });

  it('in a tool call\'s id and name are stored as U+FFFD, alike in the call, its tool message and its events', async () => {
    fake.script(MODEL, { toolCalls: [{ id: 'call_\ud800', name: 'search\udc00', arguments: '{}' }] }, { text: 'done' });
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'odd tool' });
    const { events } = await readEvents(base, owner.headers, run.id);
    expect(await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed'])).toMatchObject({ status: 'completed', error: null });
    const stored = await threadMessages(owner, thread.id);
    expect(stored.find((m) => m.tool_calls)!.tool_calls![0]).toMatchObject({ id: 'call_\uFFFD', name: 'search\uFFFD' });
    const result = stored.find((m) => m.role === 'tool')!;
    expect(result).toMatchObject({ tool_call_id: 'call_\uFFFD', metadata: { name: 'search\uFFFD', is_error: true } });
    expect(result.content).toBe('Error: there is no tool named search\uFFFD for this agent');
    expect(events.find((e) => e.event === 'tool.call')!.data).toMatchObject({ tool_call_id: 'call_\uFFFD', name: 'search\uFFFD' });
    expect(events.find((e) => e.event === 'tool.result')!.data).toMatchObject({ tool_call_id: 'call_\uFFFD', name: 'search\uFFFD', content: result.content });
  });

  it('in the answer\'s text are stored as U+FFFD, and the deltas say the same; a pair cut between two chunks stays whole', async () => {
    const emoji = '\u{1F600}';
    fake.script(MODEL, { chunks: ['lone: a\ud800b, ', emoji[0]!, `${emoji[1]!}, end: `, '\udbff'] });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'say half' });
    const { events } = await readEvents(base, owner.headers, run.id);
    expect(await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed'])).toMatchObject({ status: 'completed', error: null });
    const answer = `lone: a\uFFFDb, ${emoji}, end: \uFFFD`;
    expect((await threadMessages(owner, thread.id)).map((m) => m.content)).toEqual(['say half', answer]);
    expect(events.filter((e) => e.event === 'message.delta').map((e) => e.data.delta).join('')).toBe(answer);
    expect(events.find((e) => e.event === 'message.completed')!.data.message).toMatchObject({ content: answer });
  });
});

describe('a tool\'s result', () => {
  it('with a NUL or half of a surrogate pair is stored with U+FFFD, as its event says: the run completes', async () => {
    fake.script(MODEL, { toolCalls: [{ id: 'call_odd', name: 'knowledge_search', arguments: '{"query":"odd result"}' }] }, { text: 'done' });
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'odd result' });
    const { events } = await readEvents(base, owner.headers, run.id);
    expect(await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed'])).toMatchObject({ status: 'completed', error: null });
    const result = (await threadMessages(owner, thread.id)).find((m) => m.role === 'tool')!;
    expect(result.content).toBe('pass\uFFFDage \uFFFD');
    expect(events.find((e) => e.event === 'tool.result')!.data.content).toBe(result.content);
  });
});

describe('a provider\'s words on a run', () => {
  it('a refusal (400) whose message holds a NUL, half of a surrogate pair, and more than a run\'s error keeps is stored cleaned and cut: the run fails with it', async () => {
    const words = `bad\u0000input \ud800 ${'x'.repeat(5_000)}`;
    fake.script(MODEL, { status: 400, body: { error: { message: words, type: 'invalid_request_error', code: null, param: null } } });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'refused' });
    const { events } = await readEvents(base, owner.headers, run.id);
    const failed = await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed']);
    expect(failed.status).toBe('failed');
    expect(failed.error).toMatch(/^The provider refused the request for model fake-precise \(400\): .*badinput \uFFFD x+$/s);
    expect(failed.error!.length).toBeLessThanOrEqual(2_100);
    expect(events.at(-1)).toMatchObject({ event: 'run.failed', data: { run: { error: failed.error } } });
  });
});

describe('a client\'s NUL character', () => {
  it('in a run\'s input or an agent: completion\'s history is refused (422, 400) before a thread is made for it: none is left behind', async () => {
    const { owner } = await setup();
    const agent = await createAgent(ctx.app, owner.headers, { name: 'Helper' });
    const key = await createKey(ctx.app, owner);
    const threads = async () => (await api('GET', '/threads', owner.headers)).json<ListBody<unknown>>().count;
    const before = await threads();

    const run = await api('POST', '/runs', owner.headers, { input: 'a\u0000b' });
    expect(run.statusCode, run.body).toBe(422);
    expect(run.json<{ detail: { loc: unknown[] }[] }>().detail[0]!.loc).toEqual(['body', 'input']);

    const completion = await ctx.app.inject({
      method: 'POST',
      url: '/v1/chat/completions',
      headers: { authorization: `Bearer ${key.key}` },
      payload: { model: `agent:${agent.id}`, messages: [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'x\u0000y' }, { role: 'user', content: 'And now?' }] },
    });
    expect(completion.statusCode, completion.body).toBe(400);
    expect(completion.json<{ error: { param: string | null } }>().error.param).toBe('messages[1].content');
    expect(await threads()).toBe(before);
  });
});
