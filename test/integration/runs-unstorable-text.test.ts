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
import { apiOf, type ListBody } from '../helpers/http.js';
import { createAgent, createThread, readEvents, startRun, useRunServer, waitForRun } from '../helpers/runs.js';

const MODEL = 'fake-precise';
const searched: unknown[] = [];

const ctx = useTestApp(
  { MODEL_MAX_RETRIES: '0', MAX_RUN_STEPS: '3' },
  {
    tools: {
      knowledge_search: async (input) => {
        searched.push(input);
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
