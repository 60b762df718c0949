/**
 * Every message a run's events open (`message.created`) ends in its stream: a run cancelled, past
 * its deadline, or resumed after its worker died mid-message sends the message's `message.completed`
 * with what it streamed and `status: 'incomplete'` (it is not in the thread). And a tool that does
 * not stop on the run's signal no longer holds up a cancel or the deadline: the run ends at once.
 */
import { eq } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';

import { messages, runs, threads } from '../../src/models/index.js';

import { appendMessage } from '../../src/crud/thread.js';
import { messageView } from '../../src/modules/agents/run-lifecycle.js';
import { RunSweeper } from '../../src/modules/agents/run-sweeper.js';
import { answerOf } from '../../src/services/agent-completions.js';
import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders } from '../helpers/factories.js';
import { apiOf, sleep } from '../helpers/http.js';
import { createAgent, createThread, expectContiguous, orphanRun, readEvents, type SseEvent, startRun, useRunServer, waitForRun } from '../helpers/runs.js';

const MODEL = 'fake-precise';
/** knowledge_search as a test installs it: takes this long and never looks at the run's signal. */
const SLOW_TOOL_MS = 8_000;
/** The run signal each call of the tool was given. */
const toolSignals: AbortSignal[] = [];

const ctx = useTestApp(
  // A deadline of 3 s; a lease of 30 s (no renewal or sweep interferes).
  { RUN_TIMEOUT_SECONDS: '3', RUN_LEASE_SECONDS: '30', MODEL_MAX_RETRIES: '0' },
  {
    tools: {
      knowledge_search: async (_input, context) => {
        toolSignals.push(context.signal);
        await sleep(SLOW_TOOL_MS);
        return { passages: [] };
      },
    },
  },
);
const api = apiOf(ctx);
const server = useRunServer(ctx);

async function setup(body: Record<string, unknown> = {}) {
  const owner = await createUser(ctx.app);
  const agent = await createAgent(ctx.app, owner.headers, { is_default: true, ...body });
  const thread = await createThread(ctx.app, owner.headers);
  return { owner, agent, thread };
}

/** Each message the events opened, with the events that ended it. */
function endsOf(events: SseEvent[]): Map<string, SseEvent[]> {
  const ends = new Map<string, SseEvent[]>();
  for (const e of events) {
    const message = e.data.message as { id: string } | undefined;
    if (e.event === 'message.created') ends.set(message!.id, []);
    else if (e.event === 'message.completed') ends.get(message!.id)!.push(e);
  }
  return ends;
}

/** Every opened message ended once, every tool call answered once (before its message ended); the messages ended incomplete, returned. */
function expectEveryMessageEnded(events: SseEvent[]): SseEvent[] {
  const ends = endsOf(events);
  expect(ends.size).toBeGreaterThan(0);
  for (const [, ended] of ends) expect(ended).toHaveLength(1);
  const calls = events.filter((e) => e.event === 'tool.call');
  for (const call of calls) {
    const results = events.filter((e) => e.event === 'tool.result' && e.data.tool_call_id === call.data.tool_call_id && e.data.step === call.data.step);
    expect(results, `tool.result of ${String(call.data.tool_call_id)}`).toHaveLength(1);
    const end = ends.get(call.data.message_id as string)![0]!;
    expect(results[0]!.id).toBeGreaterThan(call.id);
    expect(results[0]!.id).toBeLessThan(end.id);
  }
  return [...ends.values()].map((ended) => ended[0]!).filter((e) => e.data.status === 'incomplete');
}

/** The tool.result events that say their call did not complete. */
const unanswered = (events: SseEvent[]) => events.filter((e) => e.event === 'tool.result' && e.data.status === 'incomplete');

const toolCall = { id: 'call_0', name: 'knowledge_search', arguments: JSON.stringify({ query: 'invoices' }) };

describe("a run's open message ends in its stream", () => {
  it('cancelled mid-message: message.completed with the text streamed so far, incomplete, then run.cancelled', async () => {
    const { fake, base } = server;
    fake.script(MODEL, { chunks: ['Hel', 'lo ', 'wor', 'ld'], stallAfterChunks: 2 });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    const reading = readEvents(base, owner.headers, run.id);
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 2));
    await sleep(100);
    expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).statusCode).toBe(200);
    const { events } = await reading;
    expectContiguous(events);
    expect(events.map((e) => e.event)).toEqual(['run.queued', 'run.started', 'message.created', 'message.delta', 'message.delta', 'message.completed', 'run.cancelled']);
    const [incomplete] = expectEveryMessageEnded(events);
    expect(incomplete!.data).toMatchObject({ status: 'incomplete', reason: 'cancelled', step: 1, message: { id: (events[2]!.data.message as { id: string }).id, role: 'assistant', content: 'Hello ', tool_calls: null } });
    // Not in the thread: its step was never written.
    expect((await ctx.app.db.select().from(messages).where(eq(messages.run_id, run.id))).filter((m) => m.role === 'assistant')).toEqual([]);
  });

  it('past its deadline mid-message: message.completed incomplete (reason failed), then run.failed', async () => {
    const { fake, base } = server;
    fake.script(MODEL, { chunks: ['Par', 'tial ', 'never'], stallAfterChunks: 2 });
    const { owner, thread } = await setup();
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    const { events } = await readEvents(base, owner.headers, run.id, { timeoutMs: 15_000 });
    expect(events.at(-1)!.event).toBe('run.failed');
    expect((events.at(-1)!.data.run as { error: string }).error).toMatch(/deadline/);
    const [incomplete] = expectEveryMessageEnded(events);
    expect(incomplete!.data).toMatchObject({ status: 'incomplete', reason: 'failed', message: { content: 'Partial ' } });
    expect(events.at(-2)).toBe(incomplete);
  });

  it('resumed after its worker died mid-message: the old message ends incomplete (interrupted) before the new step, which completes', async () => {
    const { fake, base } = server;
    const { owner, thread, agent } = await setup();
    const orphan = await orphanRun(ctx.app.db, { owner_id: owner.user.id, thread_id: thread.id, agent_id: agent.id, model: MODEL });
    const dead = { id: '00000000-0000-4000-8000-000000000001', thread_id: thread.id, role: 'assistant', content: '', tool_calls: null, tool_call_id: null, run_id: orphan.id, metadata: {} };
    await ctx.app.runs.bus.events.append(orphan.id, [
      { event: 'run.queued', data: {} },
      { event: 'run.started', data: {} },
      { event: 'message.created', data: { message: dead, step: 1 } },
      { event: 'message.delta', data: { message_id: dead.id, delta: 'half an ', step: 1 } },
      { event: 'message.delta', data: { message_id: dead.id, delta: 'answer', step: 1 } },
    ]);
    fake.script(MODEL, { text: 'whole answer' });
    const sweeper = new RunSweeper(ctx.app.runs, ctx.app.runs.runner);
    expect((await sweeper.sweep()).resumed).toBe(1);
    await waitForRun(ctx.app, owner.headers, orphan.id, ['completed', 'failed']);
    const { events } = await readEvents(base, owner.headers, orphan.id);
    expect(events.at(-1)!.event).toBe('run.completed');
    const [incomplete] = expectEveryMessageEnded(events);
    expect(incomplete!.data).toMatchObject({ status: 'incomplete', reason: 'interrupted', step: 1, message: { id: dead.id, content: 'half an answer' } });
    // It ends before the new attempt's message opens.
    const at = events.indexOf(incomplete!);
    expect(events[at + 1]!.event).toBe('message.created');
    expect((events.at(-2)!.data.message as { content: string }).content).toBe('whole answer');
    expect(events.at(-2)!.data.status).toBeUndefined();
  });

  it('resumed after its worker died during a tool call: the call is answered (interrupted) before its message ends, then the new step runs', async () => {
    const { fake, base } = server;
    const { owner, thread, agent } = await setup({ tools: ['knowledge_search'] });
    const orphan = await orphanRun(ctx.app.db, { owner_id: owner.user.id, thread_id: thread.id, agent_id: agent.id, model: MODEL });
    const dead = { id: '00000000-0000-4000-8000-000000000005', thread_id: thread.id, role: 'assistant', content: '', tool_calls: null, tool_call_id: null, run_id: orphan.id, metadata: {} };
    const call = (id: string) => ({ event: 'tool.call' as const, data: { message_id: dead.id, tool_call_id: id, name: 'knowledge_search', arguments: { query: id }, step: 1 } });
    // Two calls: the first answered before the worker died, the second still running.
    await ctx.app.runs.bus.events.append(orphan.id, [
      { event: 'run.queued', data: {} },
      { event: 'run.started', data: {} },
      { event: 'message.created', data: { message: dead, step: 1 } },
      call('call_0'),
      call('call_1'),
      { event: 'tool.result', data: { tool_call_id: 'call_0', name: 'knowledge_search', content: '{"passages":[]}', is_error: false, step: 1 } },
    ]);
    fake.script(MODEL, { text: 'whole answer' });
    expect((await new RunSweeper(ctx.app.runs, ctx.app.runs.runner).sweep()).resumed).toBe(1);
    expect((await waitForRun(ctx.app, owner.headers, orphan.id, ['completed', 'failed'])).status).toBe('completed');
    const { events } = await readEvents(base, owner.headers, orphan.id);
    expectContiguous(events);
    const [incomplete] = expectEveryMessageEnded(events);
    expect(incomplete!.data).toMatchObject({ reason: 'interrupted', message: { id: dead.id } });
    const at = events.indexOf(incomplete!);
    expect(events[at - 1]!.data).toMatchObject({ tool_call_id: 'call_1', name: 'knowledge_search', content: "Error: the tool call did not complete: the run's worker stopped", is_error: true, step: 1, status: 'incomplete', reason: 'interrupted' });
    expect(unanswered(events)).toHaveLength(1);
    // The thread has none of the interrupted step: the new step's model call has no call without its result.
    const sent = fake.requestsFor(MODEL)[0]!.body.messages as { role: string }[];
    expect(sent.map((m) => m.role)).not.toContain('tool');
    expect(sent.map((m) => m.role)).not.toContain('assistant');
  });

  it('resumed after its worker died between writing a tool step and appending its events: the step\'s messages end as written, not incomplete, and count in the answer', async () => {
    const { fake, base } = server;
    const { owner, thread, agent } = await setup({ tools: ['knowledge_search'] });
    const orphan = await orphanRun(ctx.app.db, { owner_id: owner.user.id, thread_id: thread.id, agent_id: agent.id, model: MODEL, steps: 1 });
    // Step 1 as its worker committed it: the assistant's message with its tool call, and the tool's answer.
    const call = { id: 'call_0', name: 'knowledge_search', arguments: { query: 'invoices' } };
    const assistant = await appendMessage(ctx.app.db, { id: '00000000-0000-4000-8000-000000000004', thread_id: thread.id, role: 'assistant', content: 'Looking. ', tool_calls: [call], run_id: orphan.id, metadata: { step: 1, model: MODEL } });
    const result = await appendMessage(ctx.app.db, { thread_id: thread.id, role: 'tool', content: '{"passages":[]}', tool_call_id: call.id, run_id: orphan.id, metadata: { step: 1, name: call.name, is_error: false } });
    // Its events up to the commit: the step's own append (the message completed, the tool message created and completed) never made it.
    const draft = { ...messageView(assistant), content: '', tool_calls: null };
    await ctx.app.runs.bus.events.append(orphan.id, [
      { event: 'run.queued', data: {} },
      { event: 'run.started', data: {} },
      { event: 'message.created', data: { message: draft, step: 1 } },
      { event: 'message.delta', data: { message_id: assistant.id, delta: 'Looking. ', step: 1 } },
      { event: 'tool.call', data: { message_id: assistant.id, tool_call_id: call.id, name: call.name, arguments: call.arguments, step: 1 } },
      { event: 'tool.result', data: { tool_call_id: call.id, name: call.name, content: result.content, is_error: false, step: 1 } },
    ]);
    fake.script(MODEL, { text: 'None found.' });
    expect((await new RunSweeper(ctx.app.runs, ctx.app.runs.runner).sweep()).resumed).toBe(1);
    expect((await waitForRun(ctx.app, owner.headers, orphan.id, ['completed', 'failed'])).status).toBe('completed');
    const { events } = await readEvents(base, owner.headers, orphan.id);
    expectContiguous(events);
    expect(expectEveryMessageEnded(events)).toEqual([]);
    const at = events.findIndex((e) => e.event === 'message.completed');
    expect(events.slice(at, at + 4).map((e) => [e.event, (e.data.message as { id: string }).id])).toEqual([
      ['message.completed', assistant.id],
      ['message.created', result.id],
      ['message.completed', result.id],
      ['message.created', expect.any(String)],
    ]);
    expect(events[at]!.data).toMatchObject({ step: 1, message: { content: 'Looking. ', tool_calls: [call] } });
    // The events' messages are the thread's.
    const thread_ = (await ctx.app.db.select().from(messages).where(eq(messages.run_id, orphan.id))).sort((a, b) => a.seq - b.seq);
    const ended = events.filter((e) => e.event === 'message.completed').map((e) => e.data.message as { id: string; content: string });
    expect(ended.map((m) => [m.id, m.content])).toEqual(thread_.map((m) => [m.id, m.content]));
    // An agent completion's answer has both steps' text.
    let answer = '';
    for await (const piece of answerOf(ctx.app.runs.bus.events.read(orphan.id, 0, AbortSignal.timeout(10_000)), AbortSignal.timeout(10_000))) if (piece.type === 'done') answer = piece.content;
    expect(answer).toBe('Looking. \n\nNone found.');
  });

  it('resumed after its deadline passed (its worker stuck, its lease run out): failed at once, its old message ended, no new step begun', async () => {
    const { fake, base } = server;
    const { owner, thread, agent } = await setup();
    const [late] = await ctx.app.db
      .insert(runs)
      .values({ owner_id: owner.user.id, thread_id: thread.id, agent_id: agent.id, agent_version: 1, model: MODEL, status: 'running', lease_owner: 'stuck-worker', lease_expires_at: new Date(Date.now() - 1_000), attempts: 1, started_at: new Date(Date.now() - 60_000) })
      .returning();
    await ctx.app.db.update(threads).set({ status: 'busy' }).where(eq(threads.id, thread.id));
    const dead = { id: '00000000-0000-4000-8000-000000000003', role: 'assistant', content: '' };
    await ctx.app.runs.bus.events.append(late!.id, [
      { event: 'run.queued', data: {} },
      { event: 'run.started', data: {} },
      { event: 'message.created', data: { message: dead, step: 1 } },
    ]);
    fake.script(MODEL, { text: 'too late' });
    expect((await new RunSweeper(ctx.app.runs, ctx.app.runs.runner).sweep()).resumed).toBe(1);
    const ended = await waitForRun(ctx.app, owner.headers, late!.id, ['completed', 'failed']);
    expect(ended.error).toMatch(/deadline/);
    const { events } = await readEvents(base, owner.headers, late!.id);
    expect(events.map((e) => e.event)).toEqual(['run.queued', 'run.started', 'message.created', 'message.completed', 'run.failed']);
    expect(events[3]!.data).toMatchObject({ status: 'incomplete', reason: 'interrupted', message: { id: dead.id } });
    expect(fake.requestsFor(MODEL)).toHaveLength(0);
  });

  it('the sweep giving up a run its dead worker left mid-message ends the message too', async () => {
    const { base } = server;
    const { owner, thread, agent } = await setup();
    const hopeless = await orphanRun(ctx.app.db, { owner_id: owner.user.id, thread_id: thread.id, agent_id: agent.id, model: MODEL, attempts: 3 });
    const dead = { id: '00000000-0000-4000-8000-000000000002', role: 'assistant', content: '' };
    await ctx.app.runs.bus.events.append(hopeless.id, [
      { event: 'run.queued', data: {} },
      { event: 'message.created', data: { message: dead, step: 1 } },
      { event: 'message.delta', data: { message_id: dead.id, delta: 'cut', step: 1 } },
    ]);
    expect((await new RunSweeper(ctx.app.runs, ctx.app.runs.runner).sweep()).failed).toBe(1);
    const { events } = await readEvents(base, owner.headers, hopeless.id);
    expect(events.map((e) => e.event)).toEqual(['run.queued', 'message.created', 'message.delta', 'message.completed', 'run.failed']);
    expect(events[3]!.data).toMatchObject({ status: 'incomplete', reason: 'failed', message: { id: dead.id, content: 'cut' } });
    expect((events[4]!.data.run as { error: string }).error).toMatch(/^The run was interrupted 3 times/);
  });

  it('the sweep giving up a run past its deadline says the deadline passed, not that it was interrupted', async () => {
    const { owner, thread, agent } = await setup();
    const [stuck] = await ctx.app.db
      .insert(runs)
      .values({ owner_id: owner.user.id, thread_id: thread.id, agent_id: agent.id, agent_version: 1, model: MODEL, status: 'running', lease_owner: 'stuck-worker', lease_expires_at: new Date(Date.now() - 1_000), attempts: 3, started_at: new Date(Date.now() - 60_000) })
      .returning();
    await ctx.app.db.update(threads).set({ status: 'busy' }).where(eq(threads.id, thread.id));
    expect((await new RunSweeper(ctx.app.runs, ctx.app.runs.runner).sweep()).failed).toBe(1);
    const [ended] = await ctx.app.db.select().from(runs).where(eq(runs.id, stuck!.id));
    expect(ended!.status).toBe('failed');
    expect(ended!.error).toBe(`The run passed its deadline of 3 s (RUN_TIMEOUT_SECONDS) and was stopped; start it again with POST /runs/${stuck!.id}/retry`);
  });
});

describe('a tool that does not stop on the run\'s signal', () => {
  it('a cancel during the tool call ends the run at once, not when the tool returns; its message ends with the call it asked for', async () => {
    const { fake, base } = server;
    fake.script(MODEL, { text: 'Looking. ', toolCalls: [toolCall] }, { text: 'never asked' });
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    let called = 0;
    const reading = readEvents(base, owner.headers, run.id, { timeoutMs: 20_000, onEvent: (e) => void (e.event === 'tool.call' && (called = Date.now())) });
    await waitForRun(ctx.app, owner.headers, run.id, ['running']);
    for (let i = 0; i < 100 && !called; i++) await sleep(20);
    expect(called).toBeGreaterThan(0);
    await sleep(200);
    const sent = Date.now();
    expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).statusCode).toBe(200);
    const { events } = await reading;
    const took = Date.now() - sent;
    expect(events.at(-1)!.event).toBe('run.cancelled');
    // Well under the tool's 8 s.
    expect(took).toBeLessThan(1_500);
    const [incomplete] = expectEveryMessageEnded(events);
    expect(incomplete!.data).toMatchObject({ status: 'incomplete', reason: 'cancelled', message: { content: 'Looking. ', tool_calls: [{ id: 'call_0', name: 'knowledge_search', arguments: { query: 'invoices' } }] } });
    // The call it was running is answered: not completed, as a failed tool's result reads.
    expect(unanswered(events).map((e) => e.data)).toEqual([expect.objectContaining({ tool_call_id: 'call_0', name: 'knowledge_search', content: 'Error: the tool call did not complete: the run was cancelled', is_error: true, step: 1, status: 'incomplete', reason: 'cancelled' })]);
    expect(events.slice(-3).map((e) => e.event)).toEqual(['tool.result', 'message.completed', 'run.cancelled']);
    expect(fake.log.filter((r) => r.model === MODEL)).toHaveLength(1);

    // The thread goes on: the cancelled step is not in it, so the next run's model call has no call without its result.
    fake.script(MODEL, { text: 'Hello again.' });
    const next = await startRun(ctx.app, owner.headers, thread.id, { input: 'again' });
    expect((await waitForRun(ctx.app, owner.headers, next.id, ['completed', 'failed'])).status).toBe('completed');
    const asked = fake.requestsFor(MODEL).at(-1)!.body.messages as { role: string }[];
    expect(asked.map((m) => m.role)).toEqual(['system', 'user', 'user']);
  }, 30_000);

  it('the model call failing while a tool runs (an Anthropic stream cut after its tool_use block) fails the run, stops the tool and answers its call', async () => {
    const { fake, base } = server;
    const admin = await superuserHeaders(ctx.app);
    // Once per file (the catalog outlives a test).
    if ((await api('GET', '/models/cut-claude', admin)).statusCode === 404) {
      expect((await api('POST', '/providers', admin, { name: 'cut-anthropic', kind: 'anthropic', base_url: fake.url, api_key: 'sk-cut' })).statusCode).toBe(200);
      expect((await api('POST', '/models', admin, { id: 'cut-claude', provider: 'cut-anthropic', pricing: { input_cost_per_million_tokens: '0', output_cost_per_million_tokens: '0' } })).statusCode).toBe(200);
    }
    // message_start, then the tool_use block's start, input and stop: the SDK has the call; then the connection drops.
    fake.script('cut-claude', { toolCalls: [{ ...toolCall, id: 'toolu_0' }], drop: { afterChunks: 4 } });
    const { owner, thread } = await setup({ tools: ['knowledge_search'], model: 'cut-claude' });
    toolSignals.length = 0;
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    const { events } = await readEvents(base, owner.headers, run.id, { timeoutMs: 20_000 });
    expect(events.at(-1)!.event).toBe('run.failed');
    expect(toolSignals).toHaveLength(1);
    // The tool is told to stop: the run it worked for has ended, and a result it gave later would come after the call's end.
    expect(toolSignals[0]!.aborted).toBe(true);
    expectEveryMessageEnded(events);
    expect(unanswered(events).map((e) => e.data)).toEqual([expect.objectContaining({ tool_call_id: 'toolu_0', content: 'Error: the tool call did not complete: the run failed', reason: 'failed' })]);
  }, 30_000);

  it('the deadline during the tool call fails the run at the deadline, not when the tool returns', async () => {
    const { fake, base } = server;
    fake.script(MODEL, { toolCalls: [toolCall] }, { text: 'never asked' });
    const { owner, thread } = await setup({ tools: ['knowledge_search'] });
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    const started = Date.now();
    const { events } = await readEvents(base, owner.headers, run.id, { timeoutMs: 20_000 });
    // The 3 s deadline (from the run's start), well before the tool's 8 s.
    expect(Date.now() - started).toBeLessThan(5_000);
    expect(events.at(-1)!.event).toBe('run.failed');
    expect((events.at(-1)!.data.run as { error: string }).error).toMatch(/deadline/);
    expectEveryMessageEnded(events);
    expect(unanswered(events).map((e) => e.data)).toEqual([expect.objectContaining({ tool_call_id: 'call_0', content: 'Error: the tool call did not complete: the run failed', is_error: true, reason: 'failed' })]);
  }, 30_000);

});
