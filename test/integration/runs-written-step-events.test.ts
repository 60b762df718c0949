/**
 * A step whose messages were written but whose events were not (the log's append failed right
 * after the step's commit, or its worker died in between): the message is in the thread, so the
 * run's events end it as its step would have, `message.completed` as written and its tool messages
 * created and completed, never `status: "incomplete"` (which says "not in the thread").
 */
import { describe, expect, it } from 'vitest';

import type { NewRunEvent, RunEventLog } from '../../src/modules/agents/run-bus.js';
import { AgentRunner } from '../../src/modules/agents/runner.js';
import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { createAgent, createThread, expectContiguous, json, readEvents, type SseEvent, startRun, useRunServer, waitForRun } from '../helpers/runs.js';

const MODEL = 'fake-precise';

const ctx = useTestApp({ RUN_LEASE_SECONDS: '30', MODEL_MAX_RETRIES: '0' }, { tools: { knowledge_search: () => Promise.resolve({ passages: [] }) } });
const server = useRunServer(ctx);

/** The app's event log, but its first append that completes a message throws (a Redis hiccup) without storing anything. */
function failingOnce(real: RunEventLog): { events: RunEventLog; failed: () => boolean } {
  let failed = false;
  const events = new Proxy(real, {
    get(target, property) {
      if (property === 'append') {
        return (runId: string, batch: readonly NewRunEvent[]) => {
          if (!failed && batch.some((e) => e.event === 'message.completed')) {
            failed = true;
            return Promise.reject(new Error('connection reset (injected)'));
          }
          return target.append(runId, batch);
        };
      }
      const value: unknown = Reflect.get(target, property, target);
      return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
    },
  });
  return { events, failed: () => failed };
}

describe("a written step's events", () => {
  it('the append after a tool step\'s commit fails: the run fails, and its events complete the written messages as the thread has them', async () => {
    const { fake, base } = server;
    // This file's own runner takes the run (the app's is closed: its job does nothing).
    await ctx.app.runs.runner.close();
    const { events, failed } = failingOnce(ctx.app.runs.bus.events);
    const runner = new AgentRunner({ ...ctx.app.runs, bus: { ...ctx.app.runs.bus, events } });
    fake.script(MODEL, { text: 'Looking it up. ', toolCalls: [{ id: 'call_0', name: 'knowledge_search', arguments: JSON.stringify({ query: 'invoices' }) }] }, { text: 'never asked' });
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true, tools: ['knowledge_search'] });
    const thread = await createThread(ctx.app, owner.headers);
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'find my invoices' });
    await runner.execute(run.id);
    expect(failed()).toBe(true);
    const ended = await waitForRun(ctx.app, owner.headers, run.id, ['completed', 'failed', 'cancelled']);
    expect(ended.status).toBe('failed');

    const { events: sent } = await readEvents(base, owner.headers, run.id);
    expectContiguous(sent);
    expect(sent.at(-1)!.event).toBe('run.failed');
    // The step was written: the assistant's message and its tool message are in the thread.
    const listed = await json<{ data: { id: string; role: string; content: string; run_id: string | null }[] }>(base, 'GET', `/threads/${thread.id}/messages?limit=100`, owner.headers);
    const written = listed.body.data.filter((m) => m.run_id === run.id);
    expect(written.map((m) => m.role)).toEqual(['assistant', 'tool']);
    // Every message the events open ends once, complete, as the thread has it; and every written message is in the events.
    const completed = sent.filter((e) => e.event === 'message.completed');
    expect(completed.filter((e) => e.data.status !== undefined)).toEqual([]);
    const byId = new Map(completed.map((e) => [(e.data.message as { id: string }).id, e]));
    expect(byId.size).toBe(completed.length);
    const opened = sent.filter((e) => e.event === 'message.created').map((e) => (e.data.message as { id: string }).id);
    expect(opened.sort()).toEqual([...byId.keys()].sort());
    expect(written.map((m) => m.id).sort()).toEqual([...byId.keys()].sort());
    for (const message of written) expect(byId.get(message.id)!.data).toMatchObject({ step: 1, message: { id: message.id, role: message.role, content: message.content } });
    expect((byId.get(written[0]!.id)!.data.message as { content: string }).content).toBe('Looking it up. ');
    // The step's events in the order its own append would have sent them, before the run's end.
    const tail = sent.slice(-4).map((e: SseEvent) => [e.event, (e.data.message as { id?: string } | undefined)?.id]);
    expect(tail).toEqual([['message.completed', written[0]!.id], ['message.created', written[1]!.id], ['message.completed', written[1]!.id], ['run.failed', undefined]]);
    await runner.close();
  }, 30_000);
});
