/**
 * The moment between a run's end and its final event: a cancel commits the run `cancelled` at once,
 * and its worker writes `run.cancelled` once it has stopped (a moment later through the cancel's
 * signal, or at its next lease renewal when the signal is lost). A reader, or a delete, in that
 * moment must not leave a stream without its final event, or waiting for one that never comes.
 */
import { describe, expect, it } from 'vitest';

import { finishRun } from '../../src/modules/agents/run-lifecycle.js';
import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { apiOf, createKey, sleep, xApiKey } from '../helpers/http.js';
import { createAgent, createThread, readEvents, type RunBody, startRun, useRunServer } from '../helpers/runs.js';

const MODEL = 'fake-precise';
// A 6 s lease renewed every 2 s: the worker hears of a cancel whose signal it missed within 2 s.
const ctx = useTestApp({ RUN_EVENTS_KEEPALIVE_SECONDS: '1', RUN_LEASE_SECONDS: '6' });
const api = apiOf(ctx);
const server = useRunServer(ctx);

/** A run that streamed two pieces and then went quiet (its model's connection open); its five events read. */
async function quietRun() {
  server.fake.script(MODEL, { chunks: ['a ', 'b ', 'c ', 'd'], stallAfterChunks: 2 });
  const owner = await createUser(ctx.app);
  await createAgent(ctx.app, owner.headers, { is_default: true });
  const thread = await createThread(ctx.app, owner.headers);
  const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
  await server.fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 2));
  const seen = await readEvents(server.base, owner.headers, run.id, { limit: 5 });
  expect(seen.events.map((e) => e.event)).toEqual(['run.queued', 'run.started', 'message.created', 'message.delta', 'message.delta']);
  return { owner, thread, run };
}

/** Cancels `run` as POST /runs/{id}/cancel commits it, without the signal: its worker hears of it at its next renewal. */
async function cancelQuietly({ owner, run }: Awaited<ReturnType<typeof quietRun>>) {
  expect(await finishRun(ctx.app.runs, run, { status: 'cancelled' }, null)).toBeDefined();
  expect((await api('GET', `/runs/${run.id}`, owner.headers)).json<RunBody>().status).toBe('cancelled');
}

async function endedBeforeItsFinalEvent() {
  const quiet = await quietRun();
  await cancelQuietly(quiet);
  return quiet;
}

describe("a run's end before its final event is written", () => {
  it('a reader reconnecting then gets the final event: its stream does not end empty', async () => {
    const { owner, run } = await endedBeforeItsFinalEvent();
    const rest = await readEvents(server.base, owner.headers, run.id, { lastEventId: 5, timeoutMs: 8_000 });
    expect(rest.status).toBe(200);
    // The message the run was streaming ends first (incomplete, with what it streamed), then the run.
    expect(rest.events.map((e) => e.event)).toEqual(['message.completed', 'run.cancelled']);
    expect(rest.events[0]!.data).toMatchObject({ status: 'incomplete', reason: 'cancelled', message: { content: 'a b ' } });
    expect(rest.ended).toBe(true);
  });

  it('DELETE of the run waits for its final event (2 s at most, then 409), so its readers get it, then deletes it', async () => {
    const { owner, run } = await endedBeforeItsFinalEvent();
    const reading = readEvents(server.base, owner.headers, run.id, { lastEventId: 5, timeoutMs: 8_000 });
    const early = await api('DELETE', `/runs/${run.id}`, owner.headers);
    // The worker hears of the cancel at its next renewal, within 2 s: the delete has waited for it, or says why not yet.
    expect([200, 409]).toContain(early.statusCode);
    if (early.statusCode === 409) expect(early.json<{ detail: string }>().detail).toMatch(/still ending/);
    const { events, ended } = await reading;
    expect(events.map((e) => e.event)).toEqual(['message.completed', 'run.cancelled']);
    expect(ended).toBe(true);
    if (early.statusCode === 409) await expect.poll(async () => (await api('DELETE', `/runs/${run.id}`, owner.headers)).statusCode, { timeout: 5_000 }).toBe(200);
    expect((await api('GET', `/runs/${run.id}`, owner.headers)).statusCode).toBe(404);
  });

  it('DELETE of its thread (the thread is idle at once) ends its readers, which no final event will reach', async () => {
    const quiet = await quietRun();
    const { owner, thread, run } = quiet;
    const reading = readEvents(server.base, owner.headers, run.id, { lastEventId: 5, timeoutMs: 8_000 });
    await cancelQuietly(quiet);
    expect((await api('DELETE', `/threads/${thread.id}`, owner.headers)).statusCode).toBe(200);
    const { events, ended } = await reading;
    expect(events).toEqual([]);
    expect(ended).toBe(true);
  });

  it("HEAD on a running run's events answers the stream's headers at once", async () => {
    const { owner, run } = await quietRun();
    const head = await fetch(`${server.base}/api/v1/runs/${run.id}/events`, { method: 'HEAD', headers: owner.headers, signal: AbortSignal.timeout(3_000) });
    expect(head.status).toBe(200);
    expect(head.headers.get('content-type')).toMatch(/^text\/event-stream/);
    expect((await api('GET', `/runs/${run.id}`, owner.headers)).json<RunBody>().status).toBe('running');
    expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).statusCode).toBe(200);
  });
});

describe('a stream whose credential stops working', () => {
  it("ends at the next keep-alive once its API key is revoked or deleted, while the run (not the key's) goes on; the owner's own stream stays open", async () => {
    const { owner, run } = await quietRun();
    const revoked = await createKey(ctx.app, owner, { name: 'revoked' });
    const deleted = await createKey(ctx.app, owner, { name: 'deleted' });
    const reading = [revoked, deleted].map((key) => readEvents(server.base, xApiKey(key.key), run.id, { lastEventId: 5, timeoutMs: 8_000 }));
    const ownStream = readEvents(server.base, owner.headers, run.id, { lastEventId: 5, timeoutMs: 5_000 });
    // Both key streams are open (each has had a keep-alive) before their keys stop working.
    await sleep(1_500);
    expect((await api('PATCH', `/api-keys/${revoked.id}`, owner.headers, { status: 'revoked' })).statusCode).toBe(200);
    expect((await api('DELETE', `/api-keys/${deleted.id}`, owner.headers)).statusCode).toBe(200);
    const started = Date.now();
    for (const { events, ended, comments } of await Promise.all(reading)) {
      expect(comments).toContain('keep-alive');
      expect(events).toEqual([]);
      // Ended by the server (the reader's own 8 s timeout would leave `ended` false), within about a keep-alive.
      expect(ended).toBe(true);
    }
    expect(Date.now() - started).toBeLessThan(3_000);
    expect((await api('GET', `/runs/${run.id}`, owner.headers)).json<RunBody>().status).toBe('running');
    // A reconnect with either key is refused.
    for (const key of [revoked, deleted]) expect((await readEvents(server.base, xApiKey(key.key), run.id, { lastEventId: 5 })).status).toBe(401);
    // The owner's token still works: that stream stays open until its reader gives up.
    expect((await ownStream).ended).toBe(false);
    expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).statusCode).toBe(200);
  });
});
