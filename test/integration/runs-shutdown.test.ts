/**
 * A run cancelled while its worker shuts down: the worker hands running runs back at shutdown, and
 * a cancel that ends the run meanwhile leaves its final event to that worker, which still holds it.
 * The hand-back once cleared the ended run's lease too, and then nobody wrote the final event: the
 * run was `cancelled` with a log that never ended (readers waited forever). Its own file: the
 * runner is closed.
 */
import { eq } from 'drizzle-orm';
import { expect, it } from 'vitest';

import { runs } from '../../src/models/index.js';

import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { apiOf, eventually, sleep } from '../helpers/http.js';
import { createAgent, createThread, readEvents, type RunBody, startRun, useRunServer } from '../helpers/runs.js';

const MODEL = 'fake-precise';
let searching = false;

const ctx = useTestApp(
  {},
  {
    tools: {
      // A tool that does not stop when told (as a slow external call): the run is still in it when the cancel comes.
      knowledge_search: async () => {
        searching = true;
        await sleep(800);
        return { passages: [] };
      },
    },
  },
);
const api = apiOf(ctx);
const server = useRunServer(ctx);

it('a run cancelled while its worker shuts down gets its final event, and its lease is let go', async () => {
  const owner = await createUser(ctx.app);
  await createAgent(ctx.app, owner.headers, { is_default: true, tools: ['knowledge_search'] });
  const thread = await createThread(ctx.app, owner.headers);
  const { fake, base } = server;
  fake.script(MODEL, { toolCalls: [{ id: 'call_a', name: 'knowledge_search', arguments: '{"query":"x"}' }] }, { text: 'never asked' });
  const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'search' });
  await eventually(() => Promise.resolve(searching));
  const closing = ctx.app.runs.runner.close();
  const cancelled = await api('POST', `/runs/${run.id}/cancel`, owner.headers);
  expect(cancelled.json<RunBody>().status).toBe('cancelled');
  await closing;
  const { events, ended } = await readEvents(base, owner.headers, run.id, { timeoutMs: 5_000 });
  expect(ended).toBe(true);
  expect(events.at(-1)!.event).toBe('run.cancelled');
  const [row] = await ctx.app.db.select().from(runs).where(eq(runs.id, run.id));
  expect(row).toMatchObject({ status: 'cancelled', lease_owner: null });
  // The shutdown no longer waits for the tool (its call is raced with the run's signal): the cancel
  // may come before the hand-back (the worker, still holding it, writes the final event) or after
  // it (the cancel of a run nobody holds writes it, and the hand-back gave its attempt back).
  expect([0, 1]).toContain(row!.attempts);
  expect(fake.requestsFor(MODEL)).toHaveLength(1);
});
