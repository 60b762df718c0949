import type { AddressInfo } from 'node:net';

import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { messages, runs, threads } from '../../src/models/index.js';

import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, type ListBody, sleep } from '../helpers/http.js';
import { addFakeModels } from '../helpers/metered-models.js';
import { createAgent, createThread, expectContiguous, FINAL_EVENTS, getRun, readEvents, type RunBody, startRun, waitForRun } from '../helpers/runs.js';
import { eq } from 'drizzle-orm';

const MODEL = 'fake-precise';

/** knowledge_search as a test installs it: answers after TOOL_DELAY_MS and records when each call ran. */
const TOOL_DELAY_MS = 300;
const toolCalls: { query: string; started: number; ended: number }[] = [];

const ctx = useTestApp(
  { MAX_ACTIVE_RUNS_PER_USER: '4', MODEL_RETRY_MAX_WAIT_MS: '50', RUN_EVENTS_KEEPALIVE_SECONDS: '1', MAX_RUN_STEPS: '3' },
  {
    tools: {
      knowledge_search: async (input) => {
        const started = Date.now();
        await sleep(TOOL_DELAY_MS);
        const query = String((input as { query?: unknown }).query);
        toolCalls.push({ query, started, ended: Date.now() });
        return { passages: [{ text: `about ${query}`, source: 'doc.md' }] };
      },
    },
  },
);
const api = apiOf(ctx);
let fake: FakeModelServer;
let base: string;

beforeAll(async () => {
  fake = await FakeModelServer.start();
  await addFakeModels(ctx.app, await superuserHeaders(ctx.app), fake.url);
  await ctx.app.listen({ port: 0, host: '127.0.0.1' });
  base = `http://127.0.0.1:${(ctx.app.server.address() as AddressInfo).port}`;
});
afterAll(async () => {
  await fake?.close();
});
beforeEach(() => {
  fake.reset();
});

interface MessageBody {
  role: string;
  content: string;
  run_id: string | null;
  tool_calls: { id: string; name: string }[] | null;
  tool_call_id: string | null;
}

async function threadMessages(owner: TestUser, threadId: string): Promise<MessageBody[]> {
  const response = await api('GET', `/threads/${threadId}/messages?limit=100`, owner.headers);
  expect(response.statusCode).toBe(200);
  return response.json<ListBody<MessageBody>>().data;
}

/** A user with a default agent (on the fake model) and a thread. */
async function setup(agent: Record<string, unknown> = {}) {
  const owner = await createUser(ctx.app);
  const created = await createAgent(ctx.app, owner.headers, { is_default: true, ...agent });
  const thread = await createThread(ctx.app, owner.headers);
  return { owner, agent: created, thread };
}

describe('a run streams its answer', () => {
  it('queues (202), streams deltas over SSE in seq order, completes and writes the messages', async () => {
    fake.script(MODEL, { chunks: ['Hel', 'lo ', 'world'], chunkDelayMs: 30, usage: { prompt_tokens: 12, completion_tokens: 3 } });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'Hi there' });
    expect(run).toMatchObject({ status: 'queued', thread_id: thread.id, model: MODEL, input: 'Hi there', agent_version: 1 });

    const { events, ended } = await readEvents(base, owner.headers, run.id);
    expect(ended).toBe(true);
    expectContiguous(events);
    expect(events.map((e) => e.event)).toEqual(['run.queued', 'run.started', 'message.created', 'message.delta', 'message.delta', 'message.delta', 'message.completed', 'run.completed']);
    const created = events[2]!.data.message as { id: string; role: string };
    expect(created.role).toBe('assistant');
    const deltas = events.filter((e) => e.event === 'message.delta');
    expect(deltas.map((e) => e.data.delta).join('')).toBe('Hello world');
    for (const delta of deltas) expect(delta.data).toMatchObject({ run_id: run.id, message_id: created.id });
    const final = events.at(-1)!.data.run as RunBody;
    expect(final).toMatchObject({ status: 'completed', steps: 1, usage: { input_tokens: 12, output_tokens: 3 } });

    const stored = await getRun(ctx.app, owner.headers, run.id);
    // 12 × 1.23 + 3 × 4.56 per million tokens, exact.
    expect(stored).toMatchObject({ status: 'completed', error: null, cost: '0.00002844', steps: 1, attempts: 1 });
    const thread_ = await api('GET', `/threads/${thread.id}`, owner.headers);
    expect(thread_.json<{ status: string }>().status).toBe('idle');
    const list = await threadMessages(owner, thread.id);
    expect(list.map((m) => [m.role, m.content, m.run_id])).toEqual([
      ['user', 'Hi there', null],
      ['assistant', 'Hello world', run.id],
    ]);
    // The model got the system prompt and the thread.
    const sent = fake.requestsFor(MODEL)[0]!.body.messages as { role: string; content: string }[];
    expect(sent.map((m) => m.role)).toEqual(['system', 'user']);
  });

  it('replays from any Last-Event-ID or ?after= exactly once, live and after the end', async () => {
    fake.script(MODEL, { chunks: Array.from({ length: 12 }, (_, i) => `w${i} `), chunkDelayMs: 40 });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'count' });
    // Live: a client reads 5 events, drops, and comes back with Last-Event-ID: 5 while the run streams.
    const first = await readEvents(base, owner.headers, run.id, { limit: 5 });
    expect(first.ended).toBe(false);
    const rest = await readEvents(base, owner.headers, run.id, { lastEventId: 5 });
    expect(rest.ended).toBe(true);
    const all = [...first.events, ...rest.events];
    expectContiguous(all);
    expect(FINAL_EVENTS.has(all.at(-1)!.event)).toBe(true);
    const total = all.length;
    // After the end: every starting point gives exactly the rest.
    for (const after of [0, 1, 3, 7, total - 1]) {
      const replay = await readEvents(base, owner.headers, run.id, after % 2 ? { after } : { lastEventId: after });
      expectContiguous(replay.events, after);
      expect(replay.events.map((e) => e.event)).toEqual(all.slice(after).map((e) => e.event));
      expect(replay.events.map((e) => e.data)).toEqual(all.slice(after).map((e) => e.data));
    }
    // Read to the end: the stream closes at once.
    const none = await readEvents(base, owner.headers, run.id, { after: total });
    expect(none).toMatchObject({ events: [], ended: true });
  });

  it('sends keep-alive comments while the model is silent', async () => {
    fake.script(MODEL, { chunks: ['slow ', 'answer'], chunkDelayMs: 1_300 });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'wait' });
    const { comments, ended } = await readEvents(base, owner.headers, run.id);
    expect(ended).toBe(true);
    expect(comments.filter((c) => c === 'keep-alive').length).toBeGreaterThanOrEqual(1);
  });
});

describe('tools', () => {
  it('runs parallel tool calls, feeds their results back and loops to the answer', async () => {
    toolCalls.length = 0;
    fake.script(
      MODEL,
      {
        toolCalls: [
          { id: 'call_a', name: 'knowledge_search', arguments: '{"query":"alpha"}' },
          { id: 'call_b', name: 'knowledge_search', arguments: '{"query":"beta"}' },
          { id: 'call_c', name: 'web_search', arguments: '{"q":"x"}' },
        ],
        usage: { prompt_tokens: 5, completion_tokens: 5 },
      },
      { text: 'Found it.', usage: { prompt_tokens: 20, completion_tokens: 3 } },
    );
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'search' });
    const { events } = await readEvents(base, owner.headers, run.id);
    expectContiguous(events);
    const names = events.map((e) => e.event);
    expect(names.filter((n) => n === 'tool.call')).toHaveLength(3);
    expect(names.at(-1)).toBe('run.completed');
    const results = events.filter((e) => e.event === 'tool.result').map((e) => e.data);
    expect(results).toHaveLength(3);
    expect(results.find((r) => r.tool_call_id === 'call_c')).toMatchObject({ name: 'web_search', is_error: true });
    expect(results.find((r) => r.tool_call_id === 'call_a')).toMatchObject({ is_error: false, content: JSON.stringify({ passages: [{ text: 'about alpha', source: 'doc.md' }] }) });

    // Both searches ran at the same time, not one after the other.
    expect(toolCalls).toHaveLength(2);
    const [a, b] = toolCalls;
    expect(Math.max(a!.started, b!.started)).toBeLessThan(Math.min(a!.ended, b!.ended));

    const final = await getRun(ctx.app, owner.headers, run.id);
    expect(final).toMatchObject({ status: 'completed', steps: 2, usage: { input_tokens: 25, output_tokens: 8 } });
    const list = await threadMessages(owner, thread.id);
    expect(list.map((m) => m.role)).toEqual(['user', 'assistant', 'tool', 'tool', 'tool', 'assistant']);
    expect(list[1]!.tool_calls!.map((c) => c.id)).toEqual(['call_a', 'call_b', 'call_c']);
    expect(list.slice(2, 5).map((m) => m.tool_call_id).sort()).toEqual(['call_a', 'call_b', 'call_c']);
    expect(list[5]!.content).toBe('Found it.');
    // The second model call carried the tool results.
    const second = fake.requestsFor(MODEL)[1]!.body.messages as { role: string; tool_call_id?: string }[];
    expect(second.filter((m) => m.role === 'tool').map((m) => m.tool_call_id).sort()).toEqual(['call_a', 'call_b', 'call_c']);
  });

  it('fails in words after MAX_RUN_STEPS model calls without an answer', async () => {
    const loop = { toolCalls: [{ id: 'call_x', name: 'knowledge_search', arguments: '{"query":"again"}' }] };
    fake.script(MODEL, loop, loop, loop, loop);
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'loop' });
    const final = await waitForRun(ctx.app, owner.headers, run.id, ['failed']);
    expect(final.error).toMatch(/all 3 steps \(MAX_RUN_STEPS\)/);
    expect(final.steps).toBe(3);
  });
});
