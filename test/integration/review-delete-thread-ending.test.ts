/**
 * Review: the same as review-delete-ending, through the thread: a cancel hands the thread back
 * (idle) at once, while the run's worker still owes run.cancelled; DELETE /threads/{id} is then
 * allowed (it checks only `busy`) and takes the run with it (cascade). The worker finds no run and
 * writes nothing: a reader connected to the run's events waits for ever (keep-alives). Deleting the
 * thread's project or its owner does the same.
 */
import { beforeAll, describe, expect, it } from 'vitest';

import { finishRun } from '../../src/modules/agents/run-lifecycle.js';
import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { type FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, sleep } from '../helpers/http.js';
import { createAgent, createThread, readEvents, startRun, useRunServer } from '../helpers/runs.js';

const MODEL = 'fake-precise';
// A 3 s lease renewed every second: the worker hears of a cancel whose signal it missed within 1 s.
const ctx = useTestApp({ RUN_EVENTS_KEEPALIVE_SECONDS: '1', RUN_LEASE_SECONDS: '3' });
const api = apiOf(ctx);
const server = useRunServer(ctx);
let fake: FakeModelServer;
let base: string;
beforeAll(() => {
  ({ fake, base } = server);
});

describe('DELETE of the thread of a cancelled run whose final event is not written yet', () => {
  it('leaves no reader waiting for ever', async () => {
    fake.script(MODEL, { chunks: ['a ', 'b ', 'c ', 'd'], stallAfterChunks: 2 });
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 2));
    const reading = readEvents(base, owner.headers, run.id, { timeoutMs: 10_000 });
    await sleep(200);
    // What POST /runs/{id}/cancel commits (its worker hears of it a moment later: here at its next renewal).
    expect(await finishRun(ctx.app.runs, run, { status: 'cancelled' }, null)).toBeDefined();
    const deleted = await api('DELETE', `/threads/${thread.id}`, owner.headers);
    // Either refused while the run is still ending (409) ...
    if (deleted.statusCode === 409) return;
    expect(deleted.statusCode).toBe(200);
    // ... or its readers end (they cannot get a final event of a deleted run, but must not hang).
    const { ended, events } = await reading;
    console.log({ ended, events: events.map((e) => e.event) });
    expect(ended).toBe(true);
  }, 30_000);
});
