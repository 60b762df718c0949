/**
 * RUN_EVENTS_MAX_STREAMS_PER_USER: the run-event streams one user holds open on a process — `GET
 * /runs/{id}/events` and streamed `agent:` completions on /v1 — are capped; one more answers 429
 * with a retry-after, naming the limit and the setting. A stream counts from its request until its
 * socket closes, and every way it ends gives its place back (a count that leaked would lock the
 * user out): the run's end, the client leaving, a finished run's stream that ends at once, HEAD, a
 * refusal (404), the server closing. (A stalled reader cut off: run-events-stalled-reader.test.ts;
 * the event store down: run-events-redis-down.test.ts.)
 */
import type { AddressInfo } from 'node:net';

import OpenAI from 'openai';
import { describe, expect, it } from 'vitest';

import { buildTestApp, useTestApp } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { apiOf, createKey, metricValue } from '../helpers/http.js';
import { apiError } from '../helpers/openai.js';
import { createAgent, createThread, readEvents, type RunBody, startRun, useRunServer, waitForRun } from '../helpers/runs.js';

const MODEL = 'fake-precise';
const LIMIT = 2;
const settings = { RUN_EVENTS_MAX_STREAMS_PER_USER: String(LIMIT), RUN_EVENTS_KEEPALIVE_SECONDS: '1' };
const ctx = useTestApp(settings);
const api = apiOf(ctx);
const server = useRunServer(ctx);

const held = (user: TestUser, app = ctx.app) => app.eventStreams.heldBy(user.user.id);

/** A user with a default agent and a run that streamed two pieces and went quiet (its model's connection open). */
async function quietRun() {
  server.fake.script(MODEL, { chunks: ['a ', 'b ', 'c'], stallAfterChunks: 2 });
  const owner = await createUser(ctx.app);
  await createAgent(ctx.app, owner.headers, { is_default: true });
  const thread = await createThread(ctx.app, owner.headers);
  const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
  await server.fake.waitFor((log) => log.some((r) => r.model === MODEL && r.chunksSent >= 2));
  return { owner, run };
}

/** Opens the run's event stream over real HTTP and leaves it open (its headers read); `close` leaves it. */
async function openStream(headers: Record<string, string>, runId: string, base = server.base) {
  const controller = new AbortController();
  const response = await fetch(`${base}/api/v1/runs/${runId}/events`, { headers, signal: controller.signal });
  return { response, close: () => controller.abort() };
}

describe('run event streams per user', () => {
  it('one past the limit answers 429 with a retry-after naming the limit and the setting; a client that leaves frees its place; the run\'s end frees the rest', async () => {
    const { owner, run } = await quietRun();
    // The process's gauge and counter on /metrics (other tests' streams are closed, but counted from here).
    const open = () => metricValue(ctx.app, 'keel_run_event_streams_open');
    const refusedSoFar = await metricValue(ctx.app, 'keel_run_event_streams_refused_total');
    const openBefore = await open();
    const streams = [await openStream(owner.headers, run.id), await openStream(owner.headers, run.id)];
    for (const stream of streams) expect(stream.response.status).toBe(200);
    expect(held(owner)).toBe(LIMIT);
    expect(await open()).toBe(openBefore + LIMIT);

    const refused = await fetch(`${server.base}/api/v1/runs/${run.id}/events`, { headers: owner.headers });
    expect(refused.status).toBe(429);
    expect(await metricValue(ctx.app, 'keel_run_event_streams_refused_total')).toBe(refusedSoFar + 1);
    // A refused stream is not an open one.
    expect(await open()).toBe(openBefore + LIMIT);
    expect(refused.headers.get('retry-after')).toBe('5');
    const { detail } = (await refused.json()) as { detail: string };
    expect(detail).toContain(`at most ${LIMIT}`);
    expect(detail).toContain('RUN_EVENTS_MAX_STREAMS_PER_USER');
    expect(held(owner)).toBe(LIMIT);

    // Another user is counted apart: their request is answered (404: not their run), and counts for no longer than it.
    const stranger = await createUser(ctx.app);
    expect((await fetch(`${server.base}/api/v1/runs/${run.id}/events`, { headers: stranger.headers })).status).toBe(404);
    await expect.poll(() => held(stranger)).toBe(0);

    // The client that leaves gives its place back.
    streams[0]!.close();
    await expect.poll(() => held(owner)).toBe(1);
    const reading = readEvents(server.base, owner.headers, run.id, { timeoutMs: 10_000 });
    await expect.poll(() => held(owner)).toBe(LIMIT);

    // The run's end ends the streams (after its final event): every place is given back.
    expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).statusCode).toBe(200);
    const { events, ended } = await reading;
    expect(ended).toBe(true);
    expect(events.at(-1)!.event).toBe('run.cancelled');
    await streams[1]!.response.text();
    await expect.poll(() => held(owner)).toBe(0);
    await expect.poll(open).toBe(openBefore);
  });

  it('streams that end at once (a finished run read to its end, HEAD) and refusals (404) give their place back: many in a row are all answered', async () => {
    server.fake.script(MODEL, { text: 'done' });
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
    await waitForRun(ctx.app, owner.headers, run.id, ['completed']);
    const whole = await readEvents(server.base, owner.headers, run.id);
    expect(whole.events.at(-1)!.event).toBe('run.completed');
    const last = whole.events.at(-1)!.id;
    const missing = '00000000-0000-4000-8000-000000000000';
    for (let i = 0; i < LIMIT * 3; i++) {
      const read = await readEvents(server.base, owner.headers, run.id, { lastEventId: last });
      expect(read).toMatchObject({ status: 200, events: [], ended: true });
      const head = await fetch(`${server.base}/api/v1/runs/${run.id}/events`, { method: 'HEAD', headers: owner.headers });
      expect(head.status).toBe(200);
      expect((await fetch(`${server.base}/api/v1/runs/${missing}/events`, { headers: owner.headers })).status).toBe(404);
      // Through inject too (no socket: its response's close).
      expect((await api('GET', `/runs/${run.id}/events?after=${last}`, owner.headers)).statusCode).toBe(200);
    }
    await expect.poll(() => held(owner)).toBe(0);
  });

  it('HEAD on a running run answers at once and gives its place back', async () => {
    const { owner, run } = await quietRun();
    for (let i = 0; i < LIMIT * 2; i++) {
      const head = await fetch(`${server.base}/api/v1/runs/${run.id}/events`, { method: 'HEAD', headers: owner.headers, signal: AbortSignal.timeout(3_000) });
      expect(head.status).toBe(200);
    }
    await expect.poll(() => held(owner)).toBe(0);
    expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).statusCode).toBe(200);
  });

  it('the server closing ends the streams and gives their places back', async () => {
    const { owner, run } = await quietRun();
    // A second process on the same database: its streams read the run the first one runs.
    const other = await buildTestApp(ctx.database, settings);
    try {
      await other.listen({ port: 0, host: '127.0.0.1' });
      const base = `http://127.0.0.1:${(other.server.address() as AddressInfo).port}`;
      const streams = [await openStream(owner.headers, run.id, base), await openStream(owner.headers, run.id, base)];
      for (const stream of streams) expect(stream.response.status).toBe(200);
      expect(held(owner, other)).toBe(LIMIT);
      // Per process: this one's streams are not counted by the first.
      expect(held(owner)).toBe(0);
      const bodies = streams.map((stream) => stream.response.text().catch(() => ''));
      await other.close();
      await Promise.all(bodies);
      expect(held(owner, other)).toBe(0);
    } finally {
      await other.close();
    }
    expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).statusCode).toBe(200);
  });
});

describe('streamed agent: completions on /v1', () => {
  it('count with the run-event streams: at the limit a streamed completion is 429 rate_limit_exceeded with a retry-after, before any run starts; its place is given back when it ends or its client leaves', async () => {
    const { owner, run } = await quietRun();
    const client = new OpenAI({ apiKey: (await createKey(ctx.app, owner)).key, baseURL: `${server.base}/v1`, maxRetries: 0 });
    const agent = `agent:${(await createAgent(ctx.app, owner.headers, { name: 'Answerer' })).id}`;
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'hi' }];
    const streams = [await openStream(owner.headers, run.id), await openStream(owner.headers, run.id)];
    expect(held(owner)).toBe(LIMIT);

    const refused = await apiError(client.chat.completions.create({ model: agent, messages, stream: true }));
    expect(refused).toBeInstanceOf(OpenAI.RateLimitError);
    expect(refused.code).toBe('rate_limit_exceeded');
    expect(refused.message).toContain('RUN_EVENTS_MAX_STREAMS_PER_USER');
    expect(refused.headers?.get('retry-after')).toBe('5');
    // Refused before the run: the only run of the user's is the quiet one.
    const active = (await api('GET', '/runs/active', owner.headers)).json<{ data: RunBody[] }>().data;
    expect(active.map((r) => r.id)).toEqual([run.id]);

    streams[0]!.close();
    await expect.poll(() => held(owner)).toBe(1);
    server.fake.script(MODEL, { chunks: ['Hel', 'lo'] });
    let text = '';
    for await (const chunk of await client.chat.completions.create({ model: agent, messages, stream: true })) text += chunk.choices[0]?.delta.content ?? '';
    expect(text).toBe('Hello');
    await expect.poll(() => held(owner)).toBe(1);

    // A client that leaves mid-stream gives its place back too.
    server.fake.script(MODEL, { chunks: ['a ', 'b ', 'c'], stallAfterChunks: 1 });
    const leaving = await client.chat.completions.create({ model: agent, messages, stream: true });
    expect(held(owner)).toBe(LIMIT);
    for await (const chunk of leaving) if (chunk.choices[0]?.delta.content) break;
    await expect.poll(() => held(owner)).toBe(1);

    streams[1]!.close();
    await expect.poll(() => held(owner)).toBe(0);
    expect((await api('POST', `/runs/${run.id}/cancel`, owner.headers)).statusCode).toBe(200);
  });
});
