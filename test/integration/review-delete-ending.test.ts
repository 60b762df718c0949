/**
 * Review: DELETE /runs/{id} is allowed as soon as the run's status is final, even while its final
 * event is still to be written (its lease held: by its worker, which writes run.cancelled once it
 * has stopped). The worker then finds no run and writes nothing, so a reader connected to the
 * run's events never gets a final event: its stream stays open (keep-alives) until the client
 * gives up. SPEC §5: "the stream ends after the final event"; DELETE is for "a finished run".
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

describe('DELETE of a cancelled run whose final event is not written yet', () => {
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
    const deleted = await api('DELETE', `/runs/${run.id}`, owner.headers);
    // Either refused while the run is still ending (409) ...
    if (deleted.statusCode === 409) return;
    expect(deleted.statusCode).toBe(200);
    // ... or its readers end (they cannot get a final event of a deleted run, but must not hang).
    const { ended, events } = await reading;
    console.log({ ended, events: events.map((e) => e.event) });
    expect(ended).toBe(true);
  }, 30_000);
});
