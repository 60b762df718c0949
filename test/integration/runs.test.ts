import { randomUUID } from 'node:crypto';
import { type AddressInfo, connect } from 'node:net';

import { eq, sql } from 'drizzle-orm';
import pino from 'pino';
import { beforeAll, describe, expect, it, vi } from 'vitest';

import { type Db, transaction } from '../../src/core/db.js';
import { PgliteStatementClient } from '../../src/core/pglite-client.js';

import { messages, runEvents, runs, threads } from '../../src/models/index.js';

import * as runCrud from '../../src/crud/run.js';
import { appendMessages } from '../../src/crud/thread.js';
import { DatabaseRunEventLog, type EmbeddedRunEvents } from '../../src/modules/agents/embedded-run-bus.js';
import { createRedisRunBus } from '../../src/modules/agents/redis-run-bus.js';
import { RedisRunEventLog } from '../../src/modules/agents/redis-run-events.js';
import type { NewRunEvent, RunEventLog } from '../../src/modules/agents/run-bus.js';
import { RunBusUnavailableError } from '../../src/modules/agents/run-bus-errors.js';
import { finishRun } from '../../src/modules/agents/run-lifecycle.js';
import { MISSING_TOOL_RESULT } from '../../src/modules/agents/runner.js';
import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { type FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey, type ListBody, sleep, xApiKey } from '../helpers/http.js';
import { createAgent, createThread, expectContiguous, expectIncreasing, FINAL_EVENTS, getRun, orphanRun, readEvents, type RunBody, startRun, useRunServer, waitForRun } from '../helpers/runs.js';

const MODEL = 'fake-precise';

/** knowledge_search as a test installs it: answers after TOOL_DELAY_MS and records when each call ran. */
const TOOL_DELAY_MS = 300;
const toolCalls: { query: string; started: number; ended: number }[] = [];

const ctx = useTestApp(
  // A 6 s lease is renewed every 2 s: a cancel the worker did not hear is noticed then.
  { MAX_ACTIVE_RUNS_PER_USER: '4', MODEL_RETRY_MAX_WAIT_MS: '50', RUN_EVENTS_KEEPALIVE_SECONDS: '1', MAX_RUN_STEPS: '3', RUN_LEASE_SECONDS: '6' },
  {
    tools: {
      knowledge_search: async (input) => {
        const started = Date.now();
        await sleep(TOOL_DELAY_MS);
        const query = String((input as { query?: unknown }).query);
        // A failure whose text is not for the model (as a database error's would be).
        if (query === 'explode') throw new Error('relation "internal_secret" does not exist');
        toolCalls.push({ query, started, ended: Date.now() });
        return { passages: [{ text: `about ${query}`, source: 'doc.md' }] };
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
  id: string;
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

/** What the expiry of a run's events does, at once: the database's rows, or the Redis stream. */
async function forgetEvents(runId: string): Promise<void> {
  const { events } = ctx.app.runs.bus;
  if (events instanceof RedisRunEventLog) await ctx.app.redis!.del(events.streamKey(runId));
  else await ctx.app.db.delete(runEvents).where(eq(runEvents.run_id, runId));
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
    // The events' message is the message as listed (MessagePublic): the completed one equal to it, the opened one with its fields.
    expect(events[6]!.data.message).toEqual(list[1]);
    expect(Object.keys(created).sort()).toEqual(Object.keys(list[1]!).sort());
    expect(created).toMatchObject({ id: list[1]!.id, content: '', tool_calls: null, tool_call_id: null, metadata: {} });
    // The model got the system prompt and the thread.
    const sent = fake.requestsFor(MODEL)[0]!.body.messages as { role: string; content: string }[];
    expect(sent.map((m) => m.role)).toEqual(['system', 'user']);
  });

  it('a model whose answer PostgreSQL cannot store as it came (a NUL character, an emoji cut between two chunks) has it stored as near as it can: the run completes', async () => {
    const emoji = '\u{1F600}';
    fake.script(MODEL, { chunks: ['nul: a\u0000b, emoji: ', emoji[0]!, `${emoji[1]!}!`] });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'say nul' });
    const { events, ended } = await readEvents(base, owner.headers, run.id);
    expect(ended).toBe(true);
    const final = await getRun(ctx.app, owner.headers, run.id);
    expect(final).toMatchObject({ status: 'completed', error: null });
    expect(events.at(-1)!.data.run).toMatchObject({ status: 'completed' });
    expect((await threadMessages(owner, thread.id)).map((m) => m.content)).toEqual(['say nul', `nul: a\uFFFDb, emoji: ${emoji}!`]);
    // The deltas say what the thread holds.
    expect(events.filter((e) => e.event === 'message.delta').map((e) => e.data.delta).join('')).toBe(`nul: a\uFFFDb, emoji: ${emoji}!`);
  });

  it('a model that refuses (OpenAI\'s refusal, apart from its text) has its refusal streamed and stored as the answer: the run completes', async () => {
    const no = "I can't help with that.";
    fake.script(MODEL, { refusal: no });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'something refused' });
    const { events, ended } = await readEvents(base, owner.headers, run.id);
    expect(ended).toBe(true);
    expect(events.filter((e) => e.event === 'message.delta').map((e) => e.data.delta).join('')).toBe(no);
    expect(events.at(-1)!.data.run).toMatchObject({ status: 'completed' });
    expect((await threadMessages(owner, thread.id)).map((m) => m.content)).toEqual(['something refused', no]);
  });

  it('a model that interleaves its text and its refusal has the answer stored as it streamed: the thread reads as a replay of the stream', async () => {
    fake.script(MODEL, { deltas: [{ content: 'Sure, ' }, { refusal: "I can't " }, { content: 'well, ' }, { refusal: 'do that.' }] });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'mixed' });
    const { events, ended } = await readEvents(base, owner.headers, run.id);
    expect(ended).toBe(true);
    const streamed = events.filter((e) => e.event === 'message.delta').map((e) => e.data.delta);
    expect(streamed).toEqual(['Sure, ', "I can't ", 'well, ', 'do that.']);
    // Arrival order, not the text and then the refusal ("Sure, well, I can't do that.").
    const answer = streamed.join('');
    expect(events.find((e) => e.event === 'message.completed')!.data.message).toMatchObject({ role: 'assistant', content: answer });
    expect((await threadMessages(owner, thread.id)).map((m) => m.content)).toEqual(['mixed', answer]);
    expect(events.at(-1)!.data.run).toMatchObject({ status: 'completed' });
  });

  it('a tool call whose arguments hold a NUL character is stored with U+FFFD in its place: the run completes', async () => {
    fake.script(MODEL, { toolCalls: [{ id: 'call_nul', name: 'knowledge_search', arguments: '{"query":"a\\u0000b","\\u0000":1}' }] }, { text: 'done' });
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'search nul' });
    expect(await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed'])).toMatchObject({ status: 'completed', error: null });
    const call = (await threadMessages(owner, thread.id)).find((m) => m.tool_calls)!.tool_calls![0] as unknown as { arguments: Record<string, unknown> };
    expect(call.arguments).toEqual({ query: 'a\uFFFDb', '\uFFFD': 1 });
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
    // A browser's EventSource opened with ?after=N reconnects to the same URL with Last-Event-ID: M:
    // the later of the two, so nothing comes twice (and an earlier Last-Event-ID does not go back).
    for (const [after, lastEventId] of [[2, 5], [5, 2]] as const) {
      const resumed = await readEvents(base, owner.headers, run.id, { after, lastEventId });
      expectContiguous(resumed.events, 5);
      expect(resumed.events.length).toBe(total - 5);
    }
    // Read to the end: the stream closes at once.
    const none = await readEvents(base, owner.headers, run.id, { after: total });
    expect(none).toMatchObject({ events: [], ended: true });
    // A seq written as no query writes a number (Number() reads these as 1 and 10).
    for (const after of ['0x1', '1e1', '']) expect((await api('GET', `/runs/${run.id}/events?after=${after}`, owner.headers)).statusCode, after).toBe(422);

    // Once its events have expired (RUN_EVENTS_TTL_SECONDS): 410 in words, from any point.
    await forgetEvents(run.id);
    for (const after of [0, total]) {
      const gone = await api('GET', `/runs/${run.id}/events?after=${after}`, owner.headers);
      expect(gone.statusCode).toBe(410);
      expect(gone.json<{ detail: string }>().detail).toMatch(/expired.*GET \/runs\//);
    }
    expect((await getRun(ctx.app, owner.headers, run.id)).status).toBe('completed');
  });

  it('a client that stops reading never holds up the run or the other readers', async () => {
    const pieces = Array.from({ length: 3_000 }, (_, i) => `token-${i}-${'x'.repeat(40)} `);
    fake.script(MODEL, { chunks: pieces });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'flood' });
    // A raw connection that asks for the stream and then reads nothing.
    const { port } = ctx.app.server.address() as AddressInfo;
    const stalled = connect(port, '127.0.0.1');
    stalled.write(`GET /api/v1/runs/${run.id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: ${owner.headers.authorization}\r\n\r\n`);
    stalled.pause();
    const { events } = await readEvents(base, owner.headers, run.id, { timeoutMs: 30_000 });
    expectContiguous(events);
    expect(events.filter((e) => e.event === 'message.delta')).toHaveLength(pieces.length);
    expect((await waitForRun(ctx.app, owner.headers, run.id, ['completed'])).status).toBe('completed');
    stalled.destroy();
  });

  it('sends keep-alive comments while the model is silent', async () => {
    // Two frames (the answer, the finish; no usage chunk), 1.3 s before each: 2.6 s of a run whose
    // stream sends a keep-alive every second (four frames took 5.2 s for the same check).
    fake.script(MODEL, { chunks: ['slow answer'], usage: null, chunkDelayMs: 1_300 });
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

  it('runs at most MAX_TOOL_CALLS_PER_STEP (32) of the tool calls one step asks for; the rest answer the model with an error result, and the run goes on', async () => {
    toolCalls.length = 0;
    const asked = Array.from({ length: 40 }, (_, i) => ({ id: `call_${i}`, name: 'knowledge_search', arguments: JSON.stringify({ query: `q${i}` }) }));
    fake.script(MODEL, { toolCalls: asked, usage: { prompt_tokens: 5, completion_tokens: 5 } }, { text: 'Done.', usage: { prompt_tokens: 9, completion_tokens: 2 } });
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'search everything' });
    const { events } = await readEvents(base, owner.headers, run.id);
    expectContiguous(events);
    expect(events.at(-1)!.event).toBe('run.completed');
    expect(toolCalls.map((c) => c.query).sort()).toEqual(asked.slice(0, 32).map((_, i) => `q${i}`).sort());
    const results = events.filter((e) => e.event === 'tool.result').map((e) => e.data);
    expect(results).toHaveLength(40);
    const refusal = 'Error: not run: this step asked for more than 32 tool calls (MAX_TOOL_CALLS_PER_STEP); ask for the rest in the next step';
    const refused = results.filter((r) => r.is_error);
    expect(refused.map((r) => r.tool_call_id).sort()).toEqual(asked.slice(32).map((c) => c.id).sort());
    for (const result of refused) expect(result).toMatchObject({ name: 'knowledge_search', content: refusal });
    // The model reads every call's result, the refusals included.
    const second = fake.requestsFor(MODEL)[1]!.body.messages as { role: string; tool_call_id?: string; content?: string }[];
    const toolResults = second.filter((m) => m.role === 'tool');
    expect(toolResults).toHaveLength(40);
    expect(toolResults.filter((m) => m.content === refusal).map((m) => m.tool_call_id).sort()).toEqual(asked.slice(32).map((c) => c.id).sort());
    expect(await getRun(ctx.app, owner.headers, run.id)).toMatchObject({ status: 'completed', steps: 2 });
  });

  it("tells the model a tool failed without the error's own text, which may be the database's", async () => {
    fake.script(MODEL, { toolCalls: [{ id: 'call_x', name: 'knowledge_search', arguments: '{"query":"explode"}' }], usage: { prompt_tokens: 5, completion_tokens: 5 } }, { text: 'Sorry.', usage: { prompt_tokens: 9, completion_tokens: 2 } });
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'search' });
    const { events } = await readEvents(base, owner.headers, run.id);
    expect(events.at(-1)!.event).toBe('run.completed');
    const result = events.find((e) => e.event === 'tool.result')!.data;
    expect(result).toMatchObject({ tool_call_id: 'call_x', is_error: true, content: 'Error: the tool knowledge_search failed' });
    // Nor does the model's next request carry it.
    expect(JSON.stringify(fake.log.at(-1)!.body)).not.toContain('internal_secret');
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

describe('an agent whose model is disabled after it was made', () => {
  it('is still read and renamed, is refused (422) a change naming the model, and its run fails in words, recording the version it ran', async () => {
    const admin = await superuserHeaders(ctx.app);
    const retired = { id: `fake-retired-${randomUUID().slice(0, 8)}`, provider: 'fake', pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' } };
    expect((await api('POST', '/models', admin, retired)).statusCode).toBe(200);
    const { owner, agent, thread } = await setup({ model: retired.id, system_prompt: 'First.' });
    expect((await api('PATCH', `/agents/${agent.id}`, owner.headers, { system_prompt: 'Second.' })).json()).toMatchObject({ version: 2 });
    expect((await api('PATCH', `/models/${retired.id}`, admin, { enabled: false })).statusCode).toBe(200);

    expect((await api('GET', `/agents/${agent.id}`, owner.headers)).json()).toMatchObject({ model: retired.id, version: 2 });
    expect((await api('PATCH', `/agents/${agent.id}`, owner.headers, { name: 'Renamed' })).json()).toMatchObject({ name: 'Renamed', version: 2 });
    const refused = await api('PATCH', `/agents/${agent.id}`, owner.headers, { model: retired.id });
    expect(refused.statusCode).toBe(422);
    expect(refused.json()).toEqual({ detail: [expect.objectContaining({ loc: ['body', 'model'], msg: `Model "${retired.id}" is disabled` })] });

    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'hello' });
    expect(run.agent_version).toBe(2);
    const failed = await waitForRun(ctx.app, owner.headers, run.id, ['failed']);
    expect(failed.error).toMatch(/not in the model catalog or is disabled/);
    expect(failed.agent_version).toBe(2);
  });
});

describe("a key's max_budget, billing off", () => {
  it('a start whose first step the budget left cannot cover is 402 before anything is written, the thread\'s history counted', async () => {
    // fake-precise: 1.23 in, 4.56 out per million; 10 output tokens at most: 45.6 millionths, plus the prompt.
    const { owner, thread } = await setup({ max_output_tokens: 10 });
    const key = await createKey(ctx.app, owner, { name: 'capped', max_budget: '0.0001' });
    // A short thread fits the budget…
    fake.script(MODEL, { text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 1 } });
    const first = await startRun(ctx.app, xApiKey(key.key), thread.id, { input: 'hi' });
    await waitForRun(ctx.app, owner.headers, first.id, ['completed']);
    // …one whose history is ~1,000 tokens does not (1.23 millionths a token): refused before its run or message is written.
    expect((await api('POST', `/threads/${thread.id}/messages`, owner.headers, { content: 'history '.repeat(500) })).statusCode).toBe(200);
    const messagesBefore = (await api('GET', `/threads/${thread.id}/messages`, owner.headers)).json<{ count: number }>().count;
    const refused = await api('POST', `/threads/${thread.id}/runs`, xApiKey(key.key), { input: 'hi again' });
    expect(refused.statusCode, refused.body).toBe(402);
    expect(refused.json<{ detail: string }>().detail).toMatch(/^API key budget exceeded: max_budget 0\.0001, spent /);
    expect((await api('GET', `/threads/${thread.id}/runs`, owner.headers)).json<{ count: number }>().count).toBe(1);
    expect((await api('GET', `/threads/${thread.id}/messages`, owner.headers)).json<{ count: number }>().count).toBe(messagesBefore);
  });
});

describe('what a revoked key or a deactivated user started', () => {
  /** A user, a key of theirs, a run of the key streaming slowly (two pieces sent), one queued behind it, and one the user started with their token. */
  async function keyRuns() {
    fake.script(MODEL, { chunks: Array.from({ length: 50 }, (_, i) => `t${i} `), chunkDelayMs: 100 }, { chunks: ['own ', 'answer ', 'comes ', 'slowly'], chunkDelayMs: 300 });
    const { owner, thread } = await setup();
    const key = await createKey(ctx.app, owner, { name: 'leaked' });
    const running = await startRun(ctx.app, xApiKey(key.key), thread.id, { input: 'long' });
    const queued = await startRun(ctx.app, xApiKey(key.key), thread.id, { input: 'two', multitask_strategy: 'enqueue' });
    expect(queued.status).toBe('queued');
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 2));
    const otherThread = await createThread(ctx.app, owner.headers);
    const own = await startRun(ctx.app, owner.headers, otherThread.id, { input: 'mine' });
    await fake.waitFor((log) => log.filter((r) => r.model === MODEL).length === 2);
    return { owner, thread, key, running, queued, own };
  }

  it('revoking the key cancels the runs it started (the model call aborted at once, the queued one never calls it); the user\'s own run goes on', async () => {
    const { owner, key, running, queued, own } = await keyRuns();
    const sent = Date.now();
    const revoked = await api('PATCH', `/api-keys/${key.id}`, owner.headers, { status: 'revoked' });
    expect(revoked.statusCode, revoked.body).toBe(200);
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.aborted), 1_000);
    expect(Date.now() - sent).toBeLessThan(1_000);
    for (const run of [running, queued]) expect(await getRun(ctx.app, owner.headers, run.id)).toMatchObject({ status: 'cancelled', error: 'API key revoked' });
    const { events } = await readEvents(base, owner.headers, running.id);
    expect(events.at(-1)!.event).toBe('run.cancelled');
    expect(await waitForRun(ctx.app, owner.headers, own.id, ['completed', 'failed', 'cancelled'])).toMatchObject({ status: 'completed' });
    // Two model calls: the queued run never got one.
    expect(fake.requestsFor(MODEL)).toHaveLength(2);
  });

  it('deleting the key cancels them too', async () => {
    const { owner, key, running, queued, own } = await keyRuns();
    expect((await api('DELETE', `/api-keys/${key.id}`, owner.headers)).statusCode).toBe(200);
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.aborted), 1_000);
    for (const run of [running, queued]) expect(await getRun(ctx.app, owner.headers, run.id)).toMatchObject({ status: 'cancelled', error: 'API key deleted' });
    expect((await api('GET', `/api-keys/${key.id}`, owner.headers)).statusCode).toBe(404);
    expect(await waitForRun(ctx.app, owner.headers, own.id, ['completed', 'failed', 'cancelled'])).toMatchObject({ status: 'completed' });
  });

  it("deactivating a user cancels all their runs (the key's and the token's); another user's run goes on", async () => {
    const { owner, running, queued, own } = await keyRuns();
    fake.script(MODEL, { chunks: ['x ', 'y ', 'z'], chunkDelayMs: 200 });
    const other = await setup();
    const theirs = await startRun(ctx.app, other.owner.headers, other.thread.id, { input: 'keep going' });
    await fake.waitFor((log) => log.filter((r) => r.model === MODEL).length === 3);
    const deactivated = await api('PATCH', `/users/${owner.user.id}`, await superuserHeaders(ctx.app), { is_active: false });
    expect(deactivated.statusCode, deactivated.body).toBe(200);
    await fake.waitFor((log) => log.filter((r) => r.model === MODEL && r.aborted).length === 2, 1_000);
    const [rows] = [await ctx.app.db.select().from(runs).where(eq(runs.owner_id, owner.user.id))];
    expect(rows.map((r) => [r.status, r.error]).sort()).toEqual(Array(3).fill(['cancelled', 'User deactivated']));
    expect([running.id, queued.id, own.id].sort()).toEqual(rows.map((r) => r.id).sort());
    expect(await waitForRun(ctx.app, other.owner.headers, theirs.id, ['completed', 'failed', 'cancelled'])).toMatchObject({ status: 'completed' });
  });

  it("another user cannot revoke or delete the key (404): its runs go on", async () => {
    fake.script(MODEL, { chunks: ['a ', 'b ', 'c'], chunkDelayMs: 150 });
    const { owner, thread } = await setup();
    const key = await createKey(ctx.app, owner, { name: 'mine' });
    const run = await startRun(ctx.app, xApiKey(key.key), thread.id, { input: 'go' });
    const stranger = await createUser(ctx.app);
    expect((await api('PATCH', `/api-keys/${key.id}`, stranger.headers, { status: 'revoked' })).statusCode).toBe(404);
    expect((await api('DELETE', `/api-keys/${key.id}`, stranger.headers)).statusCode).toBe(404);
    expect(await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed', 'cancelled'])).toMatchObject({ status: 'completed', error: null });
    expect((await api('GET', `/api-keys/${key.id}`, owner.headers)).json<{ status: string }>().status).toBe('active');
  });
});

describe('deleting what holds a running run', () => {
  it('a project, its owner or the owner by an admin: 409 while a run works on one of its threads, deleted once it has ended; the run ends as cancelled, its readers too', async () => {
    fake.script(MODEL, { chunks: Array.from({ length: 50 }, (_, i) => `t${i} `), chunkDelayMs: 100 });
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true });
    const project = (await api('POST', '/projects', owner.headers, { name: 'busy' })).json<{ id: string }>();
    const thread = (await api('POST', '/threads', owner.headers, { project_id: project.id })).json<{ id: string }>();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'long' });
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 2));
    const reading = readEvents(base, owner.headers, run.id);
    const admin = await superuserHeaders(ctx.app);
    const refusals = [
      [await api('DELETE', `/projects/${project.id}`, owner.headers), 'Project has runs in progress on one of its threads: cancel them or wait for them to end, then delete it'],
      [await api('DELETE', '/users/me', owner.headers), 'You have runs in progress: cancel them (POST /runs/{id}/cancel) or wait for them to end, then delete your account'],
      [await api('DELETE', `/users/${owner.user.id}`, admin), 'The user has runs in progress: deactivate the user (which cancels them) or wait for them to end, then delete'],
    ] as const;
    for (const [response, detail] of refusals) {
      expect(response.statusCode, response.body).toBe(409);
      expect(response.json()).toEqual({ detail });
    }
    expect((await getRun(ctx.app, owner.headers, run.id)).status).toBe('running');
    expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).statusCode).toBe(200);
    const { events, ended } = await reading;
    expect(ended).toBe(true);
    expect(events.at(-1)!.event).toBe('run.cancelled');
    await waitForRun(ctx.app, owner.headers, run.id, ['cancelled']);
    expect((await api('DELETE', `/projects/${project.id}`, owner.headers)).statusCode).toBe(200);
    expect((await api('GET', `/threads/${thread.id}`, owner.headers)).statusCode).toBe(404);
    expect((await api('DELETE', `/users/${owner.user.id}`, admin)).statusCode).toBe(200);
  });
});

describe('moving a thread that holds a running run', () => {
  it("to another project (or none) is 409, as its delete is: the run would stay in the old project, out of reach of the new project's keys; renames go on, and once the run has ended it moves", async () => {
    fake.script(MODEL, { chunks: Array.from({ length: 50 }, (_, i) => `t${i} `), chunkDelayMs: 100 });
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true });
    const [from, to] = await Promise.all(['from', 'to'].map(async (name) => (await api('POST', '/projects', owner.headers, { name })).json<{ id: string }>()));
    const thread = (await api('POST', '/threads', owner.headers, { project_id: from!.id })).json<{ id: string }>();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'long' });
    const queued = await startRun(ctx.app, owner.headers, thread.id, { input: 'next', multitask_strategy: 'enqueue' });
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 2));
    for (const project_id of [to!.id, null]) {
      const refused = await api('PATCH', `/threads/${thread.id}`, owner.headers, { project_id, title: 'moved' });
      expect(refused.statusCode, refused.body).toBe(409);
      expect(refused.json()).toEqual({ detail: 'Thread is busy: a run is working on it, and its runs would stay in the thread\'s old project; wait for them to end or cancel them, then move the thread' });
    }
    const renamed = await api('PATCH', `/threads/${thread.id}`, owner.headers, { title: 'renamed', project_id: from!.id });
    expect(renamed.json(), renamed.body).toMatchObject({ title: 'renamed', project_id: from!.id, status: 'busy' });
    // The old project's key still reaches its runs, and cancels them.
    const fromKey = xApiKey((await createKey(ctx.app, owner, { name: 'from', project_id: from!.id })).key);
    for (const active of [queued, run]) expect((await api('POST', `/runs/${active.id}/cancel`, fromKey)).statusCode).toBe(200);
    await waitForRun(ctx.app, owner.headers, run.id, ['cancelled']);
    const moved = await api('PATCH', `/threads/${thread.id}`, owner.headers, { project_id: to!.id });
    expect(moved.statusCode, moved.body).toBe(200);
    expect(moved.json()).toMatchObject({ project_id: to!.id, status: 'idle' });
  });
});

describe('moving an idle thread', () => {
  it("takes its runs to the new project: the old project's keys no longer read them or their events, the new project's do; deleting the old project keeps them", async () => {
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true });
    const [from, to] = await Promise.all(['from', 'to'].map(async (name) => (await api('POST', '/projects', owner.headers, { name })).json<{ id: string }>()));
    const fromKey = xApiKey((await createKey(ctx.app, owner, { name: 'from', project_id: from!.id })).key);
    const toKey = xApiKey((await createKey(ctx.app, owner, { name: 'to', project_id: to!.id })).key);
    const thread = await createThread(ctx.app, fromKey);
    fake.script(MODEL, { text: 'answered' });
    const run = await startRun(ctx.app, fromKey, thread.id, { input: 'question' });
    await waitForRun(ctx.app, owner.headers, run.id, ['completed']);
    const reads = (headers: Record<string, string>) =>
      Promise.all([`/runs/${run.id}`, `/runs/${run.id}/events`, `/threads/${thread.id}/runs`].map(async (path) => (await api('GET', path, headers)).statusCode));
    expect(await reads(fromKey)).toEqual([200, 200, 200]);
    expect(await reads(toKey)).toEqual([404, 404, 404]);

    const moved = await api('PATCH', `/threads/${thread.id}`, owner.headers, { project_id: to!.id });
    expect(moved.statusCode, moved.body).toBe(200);
    expect(await reads(fromKey)).toEqual([404, 404, 404]);
    expect(await reads(toKey)).toEqual([200, 200, 200]);
    expect((await api('GET', `/runs/${run.id}`, toKey)).json()).toMatchObject({ id: run.id, project_id: to!.id });
    expect((await api('GET', `/threads/${thread.id}/runs`, toKey)).json<ListBody<{ id: string }>>().data.map((r) => r.id)).toEqual([run.id]);
    // The scope limited the run while it worked; kept on the ended run, the old project's delete took the run (cascade) from a thread now elsewhere.
    const [stored] = await ctx.app.db.select({ project_id: runs.project_id, scope_project_id: runs.scope_project_id }).from(runs).where(eq(runs.id, run.id));
    expect(stored).toEqual({ project_id: to!.id, scope_project_id: null });
    expect((await api('DELETE', `/projects/${from!.id}`, owner.headers)).statusCode).toBe(200);
    expect((await api('GET', `/threads/${thread.id}/runs`, toKey)).json<ListBody<{ id: string }>>().data.map((r) => r.id)).toEqual([run.id]);

    // Out of every project (the account's): neither project's key reads them; the owner does.
    expect((await api('PATCH', `/threads/${thread.id}`, owner.headers, { project_id: null })).statusCode).toBe(200);
    expect(await reads(toKey)).toEqual([404, 404, 404]);
    expect((await api('GET', `/runs/${run.id}`, owner.headers)).json()).toMatchObject({ project_id: null });
  });
});

describe('cancel', () => {
  /** A run whose model is streaming `chunks` slow pieces (two sent), and a reader of its events. */
  async function streamingRun(chunks: number) {
    fake.script(MODEL, { chunks: Array.from({ length: chunks }, (_, i) => `t${i} `), chunkDelayMs: 100 });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'long' });
    const reading = readEvents(base, owner.headers, run.id);
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 2));
    return { owner, thread, run, reading };
  }

  it('mid-stream: aborts the upstream request within 1 s, ends the stream with run.cancelled, writes no answer', async () => {
    const { owner, thread, run, reading } = await streamingRun(50);
    const sent = Date.now();
    const cancelled = await api('POST', `/runs/${run.id}/cancel`, owner.headers);
    expect(cancelled.statusCode, cancelled.body).toBe(200);
    expect(cancelled.json<RunBody>().status).toBe('cancelled');
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.aborted), 1_000);
    expect(Date.now() - sent).toBeLessThan(1_000);
    const { events, ended } = await reading;
    expect(ended).toBe(true);
    expectContiguous(events);
    expect(events.at(-1)!.event).toBe('run.cancelled');
    expect(events.filter((e) => FINAL_EVENTS.has(e.event))).toHaveLength(1);
    expect((await threadMessages(owner, thread.id)).map((m) => m.role)).toEqual(['user']);
    const thread_ = await api('GET', `/threads/${thread.id}`, owner.headers);
    expect(thread_.json<{ status: string }>().status).toBe('idle');
    // A final status never changes.
    expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).statusCode).toBe(409);
    await sleep(200);
    expect((await getRun(ctx.app, owner.headers, run.id)).status).toBe('cancelled');
  });

  it('a cancel whose signal never reached the worker is noticed at its next lease renewal', async () => {
    const { owner, thread, run, reading } = await streamingRun(100);
    // What POST /cancel writes to the database, without the signal (a lost pub/sub message).
    const written = Date.now();
    expect(await finishRun(ctx.app.runs, run, { status: 'cancelled' }, null)).toBeDefined();
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.aborted), 5_000);
    // Within one renewal period (RUN_LEASE_SECONDS / 3 = 2 s), with slack for a busy machine.
    expect(Date.now() - written).toBeLessThan(3_500);
    const { events } = await reading;
    expectContiguous(events);
    expect(events.filter((e) => FINAL_EVENTS.has(e.event)).map((e) => e.event)).toEqual(['run.cancelled']);
    expect((await threadMessages(owner, thread.id)).map((m) => m.role)).toEqual(['user']);
  });

  it('while queued (behind another run): cancelled at once, never calls the model', async () => {
    fake.script(MODEL, { chunks: ['a ', 'b ', 'c'], chunkDelayMs: 150 });
    const { owner, thread } = await setup();
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'one' });
    const second = await startRun(ctx.app, owner.headers, thread.id, { input: 'two', multitask_strategy: 'enqueue' });
    expect(second.status).toBe('queued');
    const cancelled = await api('POST', `/runs/${second.id}/cancel`, owner.headers);
    expect(cancelled.json<RunBody>().status).toBe('cancelled');
    const { events } = await readEvents(base, owner.headers, second.id);
    expect(events.map((e) => e.event)).toEqual(['run.queued', 'run.cancelled']);
    await waitForRun(ctx.app, owner.headers, first.id, ['completed']);
    expect(fake.requestsFor(MODEL)).toHaveLength(1);
    // Its input never became a message: it never held the thread.
    expect((await threadMessages(owner, thread.id)).map((m) => m.content)).toEqual(['one', 'a b c']);
  });
});

describe('statements per run (embedded)', () => {
  // Each statement is a round trip into PGlite's WebAssembly on the one thread that also serves
  // HTTP: a start and a run's last step send as few as their checks allow (bench/runs.mjs).
  it.skipIf(Boolean(process.env.DATABASE_URL))('a start locks the owner and the thread in one statement and inserts its input with the run; the answering step locks the thread and fences the run in one; both commit with their last statement', async () => {
    fake.script(MODEL, { chunks: ['Hi'] });
    const { owner, thread } = await setup();
    // Statements by the transaction (or none) they ran in: the client's scope object.
    const byScope = new Map<unknown, string[]>();
    const client = PgliteStatementClient.prototype as unknown as { run: (scope: unknown, text: string, ...rest: unknown[]) => unknown };
    const original = client.run;
    const spy = vi.spyOn(client, 'run').mockImplementation(function (this: unknown, scope, text, ...rest) {
      byScope.set(scope, [...(byScope.get(scope) ?? []), text.replace(/\s+/g, ' ')]);
      return original.call(this, scope, text, ...rest);
    });
    // A transaction's COMMIT sent with its last statement (commitWithNextStatement) is split off its reply here.
    const withCommit = vi.spyOn(PgliteStatementClient.prototype as unknown as { beforeCommit: (reply: Uint8Array) => Uint8Array }, 'beforeCommit');
    let commitsWithStatements: number;
    try {
      const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'Hi there' });
      await waitForRun(ctx.app, owner.headers, run.id, ['completed']);
      commitsWithStatements = withCommit.mock.calls.length;
    } finally {
      spy.mockRestore();
      withCommit.mockRestore();
    }
    // The start's COMMIT went with run.queued, the answering step's with its events: no COMMIT round trips.
    expect(commitsWithStatements).toBe(2);
    const scopes = [...byScope.values()];
    const start = scopes.find((texts) => texts.some((text) => text.includes('insert into "runs"')))!;
    const step = scopes.find((texts) => texts.some((text) => text.startsWith('with "answer" as')))!;
    // The owner and thread locks with the busy mark; the owner's active runs read by the insert of the input message with the run; run.queued.
    expect(start).toHaveLength(3);
    expect(start[0]).toMatch(/^with "owner" as \(select "id" from "users" .* for no key update\) update "threads"/);
    expect(start[1]).toMatch(/^with "owned" as \(select .* from "runs" .*\), "input" as \(insert into "messages" .*\), "inserted" as \(insert into "runs" .* on conflict \("thread_id"\) where "status" in \('queued', 'running'\) and not "waiting" do nothing/);
    // Its MAX_MESSAGES_PER_THREAD count reads the thread's messages only: a thread free for the run has no waiting runs.
    expect(start[1]).toMatch(/\(select count\(\*\) from \(select 1 from "messages" where "messages"\."thread_id" = \$\d+ limit \$\d+\) as held\)::int as "held"/);
    expect(start[1]).not.toMatch(/count\(\*\) from "runs"/);
    // The thread and run locks (the fence); the answer with the end and the hand-over; the events.
    expect(step).toHaveLength(3);
    expect(step[0]).toMatch(/^with "thread" as \(select "id" from "threads" .* for update\) select .* from "runs" .* for update of "runs"/);
    expect(step[1]).toMatch(/^with "answer" as \(insert into "messages" .*\), "ended" as \(update "runs" .*\), "next" as \(select .* for update\), "idle" as \(update "threads" /);
    expect(step[2]).toMatch(/^insert into "run_events"/);
  });
});

describe('a worker\'s claim', () => {
  /** A queued run on a thread with two messages, inserted as a start would (no job: nobody else claims it). */
  async function queuedRun() {
    const { owner, agent, thread } = await setup();
    const history = await transaction(ctx.app.db, (tx) =>
      appendMessages(tx, thread.id, [
        { role: 'user', content: 'first', metadata: {} },
        { role: 'assistant', content: 'second', metadata: { step: 1 } },
      ]),
    );
    const [run] = await ctx.app.db.insert(runs).values({ owner_id: owner.user.id, thread_id: thread.id, agent_id: agent.id, agent_version: 1, model: MODEL }).returning();
    return { run: run!, history };
  }

  it('takes the run with the thread\'s messages in one statement and says whether it is the run\'s first start', async () => {
    const { run, history } = await queuedRun();
    const first = await runCrud.claim(ctx.app.db, run.id, 'test-worker-a', 60);
    expect(first).toMatchObject({ firstStart: true, run: { id: run.id, status: 'running', lease_owner: 'test-worker-a', attempts: 1 } });
    expect(first!.history).toEqual(history);
    expect(await runCrud.claim(ctx.app.db, run.id, 'test-worker-b', 60)).toBeUndefined();
    // Handed back (a shutdown): the next claim resumes it, and is not a first start.
    expect(await runCrud.releaseLease(ctx.app.db, run.id, 'test-worker-a', 'shutdown')).toBe(true);
    const resumed = await runCrud.claim(ctx.app.db, run.id, 'test-worker-b', 60);
    expect(resumed).toMatchObject({ firstStart: false, run: { lease_owner: 'test-worker-b', attempts: 1, started_at: first!.run.started_at } });
    await runCrud.endRun(ctx.app.db, run.id, { status: 'cancelled', error: null }, null, true);
  });

  const commitSetting = async (db: Db) => {
    const result: unknown = await db.execute(sql`select current_setting('synchronous_commit') as value`);
    return (result as { rows: { value: string }[] }).rows[0]!.value;
  };

  it('commits without waiting for the WAL (synchronous_commit off for its own transaction only) where it raises no seq ceiling; durably where it does', async () => {
    const { run } = await queuedRun();
    const seen = await transaction(ctx.app.db, async (tx) => {
      const before = await commitSetting(tx);
      await runCrud.claim(tx, run.id, 'test-worker-a', 60);
      return { before, after: await commitSetting(tx) };
    });
    expect(seen).toEqual({ before: 'on', after: 'off' });
    expect(await commitSetting(ctx.app.db)).toBe('on');
    await runCrud.endRun(ctx.app.db, run.id, { status: 'cancelled', error: null }, null, true);

    // The log in Redis: the claim raises the seq ceiling, and a raise lost in a database crash would
    // let the next writer number over seqs clients saw (should Redis lose the stream too).
    const { run: scaled } = await queuedRun();
    const durable = await transaction(ctx.app.db, async (tx) => {
      const claimed = await runCrud.claim(tx, scaled.id, 'test-worker-a', 60, 1_000);
      return { ceiling: claimed!.run.event_seq_ceiling, after: await commitSetting(tx) };
    });
    expect(durable).toEqual({ ceiling: 1_001, after: 'on' });
    await runCrud.endRun(ctx.app.db, scaled.id, { status: 'cancelled', error: null }, null, true);
  });

  it("raises the seq ceiling for its worker while it holds the run, ended too (its final batch is still to be appended); not once the run is another's or let go", async () => {
    const { run } = await queuedRun();
    await runCrud.claim(ctx.app.db, run.id, 'test-worker-a', 60, 1_000);
    const ceiling = async () => (await ctx.app.db.select({ at: runs.event_seq_ceiling }).from(runs).where(eq(runs.id, run.id)))[0]!.at;
    expect(await runCrud.raiseEventSeqCeiling(ctx.app.db, run.id, 'test-worker-a', 1_500)).toBe(true);
    expect(await runCrud.raiseEventSeqCeiling(ctx.app.db, run.id, 'test-worker-b', 2_000)).toBe(false);
    expect(await ceiling()).toBe(1_500);
    // Cancelled under its worker: the lease stays on it until the worker's final batch is out.
    await runCrud.endRun(ctx.app.db, run.id, { status: 'cancelled', error: null }, null);
    expect(await runCrud.raiseEventSeqCeiling(ctx.app.db, run.id, 'test-worker-a', 2_500)).toBe(true);
    expect(await ceiling()).toBe(2_500);
    expect(await runCrud.releaseLease(ctx.app.db, run.id, 'test-worker-a', false)).toBe(true);
    expect(await runCrud.raiseEventSeqCeiling(ctx.app.db, run.id, 'test-worker-a', 3_000)).toBe(false);
    expect(await ceiling()).toBe(2_500);
  });
});

describe.runIf(Boolean(process.env.REDIS_URL))('a start on Redis', () => {
  it('appends run.queued and queues the job on one connection, the job sent before the append is answered: one round trip', async () => {
    fake.script(MODEL, { chunks: ['Hi'] });
    const { owner, thread } = await setup();
    const redis = ctx.app.redis!;
    const log: string[] = [];
    const original = redis.sendCommand.bind(redis);
    const spy = vi.spyOn(redis, 'sendCommand').mockImplementation((command, ...rest) => {
      const key = String(command.args[2] ?? '');
      const what = key.endsWith(':events') ? 'event' : key.includes(':keel-runs:') && command.name.startsWith('eval') ? 'job' : null;
      if (what) {
        log.push(`send ${what}`);
        void command.promise.then(() => log.push(`reply ${what}`), () => undefined);
      }
      return (original as (...args: unknown[]) => ReturnType<typeof redis.sendCommand>)(command, ...rest);
    });
    try {
      const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'Hi there' });
      await waitForRun(ctx.app, owner.headers, run.id, ['completed']);
    } finally {
      spy.mockRestore();
    }
    // The run's later events are appended by its worker (on this client too, in this test's app).
    expect(log.slice(0, 3)).toEqual(['send event', 'send job', 'reply event']);
  });


  it('a start whose run.queued cannot be appended answers 202 with the run it committed; the run runs, and its stream starts with its worker\'s first event', async () => {
    fake.script(MODEL, { chunks: ['still ', 'ran'] });
    const { owner, thread } = await setup();
    const response = await refusing(
      'run.queued',
      async (refused) => {
        const started = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'hello' });
        expect(refused()).toBe(1);
        return started;
      },
      1,
      unreachableBus,
    );
    expect(response.statusCode, response.body).toBe(202);
    const run = response.json<RunBody>();
    expect(run).toMatchObject({ status: 'queued', thread_id: thread.id, input: 'hello' });
    expect(response.headers.location).toContain(run.id);
    const { events, ended } = await readEvents(base, owner.headers, run.id);
    expect(ended).toBe(true);
    // Seq 1 stays run.queued's, which a client may have seen before it was lost (here: it never was).
    expectContiguous(events, 1);
    expect(events.map((e) => e.event)).toEqual(['run.started', 'message.created', 'message.delta', 'message.delta', 'message.completed', 'run.completed']);
    expect((await getRun(ctx.app, owner.headers, run.id)).status).toBe('completed');
    expect((await api('GET', `/threads/${thread.id}/runs`, owner.headers)).json<ListBody<RunBody>>().count).toBe(1);
  });

  it('an enqueued start whose run.queued cannot be appended: 202 (no second run for a retrying client); cancelled while it waits, its stream ends with run.cancelled', async () => {
    fake.script(MODEL, { chunks: ['a ', 'b ', 'c'], chunkDelayMs: 150 });
    const { owner, thread } = await setup();
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'one' });
    const response = await refusing('run.queued', () => api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'two', multitask_strategy: 'enqueue' }), 1, unreachableBus);
    expect(response.statusCode, response.body).toBe(202);
    const second = response.json<RunBody>();
    expect(second.status).toBe('queued');
    // A reader of the waiting run's (empty) stream is there when it is cancelled.
    const reading = readEvents(base, owner.headers, second.id);
    await sleep(100);
    expect((await api('POST', `/runs/${second.id}/cancel`, owner.headers)).statusCode).toBe(200);
    const { events, ended } = await reading;
    expect(ended).toBe(true);
    expect(events.map((e) => [e.id, e.event])).toEqual([[2, 'run.cancelled']]);
    await waitForRun(ctx.app, owner.headers, first.id, ['completed']);
    expect((await api('GET', `/threads/${thread.id}/runs`, owner.headers)).json<ListBody<RunBody>>().data.map((r) => [r.id, r.status]).sort()).toEqual(
      [
        [first.id, 'completed'],
        [second.id, 'cancelled'],
      ].sort(),
    );
  });

  it('a waiting run with no events, cancelled while its run.cancelled cannot be appended either: its reader waits for the sweep to write it, rather than hearing 410', async () => {
    const { RunSweeper } = await import('../../src/modules/agents/run-sweeper.js');
    const sweeper = new RunSweeper(ctx.app.runs, ctx.app.runs.runner);
    fake.script(MODEL, { chunks: ['a ', 'b ', 'c'], chunkDelayMs: 150 });
    const { owner, thread } = await setup();
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'one' });
    const response = await refusing('run.queued', () => api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'two', multitask_strategy: 'enqueue' }), 1, unreachableBus);
    const second = response.json<RunBody>();
    const reading = await refusing(
      'run.cancelled',
      async () => {
        expect((await api('POST', `/runs/${second.id}/cancel`, owner.headers)).json<RunBody>().status).toBe('cancelled');
        expect(await leaseOf(second.id)).toBe(runCrud.FINAL_EVENT_PENDING);
        // Ended, with no event at all yet: its final event is still to come.
        const reader = readEvents(base, owner.headers, second.id);
        await sleep(200);
        return { reader };
      },
      Infinity,
      unreachableBus,
    );
    await sweeper.sweep();
    const { events, ended, status } = await reading.reader;
    expect(status).toBe(200);
    expect(ended).toBe(true);
    // Past seq 2: the cancel's append failed without an answer (it may have stored run.cancelled as 2,
    // which a reader then saw), and raised the run's seq ceiling over it first.
    expect(events.map((e) => [e.id, e.event])).toEqual([[3, 'run.cancelled']]);
    await waitForRun(ctx.app, owner.headers, first.id, ['completed']);
  });
});

describe.skipIf(Boolean(process.env.REDIS_URL))('a start, embedded', () => {
  it('stores run.queued in the transaction that creates the run: when it cannot be stored, nothing is created and the client is told', async () => {
    const { owner, thread } = await setup();
    const log = ctx.app.runs.bus.events;
    const appendFirst = log.appendFirst!.bind(log);
    log.appendFirst = () => Promise.reject(new Error('event store unreachable'));
    try {
      const response = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'hello' });
      expect(response.statusCode).toBe(500);
    } finally {
      log.appendFirst = appendFirst;
    }
    expect((await api('GET', `/threads/${thread.id}/runs`, owner.headers)).json<ListBody<RunBody>>().count).toBe(0);
    expect(await threadMessages(owner, thread.id)).toEqual([]);
    expect((await api('GET', `/threads/${thread.id}`, owner.headers)).json<{ status: string }>().status).toBe('idle');
  });
});

describe("a project-scoped key's runs stay in its project", () => {
  it("cannot run another project's agent, run on or post to another project's thread, make a thread there, or retry or cancel a run there; nothing is queued", async () => {
    const { owner, thread: accountThread } = await setup();
    const [mine, other] = [(await api('POST', '/projects', owner.headers, { name: 'mine' })).json<{ id: string }>(), (await api('POST', '/projects', owner.headers, { name: 'other' })).json<{ id: string }>()];
    const otherAgent = await createAgent(ctx.app, owner.headers, { project_id: other.id });
    const otherThread = (await api('POST', '/threads', owner.headers, { title: 'other', project_id: other.id })).json<{ id: string }>();
    const otherRun = await startRun(ctx.app, owner.headers, otherThread.id, { input: 'theirs' });
    await waitForRun(ctx.app, owner.headers, otherRun.id, ['completed']);
    const key = xApiKey((await createKey(ctx.app, owner, { name: 'mine', project_id: mine.id })).key);
    const myThread = await createThread(ctx.app, key);
    const calls = fake.requestsFor(MODEL).length;

    const expectStatus = async (method: 'POST' | 'GET', path: string, status: number, body?: Record<string, unknown>) => {
      const response = await api(method, path, key, body);
      expect(response.statusCode, `${method} ${path}: ${response.body}`).toBe(status);
    };
    await expectStatus('POST', `/threads/${myThread.id}/runs`, 404, { agent_id: otherAgent.id, input: 'x' });
    await expectStatus('POST', '/runs', 404, { agent_id: otherAgent.id, input: 'x' });
    for (const thread of [otherThread, accountThread]) {
      await expectStatus('POST', `/threads/${thread.id}/runs`, 404, { input: 'x' });
      await expectStatus('POST', `/threads/${thread.id}/messages`, 404, { role: 'user', content: 'x' });
    }
    await expectStatus('POST', '/runs', 403, { input: 'x', thread: { project_id: other.id } });
    await expectStatus('POST', `/runs/${otherRun.id}/retry`, 404);
    await expectStatus('POST', `/runs/${otherRun.id}/cancel`, 404);
    await expectStatus('GET', `/runs/${otherRun.id}/events`, 404);

    // Nothing was written or called: the other thread holds its one run and two messages.
    expect((await api('GET', `/threads/${otherThread.id}/runs`, owner.headers)).json<ListBody<unknown>>().count).toBe(1);
    expect((await api('GET', `/threads/${otherThread.id}/messages`, owner.headers)).json<ListBody<unknown>>().count).toBe(2);
    expect(fake.requestsFor(MODEL)).toHaveLength(calls);
  });
});

describe('one active run per thread', () => {
  it('reject (default) answers 409; enqueue runs after the first; the thread is busy, then idle', async () => {
    fake.script(MODEL, { chunks: ['first ', 'answer'], chunkDelayMs: 100 }, { text: 'second answer' });
    const { owner, thread } = await setup();
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'q1' });
    expect((await api('GET', `/threads/${thread.id}`, owner.headers)).json<{ status: string }>().status).toBe('busy');
    const refused = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'q2' });
    expect(refused.statusCode).toBe(409);
    // Named by the refused start's own statement (it read the owner's active runs), its input rolled back (the messages below).
    expect(refused.json<{ detail: string }>().detail).toMatch(new RegExp(`^Thread is busy: run ${first.id} is (queued|running) on it`));
    // Posting a message while a run works is refused too.
    expect((await api('POST', `/threads/${thread.id}/messages`, owner.headers, { content: 'x' })).statusCode).toBe(409);
    const queued = await startRun(ctx.app, owner.headers, thread.id, { input: 'q2', multitask_strategy: 'enqueue' });
    const active = await api('GET', '/runs/active', owner.headers);
    expect(active.json<ListBody<RunBody>>().data.map((r) => r.id).sort()).toEqual([first.id, queued.id].sort());
    await waitForRun(ctx.app, owner.headers, queued.id, ['completed']);
    expect((await getRun(ctx.app, owner.headers, first.id)).status).toBe('completed');
    expect((await threadMessages(owner, thread.id)).map((m) => m.content)).toEqual(['q1', 'first answer', 'q2', 'second answer']);
    expect((await api('GET', `/threads/${thread.id}`, owner.headers)).json<{ status: string }>().status).toBe('idle');
    const listed = await api('GET', `/threads/${thread.id}/runs`, owner.headers);
    expect(listed.json<ListBody<RunBody>>()).toMatchObject({ count: 2, data: [{ id: queued.id }, { id: first.id }] });
  });

  it('interrupt cancels the active run (its model call aborted) and starts the new one', async () => {
    fake.script(MODEL, { chunks: Array.from({ length: 40 }, () => 'x '), chunkDelayMs: 100 }, { text: 'fresh' });
    const { owner, thread } = await setup();
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'old' });
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 1));
    const second = await startRun(ctx.app, owner.headers, thread.id, { input: 'new', multitask_strategy: 'interrupt' });
    await fake.waitFor((log) => log[0]!.aborted, 1_000);
    expect((await getRun(ctx.app, owner.headers, first.id)).status).toBe('cancelled');
    await waitForRun(ctx.app, owner.headers, second.id, ['completed']);
    expect((await readEvents(base, owner.headers, first.id)).events.at(-1)!.event).toBe('run.cancelled');
    expect((await threadMessages(owner, thread.id)).map((m) => m.content)).toEqual(['old', 'new', 'fresh']);
  });

  it('interrupt while the cancel signal cannot be sent: the new run is accepted and runs, the old one stops at its lease renewal', async () => {
    fake.script(MODEL, { chunks: Array.from({ length: 120 }, () => 'x '), chunkDelayMs: 100 }, { text: 'fresh' });
    const { owner, thread } = await setup();
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'old' });
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 1));
    const { signals } = ctx.app.runs.bus;
    const cancel = signals.cancel.bind(signals);
    signals.cancel = () => Promise.reject(new Error('signal channel unreachable'));
    let second: RunBody;
    try {
      second = await startRun(ctx.app, owner.headers, thread.id, { input: 'new', multitask_strategy: 'interrupt' });
    } finally {
      signals.cancel = cancel;
    }
    expect((await getRun(ctx.app, owner.headers, first.id)).status).toBe('cancelled');
    // Renewed every 2 s (RUN_LEASE_SECONDS 6): the worker finds its run cancelled then.
    await fake.waitFor((log) => log[0]!.aborted, 8_000);
    await waitForRun(ctx.app, owner.headers, second.id, ['completed']);
    expect((await readEvents(base, owner.headers, first.id)).events.at(-1)!.event).toBe('run.cancelled');
    expect((await threadMessages(owner, thread.id)).map((m) => m.content)).toEqual(['old', 'new', 'fresh']);
  });

  it('starts racing on the same threads, while runs finish, never fail or leave a thread busy', async () => {
    // Two enqueued starts at once on each of three threads, round after round, while the runs
    // before them hand the thread over: every start is accepted (or told 429 by the per-user cap and
    // retried), every run completes, each answer follows its own input, and every thread ends idle.
    const users = await Promise.all([setup(), setup(), setup()]);
    const started: { owner: TestUser; runId: string }[] = [];
    async function start(owner: TestUser, threadId: string, input: string): Promise<void> {
      for (;;) {
        const response = await api('POST', `/threads/${threadId}/runs`, owner.headers, { input, multitask_strategy: 'enqueue' });
        if (response.statusCode === 429) {
          await sleep(20);
          continue;
        }
        expect(response.statusCode, response.body).toBe(202);
        started.push({ owner, runId: response.json<RunBody>().id });
        return;
      }
    }
    await Promise.all(
      users.map(async ({ owner, thread }, u) => {
        for (let round = 0; round < 5; round += 1) {
          await Promise.all([start(owner, thread.id, `u${u} r${round} a`), start(owner, thread.id, `u${u} r${round} b`)]);
          await sleep(round * 3);
        }
      }),
    );
    expect(started).toHaveLength(30);
    for (const { owner, runId } of started) expect((await waitForRun(ctx.app, owner.headers, runId, ['completed', 'failed', 'cancelled'])).status).toBe('completed');
    for (const { owner, thread } of users) {
      expect((await api('GET', `/threads/${thread.id}`, owner.headers)).json<{ status: string }>().status).toBe('idle');
      const roles = (await threadMessages(owner, thread.id)).map((m) => m.role);
      expect(roles).toEqual(Array.from({ length: 20 }, (_, i) => (i % 2 === 0 ? 'user' : 'assistant')));
    }
  });

  it('the database refuses a second active run on a thread, whatever the code does', async () => {
    const { owner, thread } = await setup();
    fake.script(MODEL, { chunks: ['a ', 'b'], chunkDelayMs: 100 });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    const row = await ctx.app.db.select().from(runs).where(eq(runs.id, run.id));
    const { id: _id, created_at: _c, updated_at: _u, ...copy } = row[0]!;
    await expect(ctx.app.db.insert(runs).values({ ...copy, status: 'queued', lease_owner: null })).rejects.toThrow();
    await waitForRun(ctx.app, owner.headers, run.id, ['completed']);
  });
});

describe('failures in words', () => {
  it('a provider 429 is retried, then the run completes', async () => {
    fake.script(MODEL, { status: 429, headers: { 'retry-after': '0' } }, { text: 'after the limit' });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    const final = await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed']);
    expect(final.status).toBe('completed');
    expect(fake.requestsFor(MODEL).map((r) => r.reply)).toEqual([429, 200]);
  });

  it('a rejected key, an unreachable provider and an unknown model fail the run with what to do', async () => {
    const { owner, thread } = await setup();
    fake.script(MODEL, { status: 401 });
    const rejected = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    expect((await waitForRun(ctx.app, owner.headers, rejected.id, ['failed'])).error).toMatch(/rejected the API key.*check the provider's key/);
    fake.script(MODEL, { status: 503 }, { status: 503 }, { status: 503 });
    const down = await startRun(ctx.app, owner.headers, thread.id, {});
    expect((await waitForRun(ctx.app, owner.headers, down.id, ['failed'])).error).toMatch(/could not be reached or failed \(503\).*try again later/);
    const { events } = await readEvents(base, owner.headers, down.id);
    expect(events.at(-1)).toMatchObject({ event: 'run.failed', data: { run: { status: 'failed' } } });
    // A connection dropped mid-answer (not retried: its text went out) is not said to have been retried;
    // an answer that could not be read is not said to have been refused.
    fake.script(MODEL, { chunks: ['a ', 'b ', 'c'], chunkDelayMs: 100, drop: { afterChunks: 2 } });
    const dropped = await startRun(ctx.app, owner.headers, thread.id, {});
    expect((await waitForRun(ctx.app, owner.headers, dropped.id, ['failed'])).error).toBe(`The provider of model ${MODEL} could not be reached or failed (connection error); try again later`);
    fake.script(MODEL, { rawBody: 'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\ndata: <html>oops</html>\n\n' });
    const unreadable = await startRun(ctx.app, owner.headers, thread.id, {});
    expect((await waitForRun(ctx.app, owner.headers, unreadable.id, ['failed'])).error).toBe(`The answer of the provider of model ${MODEL} could not be read (200); try again later`);
    // A model named by the request must be in the catalog (422 at once).
    const unknown = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { model: 'no-such-model' });
    expect(unknown.statusCode).toBe(422);
  });

  it('a start without input on a thread with nothing for the model to read is a 422 naming input, before anything is queued; with a message it runs', async () => {
    const { owner, thread } = await setup();
    const calls = fake.requestsFor(MODEL).length;
    const refuse = async (path: string) => {
      const refused = await api('POST', path, owner.headers, {});
      expect(refused.statusCode, refused.body).toBe(422);
      expect(refused.json()).toMatchObject({ detail: [{ loc: ['body', 'input'], type: 'missing' }] });
    };
    await refuse(`/threads/${thread.id}/runs`);
    // A blank answer a run left (the runner does not send it) is nothing to answer either.
    await appendMessages(ctx.app.db, thread.id, [{ role: 'assistant', content: ' \n', metadata: {} }]);
    await refuse(`/threads/${thread.id}/runs`);
    // Nor is one of Unicode spaces only (blank to the runner, not to PostgreSQL's \s), nor a tool result whose call is gone (never sent).
    await appendMessages(ctx.app.db, thread.id, [{ role: 'assistant', content: '\u00a0\u3000\u2003', metadata: {} }]);
    await refuse(`/threads/${thread.id}/runs`);
    await appendMessages(ctx.app.db, thread.id, [{ role: 'tool', content: 'a result', tool_call_id: 'call_gone', metadata: {} }]);
    await refuse(`/threads/${thread.id}/runs`);
    // Nothing was queued or called, and the thread is left idle.
    expect((await api('GET', `/threads/${thread.id}/runs`, owner.headers)).json<ListBody<unknown>>().count).toBe(0);
    expect((await api('GET', `/threads/${thread.id}`, owner.headers)).json<{ status: string }>().status).toBe('idle');
    expect(fake.requestsFor(MODEL)).toHaveLength(calls);

    expect((await api('POST', `/threads/${thread.id}/messages`, owner.headers, { role: 'user', content: 'hello' })).statusCode).toBe(200);
    const run = await startRun(ctx.app, owner.headers, thread.id, {});
    expect((await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed'])).status).toBe('completed');
  });

  it('a retry of a run without input, on a thread emptied of messages since, is a 409 in plain words (a retry has no `input` field), before anything is queued', async () => {
    const { owner, thread } = await setup();
    const posted = await api('POST', `/threads/${thread.id}/messages`, owner.headers, { role: 'user', content: 'hello' });
    fake.script(MODEL, { status: 401 });
    const failed = await startRun(ctx.app, owner.headers, thread.id, {});
    await waitForRun(ctx.app, owner.headers, failed.id, ['failed']);
    expect((await api('DELETE', `/threads/${thread.id}/messages/${posted.json<{ id: string }>().id}`, owner.headers)).statusCode).toBe(200);
    expect(await threadMessages(owner, thread.id)).toEqual([]);
    const calls = fake.requestsFor(MODEL).length;

    const refused = await api('POST', `/runs/${failed.id}/retry`, owner.headers);
    expect(refused.statusCode, refused.body).toBe(409);
    expect(refused.json()).toEqual({ detail: "The thread has no messages for the model to answer: the run had no input and the thread's messages were deleted since; post a message to the thread, then retry" });
    // Nothing was queued or called, and the thread is left idle.
    expect((await api('GET', `/threads/${thread.id}/runs`, owner.headers)).json<ListBody<unknown>>().count).toBe(1);
    expect((await api('GET', `/threads/${thread.id}`, owner.headers)).json<{ status: string }>().status).toBe('idle');
    expect(fake.requestsFor(MODEL)).toHaveLength(calls);

    // With a message to answer again, the retry runs.
    expect((await api('POST', `/threads/${thread.id}/messages`, owner.headers, { role: 'user', content: 'hello again' })).statusCode).toBe(200);
    const retried = await api('POST', `/runs/${failed.id}/retry`, owner.headers);
    expect(retried.statusCode, retried.body).toBe(202);
    expect((await waitForRun(ctx.app, owner.headers, retried.json<RunBody>().id, ['completed', 'failed'])).status).toBe('completed');
  });

  it('a provider\'s own words reach the run\'s error only when the request was at fault', async () => {
    const { owner, thread } = await setup();
    fake.script(MODEL, { status: 404, body: { error: { message: 'no deployment fake-precise at http://10.1.2.3:8000 (key sk-secr****1234)' } } });
    const refused = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    const error = (await waitForRun(ctx.app, owner.headers, refused.id, ['failed'])).error;
    expect(error).toBe(`The provider refused the request for model ${MODEL} (404)`);
    fake.script(MODEL, { status: 400, body: { error: { message: 'This model\'s maximum context length is 8192 tokens' } } });
    const tooLong = await startRun(ctx.app, owner.headers, thread.id, {});
    expect((await waitForRun(ctx.app, owner.headers, tooLong.id, ['failed'])).error).toMatch(/\(400\): .*maximum context length is 8192 tokens$/);
  });

  it('retry makes a new run with the same input, not appended twice; delete only when ended', async () => {
    const { owner, thread } = await setup();
    fake.script(MODEL, { status: 401 }, { text: 'second try' });
    const failed = await startRun(ctx.app, owner.headers, thread.id, { input: 'please' });
    await waitForRun(ctx.app, owner.headers, failed.id, ['failed']);
    const retried = await api('POST', `/runs/${failed.id}/retry`, owner.headers);
    expect(retried.statusCode, retried.body).toBe(202);
    const again = retried.json<RunBody>();
    expect(again).toMatchObject({ input: 'please', status: 'queued' });
    expect(again.id).not.toBe(failed.id);
    await waitForRun(ctx.app, owner.headers, again.id, ['completed']);
    expect((await threadMessages(owner, thread.id)).map((m) => m.content)).toEqual(['please', 'second try']);
    expect((await api('POST', `/runs/${again.id}/retry`, owner.headers)).statusCode).toBe(409);
    expect((await api('DELETE', `/runs/${failed.id}`, owner.headers)).statusCode).toBe(200);
    expect((await api('GET', `/runs/${failed.id}`, owner.headers)).statusCode).toBe(404);
    fake.script(MODEL, { chunks: ['a ', 'b'], chunkDelayMs: 150 });
    const running = await startRun(ctx.app, owner.headers, thread.id, { input: 'more' });
    expect((await api('DELETE', `/runs/${running.id}`, owner.headers)).statusCode).toBe(409);
    await waitForRun(ctx.app, owner.headers, running.id, ['completed']);
    // Messages of a deleted run stay in the thread.
    expect((await api('DELETE', `/runs/${running.id}`, owner.headers)).statusCode).toBe(200);
    expect((await threadMessages(owner, thread.id)).map((m) => [m.content, m.run_id])).toContainEqual(['a b', null]);
  });

  it('retry of a run whose input message was deleted since appends the input again: the model gets it, the thread holds it once', async () => {
    const { owner, thread } = await setup();
    fake.script(MODEL, { status: 401 }, { text: 'answered' });
    const failed = await startRun(ctx.app, owner.headers, thread.id, { input: 'the question' });
    await waitForRun(ctx.app, owner.headers, failed.id, ['failed']);
    const [input] = await threadMessages(owner, thread.id);
    expect(input).toMatchObject({ content: 'the question' });
    expect((await api('DELETE', `/threads/${thread.id}/messages/${input!.id}`, owner.headers)).statusCode).toBe(200);
    const retried = await api('POST', `/runs/${failed.id}/retry`, owner.headers);
    expect(retried.statusCode, retried.body).toBe(202);
    await waitForRun(ctx.app, owner.headers, retried.json<RunBody>().id, ['completed']);
    const sent = fake.log.at(-1)!.body.messages as { role: string; content: string }[];
    expect(sent.filter((m) => m.role === 'user').map((m) => m.content)).toEqual(['the question']);
    expect((await threadMessages(owner, thread.id)).map((m) => m.content)).toEqual(['the question', 'answered']);
  });

  it("a thread whose tool message (or the assistant message that asked for it) was deleted goes on: the model reads the call answered as missing, and no result without its call", async () => {
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    const call = (id: string, query: string) => ({ id, name: 'knowledge_search', arguments: JSON.stringify({ query }) });
    fake.script(MODEL, { toolCalls: [call('call_a', 'one'), call('call_b', 'two')] }, { text: 'first answer' });
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'q1' });
    expect((await waitForRun(ctx.app, owner.headers, first.id, ['completed', 'failed'])).status).toBe('completed');
    const written = await threadMessages(owner, thread.id);
    const resultA = written.find((m) => m.role === 'tool' && m.tool_call_id === 'call_a')!;
    expect((await api('DELETE', `/threads/${thread.id}/messages/${resultA.id}`, owner.headers)).statusCode).toBe(200);
    // It failed with "Tool result is missing for tool call call_a.", every later run of the thread alike.
    fake.script(MODEL, { text: 'second answer' });
    const second = await startRun(ctx.app, owner.headers, thread.id, { input: 'q2' });
    expect(await waitForRun(ctx.app, owner.headers, second.id, ['completed', 'failed'])).toMatchObject({ status: 'completed', error: null });
    type Sent = { role: string; content: string | null; tool_calls?: { id: string }[]; tool_call_id?: string };
    const sent = fake.requestsFor(MODEL).at(-1)!.body.messages as Sent[];
    expect(sent.map((m) => [m.role, m.tool_call_id ?? m.tool_calls?.map((c) => c.id) ?? m.content])).toEqual([
      ['system', 'Be brief.'],
      ['user', 'q1'],
      ['assistant', ['call_a', 'call_b']],
      // In the calls' order, the missing one where its result was.
      ['tool', 'call_a'],
      ['tool', 'call_b'],
      ['assistant', 'first answer'],
      ['user', 'q2'],
    ]);
    expect(sent[3]!.content).toBe(MISSING_TOOL_RESULT);
    expect(sent[4]!.content).toContain('about two');
    // The assistant message deleted: its remaining result is left out (a provider refuses a result without its call).
    const asked = written.find((m) => m.role === 'assistant' && m.content === '')!;
    expect((await api('DELETE', `/threads/${thread.id}/messages/${asked.id}`, owner.headers)).statusCode).toBe(200);
    fake.script(MODEL, { text: 'third answer' });
    const third = await startRun(ctx.app, owner.headers, thread.id, { input: 'q3' });
    expect(await waitForRun(ctx.app, owner.headers, third.id, ['completed', 'failed'])).toMatchObject({ status: 'completed', error: null });
    const roles = (fake.requestsFor(MODEL).at(-1)!.body.messages as Sent[]).map((m) => m.role);
    expect(roles).toEqual(['system', 'user', 'assistant', 'user', 'assistant', 'user']);
  });

  it('an empty answer stays in the thread but is not sent back to the model: a provider that refuses empty text blocks (Anthropic) failed every later run of the thread', async () => {
    const { owner, thread } = await setup();
    fake.script(MODEL, { text: '', chunks: [] });
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'q1' });
    expect((await waitForRun(ctx.app, owner.headers, first.id, ['completed', 'failed'])).status).toBe('completed');
    expect((await threadMessages(owner, thread.id)).map((m) => [m.role, m.content])).toEqual([['user', 'q1'], ['assistant', '']]);
    fake.script(MODEL, { text: 'second answer' });
    const second = await startRun(ctx.app, owner.headers, thread.id, { input: 'q2' });
    expect((await waitForRun(ctx.app, owner.headers, second.id, ['completed', 'failed'])).status).toBe('completed');
    const sent = fake.requestsFor(MODEL).at(-1)!.body.messages as { role: string; content: string }[];
    expect(sent.map((m) => [m.role, m.content])).toEqual([['system', 'Be brief.'], ['user', 'q1'], ['user', 'q2']]);
  });

  it("retry of a run another run answered after (an interrupt) asks the model its own input again, at the thread's end: it does not answer the thread's last answer", async () => {
    const { owner, thread } = await setup();
    fake.script(MODEL, { chunks: Array.from({ length: 50 }, (_, i) => `t${i} `), chunkDelayMs: 100 }, { text: 'answer to two' }, { text: 'answer to one' });
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'question one' });
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 2));
    const second = await startRun(ctx.app, owner.headers, thread.id, { input: 'question two', multitask_strategy: 'interrupt' });
    await waitForRun(ctx.app, owner.headers, second.id, ['completed']);
    await waitForRun(ctx.app, owner.headers, first.id, ['cancelled']);
    const retried = await api('POST', `/runs/${first.id}/retry`, owner.headers);
    expect(retried.statusCode, retried.body).toBe(202);
    await waitForRun(ctx.app, owner.headers, retried.json<RunBody>().id, ['completed']);
    // Sent as the thread was, it ended with "answer to two": a prompt some providers refuse, others read as "continue".
    const sent = fake.requestsFor(MODEL).at(-1)!.body.messages as { role: string; content: string }[];
    expect(sent.at(-1)).toEqual({ role: 'user', content: 'question one' });
    const contents = (await threadMessages(owner, thread.id)).map((m) => m.content);
    expect(contents.slice(-4)).toEqual(['question two', 'answer to two', 'question one', 'answer to one']);
  });

  it('retry of a retry whose first run wrote a step before failing keeps the input where it is: the retries answer it, the thread holds it once', async () => {
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    fake.script(MODEL, { toolCalls: [{ id: 'call_r', name: 'knowledge_search', arguments: '{"query":"tides"}' }] }, { status: 401 }, { status: 401 }, { text: 'answered' });
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'the question' });
    await waitForRun(ctx.app, owner.headers, first.id, ['failed']);
    const second = (await api('POST', `/runs/${first.id}/retry`, owner.headers)).json<RunBody>();
    await waitForRun(ctx.app, owner.headers, second.id, ['failed']);
    const third = await api('POST', `/runs/${second.id}/retry`, owner.headers);
    expect(third.statusCode, third.body).toBe(202);
    await waitForRun(ctx.app, owner.headers, third.json<RunBody>().id, ['completed']);
    const sent = fake.requestsFor(MODEL).at(-1)!.body.messages as { role: string; content: string }[];
    expect(sent.filter((m) => m.role === 'user').map((m) => m.content)).toEqual(['the question']);
    const contents = (await threadMessages(owner, thread.id)).filter((m) => m.role === 'user').map((m) => m.content);
    expect(contents).toEqual(['the question']);
  });

  it('a retry meets the thread\'s active run by its own ?multitask_strategy= (reject by default), never by the retried run\'s: an old interrupt run\'s retry cancels nothing unasked', async () => {
    const { owner, thread } = await setup();
    fake.script(MODEL, { status: 401 });
    const old = await startRun(ctx.app, owner.headers, thread.id, { input: 'first', multitask_strategy: 'interrupt' });
    await waitForRun(ctx.app, owner.headers, old.id, ['failed']);
    const slow = { chunks: Array.from({ length: 10 }, () => 'x '), chunkDelayMs: 100 };
    fake.script(MODEL, slow, { text: 'queued retry' }, slow, { text: 'interrupting retry' });
    const active = await startRun(ctx.app, owner.headers, thread.id, { input: 'second' });

    // No strategy named: 409 naming the active run, which goes on.
    const refused = await api('POST', `/runs/${old.id}/retry`, owner.headers);
    expect(refused.statusCode, refused.body).toBe(409);
    expect(refused.json<{ detail: string }>().detail).toContain(active.id);
    expect((await getRun(ctx.app, owner.headers, active.id)).status).not.toBe('cancelled');
    const rejected = await api('POST', `/runs/${old.id}/retry?multitask_strategy=reject`, owner.headers);
    expect(rejected.statusCode, rejected.body).toBe(409);
    expect((await api('POST', `/runs/${old.id}/retry?multitask_strategy=later`, owner.headers)).statusCode).toBe(422);

    // `enqueue`: behind the active run, which completes.
    const queued = await api('POST', `/runs/${old.id}/retry?multitask_strategy=enqueue`, owner.headers);
    expect(queued.statusCode, queued.body).toBe(202);
    expect(queued.json<RunBody>()).toMatchObject({ status: 'queued', input: 'first', multitask_strategy: 'enqueue' });
    expect((await waitForRun(ctx.app, owner.headers, active.id, ['completed', 'cancelled', 'failed'])).status).toBe('completed');
    await waitForRun(ctx.app, owner.headers, queued.json<RunBody>().id, ['completed']);

    // `interrupt`, asked for: the active run is cancelled.
    const busy = await startRun(ctx.app, owner.headers, thread.id, { input: 'third' });
    await waitForRun(ctx.app, owner.headers, busy.id, ['running']);
    const interrupting = await api('POST', `/runs/${old.id}/retry?multitask_strategy=interrupt`, owner.headers);
    expect(interrupting.statusCode, interrupting.body).toBe(202);
    expect((await getRun(ctx.app, owner.headers, busy.id)).status).toBe('cancelled');
    await waitForRun(ctx.app, owner.headers, interrupting.json<RunBody>().id, ['completed']);
  });

  it('starts without an agent use the default one; none at all is a 422 naming agent_id', async () => {
    const owner = await createUser(ctx.app);
    const thread = await createThread(ctx.app, owner.headers);
    const refused = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'hi' });
    expect(refused.statusCode).toBe(422);
    expect(JSON.stringify(refused.json())).toMatch(/agent_id/);
    const agent = await createAgent(ctx.app, owner.headers);
    const named = await startRun(ctx.app, owner.headers, thread.id, { agent_id: agent.id, input: 'hi' });
    expect(named.agent_id).toBe(agent.id);
    await waitForRun(ctx.app, owner.headers, named.id, ['completed']);
  });

  it("a project-scoped key whose account's default agent is in another project gets the 422 naming agent_id, not a 404 for a thread it named rightly", async () => {
    const owner = await createUser(ctx.app);
    const [mine, other] = [(await api('POST', '/projects', owner.headers, { name: 'mine' })).json<{ id: string }>(), (await api('POST', '/projects', owner.headers, { name: 'other' })).json<{ id: string }>()];
    await createAgent(ctx.app, owner.headers, { is_default: true, project_id: other.id });
    const key = xApiKey((await createKey(ctx.app, owner, { name: 'mine', project_id: mine.id })).key);
    const thread = await createThread(ctx.app, key);
    for (const [path, body] of [[`/threads/${thread.id}/runs`, { input: 'hi' }], ['/runs', { input: 'hi' }]] as const) {
      const refused = await api('POST', path, key, body);
      expect(refused.statusCode, refused.body).toBe(422);
      expect(refused.json()).toMatchObject({ detail: [{ loc: ['body', 'agent_id'] }] });
    }
    // The owner (no key) still runs it: it is their default.
    await waitForRun(ctx.app, owner.headers, (await startRun(ctx.app, owner.headers, thread.id, { input: 'hi' })).id, ['completed']);
  });

  it("a superuser's start without agent_id on a user's thread runs the thread owner's default agent, not the superuser's (which the user pays for and cannot read)", async () => {
    const owner = await createUser(ctx.app);
    const theirs = await createAgent(ctx.app, owner.headers, { is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    const admin = await createUser(ctx.app, { superuser: true });
    await createAgent(ctx.app, admin.headers, { is_default: true, system_prompt: 'The admin speaks.' });
    const run = await startRun(ctx.app, admin.headers, thread.id, { input: 'hi' });
    expect(run).toMatchObject({ owner_id: owner.user.id, agent_id: theirs.id });
    await waitForRun(ctx.app, owner.headers, run.id, ['completed']);
  });

  it('POST /runs makes a thread with the input as its first message', async () => {
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true });
    const response = await api('POST', '/runs', owner.headers, { input: 'new thread please', thread: { title: 'Fresh' } });
    expect(response.statusCode, response.body).toBe(202);
    const run = response.json<RunBody>();
    await waitForRun(ctx.app, owner.headers, run.id, ['completed']);
    const thread = await api('GET', `/threads/${run.thread_id}`, owner.headers);
    expect(thread.json<{ title: string }>().title).toBe('Fresh');
    expect((await threadMessages(owner, run.thread_id)).map((m) => m.role)).toEqual(['user', 'assistant']);
  });
});

describe('limits and access', () => {
  it('MAX_ACTIVE_RUNS_PER_USER: one more active run answers 429', async () => {
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true });
    fake.script(MODEL, ...Array.from({ length: 4 }, () => ({ chunks: ['slow ', 'one'], chunkDelayMs: 300 })));
    const started: RunBody[] = [];
    for (let i = 0; i < 4; i++) started.push(await startRun(ctx.app, owner.headers, (await createThread(ctx.app, owner.headers)).id, { input: 'x' }));
    const thread = await createThread(ctx.app, owner.headers);
    const refused = await api('POST', `/threads/${thread.id}/runs`, owner.headers, { input: 'x' });
    expect(refused.statusCode).toBe(429);
    expect(refused.json<{ detail: string }>().detail).toMatch(/MAX_ACTIVE_RUNS_PER_USER/);
    // Refused with a new thread of its own (POST /runs): no thread is left behind (each counted against MAX_THREADS_PER_USER).
    const threadsBefore = (await api('GET', '/threads', owner.headers)).json<{ count: number }>().count;
    const refusedWithThread = await api('POST', '/runs', owner.headers, { input: 'x', thread: { title: 'never' } });
    expect(refusedWithThread.statusCode).toBe(429);
    expect((await api('GET', '/threads', owner.headers)).json<{ count: number }>().count).toBe(threadsBefore);
    for (const run of started) await waitForRun(ctx.app, owner.headers, run.id, ['completed']);
  });

  it('MAX_ACTIVE_RUNS_PER_USER: at the limit, `interrupt` replaces the thread\'s active run (no more active than before); on an idle thread it is 429', async () => {
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true });
    fake.script(MODEL, ...Array.from({ length: 5 }, () => ({ chunks: ['slow ', 'one'], chunkDelayMs: 300 })));
    const started: RunBody[] = [];
    for (let i = 0; i < 4; i++) started.push(await startRun(ctx.app, owner.headers, (await createThread(ctx.app, owner.headers)).id, { input: 'x' }));
    const replacing = await api('POST', `/threads/${started[0]!.thread_id}/runs`, owner.headers, { input: 'instead', multitask_strategy: 'interrupt' });
    expect(replacing.statusCode, replacing.body).toBe(202);
    expect((await getRun(ctx.app, owner.headers, started[0]!.id)).status).toBe('cancelled');
    expect((await api('GET', '/runs/active', owner.headers)).json<{ count: number }>().count).toBe(4);
    // Nothing to interrupt on an idle thread: the start is one more active run.
    const idle = await createThread(ctx.app, owner.headers);
    expect((await api('POST', `/threads/${idle.id}/runs`, owner.headers, { input: 'x', multitask_strategy: 'interrupt' })).statusCode).toBe(429);
    for (const run of [...started.slice(1), replacing.json<RunBody>()]) await waitForRun(ctx.app, owner.headers, run.id, ['completed']);
  });

  it("a key's rpm: once its calls this minute are spent, a start answers 429 with retry-after before writing anything (POST /threads/{id}/runs, POST /runs); a run's model calls are what counts", async () => {
    const { owner, thread } = await setup();
    const headers = xApiKey((await createKey(ctx.app, owner, { name: 'paced', rpm: 1 })).key);
    // The start looks at the count without adding to it: the run's one call is the minute's one.
    fake.script(MODEL, { text: 'first' });
    const first = await startRun(ctx.app, headers, thread.id, { input: 'one' });
    expect(await waitForRun(ctx.app, headers, first.id, ['completed', 'failed'])).toMatchObject({ status: 'completed' });
    const runsBefore = (await api('GET', `/threads/${thread.id}/runs`, owner.headers)).json<{ count: number }>().count;
    const messagesBefore = (await threadMessages(owner, thread.id)).length;
    const threadsBefore = (await api('GET', '/threads', owner.headers)).json<{ count: number }>().count;
    for (const [url, body] of [
      [`/threads/${thread.id}/runs`, { input: 'over the limit' }],
      ['/runs', { input: 'over the limit', thread: { title: 'never' } }],
    ] as const) {
      const refused = await api('POST', url, headers, body);
      expect(refused.statusCode, url).toBe(429);
      expect(refused.json<{ detail: string }>().detail).toMatch(/^API key rate limit reached: rpm 1 \(model calls per minute\); try again in \d+ s$/);
      expect(Number(refused.headers['retry-after'])).toBeGreaterThan(0);
    }
    // No run, no message, no thread; no model call.
    expect((await api('GET', `/threads/${thread.id}/runs`, owner.headers)).json<{ count: number }>().count).toBe(runsBefore);
    expect(await threadMessages(owner, thread.id)).toHaveLength(messagesBefore);
    expect((await api('GET', '/threads', owner.headers)).json<{ count: number }>().count).toBe(threadsBefore);
    expect(fake.requestsFor(MODEL)).toHaveLength(1);
  });

  it("a superuser's GET /runs/active lists their own queued and running runs, as it says; another user's run they still read by id and by thread", async () => {
    fake.script(MODEL, ...Array.from({ length: 2 }, () => ({ chunks: ['slow ', 'one'], chunkDelayMs: 300 })));
    const { owner, thread } = await setup();
    const theirs = await startRun(ctx.app, owner.headers, thread.id, { input: 'theirs' });
    const admin = await createUser(ctx.app, { superuser: true });
    await createAgent(ctx.app, admin.headers, { is_default: true });
    const mine = await startRun(ctx.app, admin.headers, (await createThread(ctx.app, admin.headers)).id, { input: 'mine' });
    const active = await api('GET', '/runs/active', admin.headers);
    expect(active.statusCode, active.body).toBe(200);
    expect(active.json<ListBody<RunBody>>()).toMatchObject({ count: 1, data: [{ id: mine.id }] });
    // Their other views of runs still take in every user's (SPEC §2).
    expect((await api('GET', `/runs/${theirs.id}`, admin.headers)).statusCode).toBe(200);
    expect((await api('GET', `/threads/${thread.id}/runs`, admin.headers)).json<ListBody<RunBody>>().data.map((r) => r.id)).toEqual([theirs.id]);
    for (const run of [theirs, mine]) await waitForRun(ctx.app, admin.headers, run.id, ['completed']);
  });

  it('another user\'s run and thread answer 404 on every run route', async () => {
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'mine' });
    await waitForRun(ctx.app, owner.headers, run.id, ['completed']);
    const mallory = await createUser(ctx.app);
    await createAgent(ctx.app, mallory.headers, { is_default: true });
    const attempts: [string, string, unknown?][] = [
      ['GET', `/runs/${run.id}`],
      ['GET', `/runs/${run.id}/events`],
      ['POST', `/runs/${run.id}/cancel`],
      ['POST', `/runs/${run.id}/retry`],
      ['DELETE', `/runs/${run.id}`],
      ['GET', `/threads/${thread.id}/runs`],
      ['POST', `/threads/${thread.id}/runs`, { input: 'theirs' }],
    ];
    for (const [method, url, body] of attempts) {
      const response = await api(method as 'GET', url, mallory.headers, body);
      expect(response.statusCode, `${method} ${url}`).toBe(404);
    }
    expect((await api('GET', '/runs/active', mallory.headers)).json<ListBody<RunBody>>().count).toBe(0);
    // Unauthenticated: 401.
    expect((await api('GET', `/runs/${run.id}`)).statusCode).toBe(401);
  });
});

/** Redis unreachable for an append, as the run bus reports it. */
const unreachableBus = () => new RunBusUnavailableError({ cause: new Error('connect ECONNREFUSED') });

/** The event store refuses the first `times` appends that carry `event` (as when it is unreachable) while `work` runs. */
/** `error`: what the store fails with (Redis down: RunBusUnavailableError, 503). */
async function refusing<T>(event: string, work: (refused: () => number) => Promise<T>, times = 1, error: () => Error = () => new Error('event store unreachable')): Promise<T> {
  const log = ctx.app.runs.bus.events;
  const append = log.append.bind(log);
  let refused = 0;
  log.append = (runId, events) => {
    if (refused < times && events.some((e) => e.event === event)) {
      refused += 1;
      return Promise.reject(error());
    }
    return append(runId, events);
  };
  try {
    return await work(() => refused);
  } finally {
    log.append = append;
  }
}

const leaseOf = async (runId: string) => (await ctx.app.db.select({ owner: runs.lease_owner }).from(runs).where(eq(runs.id, runId)))[0]!.owner;

describe('durability', () => {
  it('a run whose final event could not be stored keeps its lease, and the sweep writes the event, with the answer\'s, once the lease expires', async () => {
    const { RunSweeper } = await import('../../src/modules/agents/run-sweeper.js');
    const sweeper = new RunSweeper(ctx.app.runs, ctx.app.runs.runner);
    const { owner, thread } = await setup();
    // The event store fails the final event once (as when the process dies between the run's end
    // in the database and its final event).
    const log = ctx.app.runs.bus.events;
    // Embedded, an answered run stores its final event in the transaction that ends it (nothing to
    // lose in between): without that, the run takes the path a failed or cancelled run and the
    // Redis log take, the final event appended after the commit.
    const within = log.appendWithin?.bind(log);
    log.appendWithin = undefined;
    try {
      await refusing('run.completed', async (refused) => {
        fake.script(MODEL, { text: 'answered' });
        const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'hello' });
        await waitForRun(ctx.app, owner.headers, run.id, ['completed']);
        await vi.waitFor(() => expect(refused()).toBe(1));
        expect(await leaseOf(run.id)).not.toBeNull();
        // Not before the lease expires (the worker may still be writing it)...
        expect((await sweeper.sweep()).closed).toBe(0);
        await ctx.app.db.update(runs).set({ lease_expires_at: new Date(Date.now() - 1_000) }).where(eq(runs.id, run.id));
        // ...then once, and the stream ends with it.
        expect((await sweeper.sweep()).closed).toBe(1);
        const { events, ended } = await readEvents(base, owner.headers, run.id);
        expect(ended).toBe(true);
        // Scaled, the sweep goes on past the run's seq ceiling (a gap): it cannot tell how far the worker's append went.
        expectIncreasing(events);
        expect(events.filter((e) => e.event === 'run.completed')).toHaveLength(1);
        // The answer's `message.completed` went with the final event (readers, the /v1 agent answer too, take the answer from it).
        expect(events.slice(-2).map((e) => e.event)).toEqual(['message.completed', 'run.completed']);
        expect(events.at(-2)!.data).toMatchObject({ message: { role: 'assistant', content: 'answered', run_id: run.id }, step: 1 });
        expect(await leaseOf(run.id)).toBeNull();
      });
    } finally {
      log.appendWithin = within;
    }
  });

  it('a cancel of a run no worker holds, whose final event could not be stored: the sweep writes it', async () => {
    const { RunSweeper } = await import('../../src/modules/agents/run-sweeper.js');
    const sweeper = new RunSweeper(ctx.app.runs, ctx.app.runs.runner);
    fake.script(MODEL, { chunks: ['a ', 'b ', 'c'], chunkDelayMs: 100 });
    const { owner, thread } = await setup();
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'one' });
    const second = await startRun(ctx.app, owner.headers, thread.id, { input: 'two', multitask_strategy: 'enqueue' });
    // The store stays down a while (the app's own sweeps, every 10 s, cannot write it either).
    await refusing(
      'run.cancelled',
      async (refused) => {
        const cancelled = await api('POST', `/runs/${second.id}/cancel`, owner.headers);
        expect(cancelled.json<RunBody>().status).toBe('cancelled');
        expect(refused()).toBeGreaterThanOrEqual(1);
        // Marked for the sweep...
        expect(await leaseOf(second.id)).toBe(runCrud.FINAL_EVENT_PENDING);
      },
      Infinity,
    );
    // ...which writes the event once the store is back.
    await sweeper.sweep();
    const { events, ended } = await readEvents(base, owner.headers, second.id);
    expect(ended).toBe(true);
    expect(events.map((e) => e.event)).toEqual(['run.queued', 'run.cancelled']);
    expect(await leaseOf(second.id)).toBeNull();
    await waitForRun(ctx.app, owner.headers, first.id, ['completed']);
  });

  it('a cancel whose final event is stored leaves nothing for the sweep', async () => {
    fake.script(MODEL, { chunks: ['a ', 'b ', 'c'], chunkDelayMs: 100 });
    const { owner, thread } = await setup();
    const first = await startRun(ctx.app, owner.headers, thread.id, { input: 'one' });
    const second = await startRun(ctx.app, owner.headers, thread.id, { input: 'two', multitask_strategy: 'enqueue' });
    expect((await api('POST', `/runs/${second.id}/cancel`, owner.headers)).statusCode).toBe(200);
    expect(await leaseOf(second.id)).toBeNull();
    await waitForRun(ctx.app, owner.headers, first.id, ['completed']);
  });

  it("a run cancelled under its worker, whose final event the worker could not store: the worker keeps its lease, and the sweep writes run.cancelled once it expires (the run's reader does not wait for good)", async () => {
    const { RunSweeper } = await import('../../src/modules/agents/run-sweeper.js');
    const sweeper = new RunSweeper(ctx.app.runs, ctx.app.runs.runner);
    fake.script(MODEL, { chunks: Array.from({ length: 50 }, (_, i) => `t${i} `), chunkDelayMs: 100 });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'long' });
    const reading = readEvents(base, owner.headers, run.id);
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 2));
    await refusing('run.cancelled', async (refused) => {
      // The cancel leaves the final event to the worker, which holds the run: the worker's append fails once.
      expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).json<RunBody>().status).toBe('cancelled');
      await vi.waitFor(() => expect(refused()).toBe(1), 5_000);
      await vi.waitFor(() => expect(ctx.app.runs.runner.running).toBe(0), 5_000);
    });
    // The worker is done with it, and its lease stays on the run: it tells the sweep a final event is owed.
    expect(await leaseOf(run.id)).toBe(ctx.app.runs.runner.workerId);
    // Not before the lease expires (the worker may still be writing it)...
    expect((await sweeper.sweep()).closed).toBe(0);
    await ctx.app.db.update(runs).set({ lease_expires_at: new Date(Date.now() - 1_000) }).where(eq(runs.id, run.id));
    // ...then once, and the stream ends with it.
    expect((await sweeper.sweep()).closed).toBe(1);
    const { events, ended } = await reading;
    expect(ended).toBe(true);
    expectIncreasing(events);
    expect(events.filter((e) => FINAL_EVENTS.has(e.event)).map((e) => e.event)).toEqual(['run.cancelled']);
    // The message the worker opened ends first, incomplete: the run was cancelled.
    expect(events.slice(-2).map((e) => e.event)).toEqual(['message.completed', 'run.cancelled']);
    expect(events.at(-2)!.data).toMatchObject({ status: 'incomplete', reason: 'cancelled' });
    expect(await leaseOf(run.id)).toBeNull();
  });

  it('a run whose events cannot be stored mid-step (the run bus unreachable) is handed back, not failed; the sweep resumes it to its answer', async () => {
    const { RunSweeper } = await import('../../src/modules/agents/run-sweeper.js');
    const sweeper = new RunSweeper(ctx.app.runs, ctx.app.runs.runner);
    const { owner, thread } = await setup();
    fake.script(MODEL, { chunks: ['one ', 'two ', 'three ', 'four '], chunkDelayMs: 100 }, { text: 'resumed answer' });
    const run = await refusing(
      'message.delta',
      async (refused) => {
        const started = await startRun(ctx.app, owner.headers, thread.id, { input: 'hello' });
        await vi.waitFor(() => expect(refused()).toBe(1));
        // Handed back: still running, no worker's, its attempt counted (each hand-back redoes the step: RUN_MAX_ATTEMPTS bounds them).
        await vi.waitFor(async () => expect(await leaseOf(started.id)).toBeNull());
        expect(await getRun(ctx.app, owner.headers, started.id)).toMatchObject({ status: 'running', attempts: 1 });
        return started;
      },
      1,
      unreachableBus,
    );
    expect((await sweeper.sweep()).resumed).toBe(1);
    const resumed = await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed']);
    expect(resumed).toMatchObject({ status: 'completed', error: null, attempts: 2 });
    expect((await threadMessages(owner, thread.id)).filter((m) => m.role === 'assistant').map((m) => m.content)).toEqual(['resumed answer']);
    const { events } = await readEvents(base, owner.headers, run.id);
    // Scaled, the resumed run goes on past the seq ceiling (a gap): whether the failed append was stored is unknown.
    expectIncreasing(events);
    expect(events.at(-1)!.event).toBe('run.completed');
  });

  it('a run whose worker died is resumed by the sweep without duplicating its messages, or failed after RUN_MAX_ATTEMPTS', async () => {
    const { RunSweeper } = await import('../../src/modules/agents/run-sweeper.js');
    const sweeper = new RunSweeper(ctx.app.runs, ctx.app.runs.runner);
    const { owner, thread } = await setup();
    fake.script(MODEL, { text: 'first' });
    const done = await startRun(ctx.app, owner.headers, thread.id, { input: 'before' });
    await waitForRun(ctx.app, owner.headers, done.id, ['completed']);
    // A run some dead worker held: running, lease expired, one step not written.
    const orphan = await orphanRun(ctx.app.db, { owner_id: owner.user.id, thread_id: thread.id, agent_id: done.agent_id, model: MODEL });
    await ctx.app.runs.bus.events.append(orphan.id, [{ event: 'run.queued', data: {} }, { event: 'run.started', data: {} }, { event: 'message.created', data: {} }]);
    fake.script(MODEL, { text: 'resumed answer' });
    expect((await sweeper.sweep()).resumed).toBe(1);
    const resumed = await waitForRun(ctx.app, owner.headers, orphan.id, ['completed', 'failed']);
    expect(resumed).toMatchObject({ status: 'completed', attempts: 2 });
    const assistants = (await ctx.app.db.select().from(messages).where(eq(messages.run_id, orphan.id))).filter((m) => m.role === 'assistant');
    expect(assistants.map((m) => m.content)).toEqual(['resumed answer']);
    // Its log went on from where it was.
    const { events } = await readEvents(base, owner.headers, orphan.id);
    expectContiguous(events);
    expect(events.slice(0, 3).map((e) => e.event)).toEqual(['run.queued', 'run.started', 'message.created']);
    expect(events.at(-1)!.event).toBe('run.completed');

    // One that died too often is failed, in words, and its thread is free again.
    const hopeless = await orphanRun(ctx.app.db, { owner_id: owner.user.id, thread_id: thread.id, agent_id: done.agent_id, model: MODEL, attempts: 3 });
    expect((await sweeper.sweep()).failed).toBe(1);
    const failed = await getRun(ctx.app, owner.headers, hopeless.id);
    expect(failed.status).toBe('failed');
    expect(failed.error).toMatch(/interrupted 3 times.*retry/);
    expect((await readEvents(base, owner.headers, hopeless.id)).events.at(-1)!.event).toBe('run.failed');
    expect((await api('GET', `/threads/${thread.id}`, owner.headers)).json<{ status: string }>().status).toBe('idle');
  });

  /**
   * Another writer of the app's run events with cursors of its own: another worker process's log
   * (scaled), or a second writer on the process's log (embedded, where a process has one).
   */
  function otherWriter(): { events: RunEventLog; close: () => Promise<void> } {
    const { events } = ctx.app.runs.bus;
    if (events instanceof RedisRunEventLog) {
      const bus = createRedisRunBus(ctx.app.redis!, ctx.app.settings, pino({ level: 'silent' }));
      return { events: bus.events, close: async () => (await bus.events.close(), await bus.signals.close()) };
    }
    const log = new DatabaseRunEventLog((events as unknown as { events: EmbeddedRunEvents }).events);
    return { events: log, close: () => log.close() };
  }

  /**
   * A run an old worker held until its lease expired (its renewals failed for longer than the
   * lease), with that worker's events in the log (a message with its text, and `early` events),
   * taken over by the app's runner. The old worker has not noticed: it appends a delta (and `late`
   * events) right after the runner read the log — its top (`lastSeq`), or (`at: 'stored'`) its
   * events, to end the messages the old worker left open — before the runner's first append; then
   * `meanwhile` runs. Resolves once the runner is done with it.
   */
  async function takenOverFromOldWorker({ meanwhile = async () => undefined, at = 'lastSeq', early = [], late = [] }: { meanwhile?: (runId: string) => Promise<void>; at?: 'lastSeq' | 'stored'; early?: NewRunEvent[]; late?: NewRunEvent[] } = {}) {
    const { owner, thread, agent } = await setup();
    const old = otherWriter();
    const log = ctx.app.runs.bus.events;
    const patched = log as unknown as Record<typeof at, (runId: string) => Promise<unknown>>;
    const read = patched[at].bind(log);
    try {
      // Its lease not yet expired: no sweep takes the run before the test hands it over.
      const [run] = await ctx.app.db
        .insert(runs)
        .values({ owner_id: owner.user.id, thread_id: thread.id, agent_id: agent.id, agent_version: 1, model: MODEL, status: 'running', lease_owner: 'old-worker', lease_expires_at: new Date(Date.now() + 60_000), attempts: 1, started_at: new Date() })
        .returning();
      await ctx.app.db.update(threads).set({ status: 'busy' }).where(eq(threads.id, thread.id));
      const oldMessage = randomUUID();
      const delta = (text: string) => ({ event: 'message.delta' as const, data: { message_id: oldMessage, delta: text, step: 1 } });
      const ofOldMessage = (events: NewRunEvent[]) => events.map((e) => (e.event === 'tool.call' ? { ...e, data: { ...e.data, message_id: oldMessage } } : e));
      await old.events.append(run!.id, [{ event: 'run.queued', data: {} }, { event: 'run.started', data: {} }, { event: 'message.created', data: { message: { id: oldMessage, role: 'assistant' }, step: 1 } }, delta('old '), ...ofOldMessage(early)]);
      let interleaved = false;
      patched[at] = async (runId) => {
        const seen = await read(runId);
        if (runId === run!.id && !interleaved) {
          interleaved = true;
          await old.events.append(runId, [delta('stale '), ...ofOldMessage(late)]);
          await meanwhile(runId);
        }
        return seen;
      };
      await ctx.app.db.update(runs).set({ lease_expires_at: new Date(Date.now() - 1_000) }).where(eq(runs.id, run!.id));
      await ctx.app.runs.runner.execute(run!.id);
      // (Should the app's own sweep have queued it first, its job is the one that ran it.)
      await vi.waitFor(() => expect(ctx.app.runs.runner.running).toBe(0), 10_000);
      expect(interleaved).toBe(true);
      return { owner, thread, run: run!, oldMessage };
    } finally {
      patched[at] = read;
      await old.close();
    }
  }

  it('a run taken over while its old worker still appends: the new owner, which holds the lease, catches up and completes it', async () => {
    fake.script(MODEL, { chunks: ['new ', 'answer'], chunkDelayMs: 20 });
    const { owner, thread, run, oldMessage } = await takenOverFromOldWorker();
    expect(await getRun(ctx.app, owner.headers, run.id)).toMatchObject({ status: 'completed', error: null, attempts: 2, steps: 1 });
    expect(await leaseOf(run.id)).toBeNull();
    const { events, ended } = await readEvents(base, owner.headers, run.id);
    expect(ended).toBe(true);
    expectContiguous(events);
    // The old worker's events, its late delta included, then every event of the new attempt, in order.
    expect(events.slice(0, 5).map((e) => [e.event, e.data.delta])).toEqual([['run.queued', undefined], ['run.started', undefined], ['message.created', undefined], ['message.delta', 'old '], ['message.delta', 'stale ']]);
    // The new attempt first ends the old worker's message (incomplete: it is not in the thread), with all it streamed.
    expect(events[5]!.data).toMatchObject({ status: 'incomplete', reason: 'interrupted', message: { id: oldMessage, content: 'old stale ' } });
    const attempt = events.slice(6);
    expect(events[5]!.event).toBe('message.completed');
    expect(attempt.map((e) => e.event)).toEqual(['message.created', 'message.delta', 'message.delta', 'message.completed', 'run.completed']);
    const messageId = (attempt[0]!.data.message as { id: string }).id;
    expect(messageId).not.toBe(oldMessage);
    expect(attempt.filter((e) => e.event === 'message.delta').map((e) => [e.data.message_id, e.data.delta])).toEqual([
      [messageId, 'new '],
      [messageId, 'answer'],
    ]);
    expect((await threadMessages(owner, thread.id)).map((m) => [m.role, m.content])).toEqual([['assistant', 'new answer']]);
  });

  it("a run taken over while its old worker still appends, after the new owner read the log to end the old worker's message: that end has all the old worker wrote, and its tool call's own result", async () => {
    fake.script(MODEL, { chunks: ['new ', 'answer'], chunkDelayMs: 20 });
    const call = { event: 'tool.call' as const, data: { tool_call_id: 'call_0', name: 'knowledge_search', arguments: { query: 'q' }, step: 1 } };
    const result = { event: 'tool.result' as const, data: { tool_call_id: 'call_0', name: 'knowledge_search', content: 'found', is_error: false, step: 1 } };
    const { owner, run, oldMessage } = await takenOverFromOldWorker({ at: 'stored', early: [call], late: [result] });
    expect(await getRun(ctx.app, owner.headers, run.id)).toMatchObject({ status: 'completed', error: null, attempts: 2 });
    const { events, ended } = await readEvents(base, owner.headers, run.id);
    expect(ended).toBe(true);
    expectContiguous(events);
    expect(events.slice(0, 8).map((e) => e.event)).toEqual(['run.queued', 'run.started', 'message.created', 'message.delta', 'tool.call', 'message.delta', 'tool.result', 'message.completed']);
    // Its text as the log has it (the late delta too), and its call answered once: by the old worker's result, not also as unanswered.
    expect(events[7]!.data).toMatchObject({ status: 'incomplete', reason: 'interrupted', message: { id: oldMessage, content: 'old stale ', tool_calls: [{ id: 'call_0' }] } });
    expect(events.filter((e) => e.event === 'tool.result').map((e) => e.data.content)).toEqual(['found']);
    expect(events.slice(8).map((e) => e.event)).toEqual(['message.created', 'message.delta', 'message.delta', 'message.completed', 'run.completed']);
  });

  it('a run taken over while its old worker still appends, and then taken from the new owner too: it stops without a word, as on a lost lease', async () => {
    fake.script(MODEL, { chunks: Array.from({ length: 50 }, (_, i) => `w${i} `), chunkDelayMs: 50 });
    // Before the refusal reaches the runner, a third worker holds the run.
    const { owner, run } = await takenOverFromOldWorker({
      meanwhile: async (runId) => {
        await ctx.app.db.update(runs).set({ lease_owner: 'newest-worker', lease_expires_at: new Date(Date.now() + 60_000) }).where(eq(runs.id, runId));
      },
    });
    // Not failed by the refusal: the run is the newest worker's, and the log has nothing of the app's runner.
    expect(await getRun(ctx.app, owner.headers, run.id)).toMatchObject({ status: 'running', error: null, attempts: 2 });
    expect(await leaseOf(run.id)).toBe('newest-worker');
    expect(await ctx.app.runs.bus.events.lastSeq(run.id)).toBe(5);
    // Its model call, if it had begun, was aborted.
    for (const request of fake.log) expect(request.aborted).toBe(true);
    // (Ended, so that no sweep takes it up during the later tests.)
    await runCrud.endRun(ctx.app.db, run.id, { status: 'cancelled', error: null }, null, true);
  });

  it('a run the sweep gives up, whose final event could not be stored: the next sweep writes it', async () => {
    const { RunSweeper } = await import('../../src/modules/agents/run-sweeper.js');
    const sweeper = new RunSweeper(ctx.app.runs, ctx.app.runs.runner);
    const { owner, thread, agent } = await setup();
    const hopeless = await orphanRun(ctx.app.db, { owner_id: owner.user.id, thread_id: thread.id, agent_id: agent.id, model: MODEL, attempts: 3 });
    await ctx.app.runs.bus.events.append(hopeless.id, [{ event: 'run.queued', data: {} }, { event: 'run.started', data: {} }]);
    await refusing(
      'run.failed',
      async (refused) => {
        await sweeper.sweep();
        expect(refused()).toBeGreaterThanOrEqual(1);
        expect(await getRun(ctx.app, owner.headers, hopeless.id)).toMatchObject({ status: 'failed' });
        expect(await leaseOf(hopeless.id)).toBe(runCrud.FINAL_EVENT_PENDING);
      },
      Infinity,
    );
    await sweeper.sweep();
    const { events, ended } = await readEvents(base, owner.headers, hopeless.id);
    expect(ended).toBe(true);
    expect(events.map((e) => e.event)).toEqual(['run.queued', 'run.started', 'run.failed']);
    expect(await leaseOf(hopeless.id)).toBeNull();
  });
});

describe.runIf(Boolean(process.env.REDIS_URL))('a final batch the sweep writes again after Redis lost it', () => {
  /**
   * While `work` runs, `log` stores the run's first final batch but its answer is lost (Redis went
   * down right after the script ran: readers got the events, the writer an error), and stays down
   * for the run's final appends after it.
   */
  async function storedUnanswered<T>(log: RunEventLog, runId: string, work: () => Promise<T>): Promise<T> {
    const append = log.append.bind(log);
    let stored = false;
    log.append = async (id, events) => {
      if (id !== runId || !events.some((e) => FINAL_EVENTS.has(e.event))) return append(id, events);
      if (!stored) {
        stored = true;
        await append(id, events);
      }
      throw unreachableBus();
    };
    try {
      return await work();
    } finally {
      log.append = append;
    }
  }

  it.each([
    ['a cancel of a run whose worker died (the sweep writes its final batch)', 'cancelled'],
    ['a run the sweep gives up (its end writes the final batch: closePending)', 'failed'],
  ] as const)("%s: written again after the stream was lost, it is numbered past every seq a client saw, and a client resuming from one gets the run's end", async (_, end) => {
    const { RunSweeper } = await import('../../src/modules/agents/run-sweeper.js');
    // The sweep of another node (every worker sweeps): its log knows the run only from Redis and the
    // database, not from this node's readers (whose cursors this node's log keeps).
    const node = createRedisRunBus(ctx.app.redis!, ctx.app.settings, pino({ level: 'silent' }));
    const sweeper = new RunSweeper({ ...ctx.app.runs, bus: node }, ctx.app.runs.runner);
    try {
      const { owner, thread, agent } = await setup();
      // Its worker died with a message open, the ceiling as its claim left it; the lease runs out once its events are in the log.
      const run = await orphanRun(ctx.app.db, { owner_id: owner.user.id, thread_id: thread.id, agent_id: agent.id, model: MODEL, attempts: end === 'failed' ? 3 : 1, lease_expires_at: new Date(Date.now() + 60_000), event_seq_ceiling: 1_001 });
      const message = { id: randomUUID(), role: 'assistant', content: '' };
      await node.events.append(run.id, [
        { event: 'run.queued', data: {} },
        { event: 'run.started', data: {} },
        { event: 'message.created', data: { message, step: 1 } },
        { event: 'message.delta', data: { message_id: message.id, delta: 'half', step: 1 } },
      ]);
      const seen = await storedUnanswered(node.events, run.id, async () => {
        // POST /cancel's end of a run whose worker is gone: the final event is left to the sweep.
        if (end === 'cancelled') expect(await finishRun(ctx.app.runs, run, { status: 'cancelled' }, null)).toBeDefined();
        await ctx.app.db.update(runs).set({ lease_expires_at: new Date(Date.now() - 1_000) }).where(eq(runs.id, run.id));
        await sweeper.sweep();
        // A client read the batch (the log publishes what it stores); the sweep never heard it was stored: the run still owes it.
        const { events, ended } = await readEvents(base, owner.headers, run.id);
        expect(ended).toBe(true);
        expect(await leaseOf(run.id)).not.toBeNull();
        return events;
      });
      expect(seen.map((e) => e.event)).toEqual(['run.queued', 'run.started', 'message.created', 'message.delta', 'message.completed', `run.${end}`]);
      // Redis then lost the stream (restarted without it); the next sweep writes the final event again.
      await forgetEvents(run.id);
      await sweeper.sweep();
      expect(await leaseOf(run.id)).toBeNull();
      const last = seen.at(-1)!.id;
      // A client that saw the batch's first event (the open message's end), and resumes after it, gets the run's end...
      const resumed = await readEvents(base, owner.headers, run.id, { lastEventId: seen.at(-2)!.id });
      expect(resumed.events.map((e) => e.event)).toEqual([`run.${end}`]);
      // ...numbered past every seq a client saw: none of them names another event.
      const again = await readEvents(base, owner.headers, run.id);
      expect(again.events.map((e) => [e.event, e.id > last])).toEqual([[`run.${end}`, true]]);
    } finally {
      await node.events.close();
      await node.signals.close();
    }
  });
});
