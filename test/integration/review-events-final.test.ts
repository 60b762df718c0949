/**
 * Review: a reader that has every event so far and reconnects (Last-Event-ID / ?after=) after the
 * run's end is committed but before its final event is in the log gets an empty stream that ends
 * at once: it never gets message.completed / run.* final event (SPEC §5: "every event after N
 * exactly once ... the stream ends after the final event").
 */
import { beforeAll, describe, expect, it } from 'vitest';

import { finishRun } from '../../src/modules/agents/run-lifecycle.js';
import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { type FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf } from '../helpers/http.js';
import { createAgent, createThread, readEvents, startRun, useRunServer } from '../helpers/runs.js';

const MODEL = 'fake-precise';
// A 6 s lease renewed every 2 s: the worker hears of a cancel whose signal it missed within 2 s.
const ctx = useTestApp({ RUN_EVENTS_KEEPALIVE_SECONDS: '1', RUN_LEASE_SECONDS: '6' });
const api = apiOf(ctx);
const server = useRunServer(ctx);
let fake: FakeModelServer;
let base: string;
beforeAll(() => {
  ({ fake, base } = server);
});

describe('a reader reconnecting between a run\'s end and its final event', () => {
  it('still gets the final event (the stream does not end empty)', async () => {
    // Two pieces, then the model goes quiet (connection open): nothing more is appended until the worker stops.
    fake.script(MODEL, { chunks: ['a ', 'b ', 'c ', 'd'], stallAfterChunks: 2 });
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    await fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 2));
    // The client has read everything so far.
    const seen = await readEvents(base, owner.headers, run.id, { limit: 5 });
    expect(seen.events.map((e) => e.event)).toEqual(['run.queued', 'run.started', 'message.created', 'message.delta', 'message.delta']);
    // The run is cancelled (what POST /runs/{id}/cancel commits; its worker hears of it a moment
    // later: at once through the signal, or here at its next lease renewal).
    expect(await finishRun(ctx.app.runs, run, { status: 'cancelled' }, null)).toBeDefined();
    expect((await api('GET', `/runs/${run.id}`, owner.headers)).json<{ status: string }>().status).toBe('cancelled');
    // The client reconnects from what it has.
    const rest = await readEvents(base, owner.headers, run.id, { lastEventId: 5, timeoutMs: 8_000 });
    expect(rest.status).toBe(200);
    expect(rest.events.map((e) => e.event)).toEqual(['run.cancelled']);
  });
});
