/**
 * A client of a streamed /v1 chat completion that stops reading holds the upstream back, over the
 * wire and through the AI SDK alike: Keel reads no more of the answer than its response's buffer
 * and the model manager's queues hold, rather than buffering the whole answer for it. And it is cut
 * off as a stalled reader of run events is, after four keep-alive intervals of taking nothing: its
 * upstream call aborted and metered as aborted, the cut-off counted in /metrics. A reader that takes the answer slowly but steadily
 * is not cut off, however long it takes.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { connect, type Socket } from 'node:net';

import { eq } from 'drizzle-orm';
import { beforeAll, describe, expect, it } from 'vitest';

import { usageRecords } from '../../src/models/index.js';

import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { call, metricValue, sleep } from '../helpers/http.js';
import { createAgent, useRunServer } from '../helpers/runs.js';

// Keep-alives every second: a stalled reader is cut off 4–5 s after it stops taking anything.
const ctx = useTestApp({ RUN_EVENTS_KEEPALIVE_SECONDS: '1', MAX_MESSAGE_CHARS: '20000000' });
const server = useRunServer(ctx);

// ~12 MB of answer in 6,000 chunks: far more than the sockets' buffers between the three hold.
const CHUNK = 2_000;
const chunks = Array.from({ length: 6_000 }, (_, i) => `${String(i).padStart(5, '0')}${'x'.repeat(CHUNK - 6)} `);
const ANSWER_BYTES = chunks.length * CHUNK;

/** The /v1 chat completions of catalog models cut off for taking nothing. */
const STALLED_COMPLETIONS = 'keel_chat_completion_streams_stalled_total';

/** The server side of each /v1 completion, to see what waits in it for its client. */
const replies: ServerResponse[] = [];

beforeAll(async () => {
  const admin = await superuserHeaders(ctx.app);
  // The SDK's path: an Anthropic provider on the same fake server.
  expect((await call(ctx.app, 'POST', '/providers', admin, { name: 'fake-ant', kind: 'anthropic', base_url: server.fake.url, api_key: 'sk-ant' })).statusCode).toBe(200);
  const claude = await call(ctx.app, 'POST', '/models', admin, { id: 'fake-claude', provider: 'fake-ant', pricing: { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '1' } });
  expect(claude.statusCode, claude.body).toBe(200);
  ctx.app.server.on('request', (request: IncomingMessage, response: ServerResponse) => {
    if (request.url === '/v1/chat/completions') replies.push(response);
  });
});

/** A client that sends a streamed completion request over a socket of its own and then takes nothing. */
async function completionSocket(owner: TestUser, model: string): Promise<Socket> {
  const { port, hostname } = new URL(server.base);
  const socket = connect(Number(port), hostname);
  socket.on('error', () => undefined);
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  socket.pause();
  const body = JSON.stringify({ model, stream: true, messages: [{ role: 'user', content: 'Count' }] });
  socket.write(
    `POST /v1/chat/completions HTTP/1.1\r\nHost: ${hostname}\r\nAuthorization: ${owner.headers.authorization}\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
  );
  return socket;
}

async function usageStatuses(owner: TestUser): Promise<string[]> {
  const rows = await ctx.database.db.select({ status: usageRecords.status }).from(usageRecords).where(eq(usageRecords.owner_id, owner.user.id));
  return rows.map((row) => row.status);
}

describe.each([
  ['the wire', 'fake-precise'],
  ['the SDK', 'fake-claude'],
])('a streamed completion whose client stops reading, through %s', (_path, model) => {
  it('holds the upstream back, buffers little, and is cut off a few keep-alives later: the call aborted, metered and counted in /metrics', async () => {
    const { fake } = server;
    fake.script(model, { chunks });
    const owner = await createUser(ctx.app);
    replies.length = 0;
    const stalledBefore = await metricValue(ctx.app, STALLED_COMPLETIONS);
    const socket = await completionSocket(owner, model);
    const stalled = await fake.stalled(0, 300, 30_000);
    // Held back: the upstream has not got its answer out, and what waits in Keel's response is a
    // highWaterMark's worth, not the answer (what the upstream did send is mostly in the
    // loopback's socket buffers, which the kernel grows to megabytes).
    expect(stalled).toMatchObject({ completed: false, aborted: false });
    expect(stalled.chunksSent).toBeLessThan(chunks.length);
    expect(replies[0]!.writableLength).toBeLessThan(512 * 1024);

    // Past four keep-alives of taking nothing: cut off, the upstream request aborted.
    await fake.waitFor((log) => log[0]!.aborted, 15_000);
    expect(fake.log[0]!.completed).toBe(false);
    let received = '';
    socket.on('data', (data: Buffer) => (received += data.toString('latin1')));
    socket.resume();
    await expect.poll(() => socket.closed, { timeout: 5_000 }).toBe(true);
    // What the sockets held came, not the end of the answer.
    expect(received).toContain('data: {');
    expect(received).not.toContain('data: [DONE]');
    expect(received.length).toBeLessThan(ANSWER_BYTES);
    await expect.poll(() => usageStatuses(owner), { timeout: 5_000 }).toEqual(['aborted']);
    expect(await metricValue(ctx.app, STALLED_COMPLETIONS)).toBe(stalledBefore + 1);
  }, 60_000);
});

it('a client that takes the answer slowly but steadily is not cut off, however long it takes', async () => {
  const { fake } = server;
  fake.script('fake-precise', { chunks });
  const owner = await createUser(ctx.app);
  replies.length = 0;
  const stalledBefore = await metricValue(ctx.app, STALLED_COMPLETIONS);
  const socket = await completionSocket(owner, 'fake-precise');
  // Reads what the socket holds (at most its buffer) every 50 ms: a steady reader on a slow link.
  let bytes = 0;
  let tail = '';
  const started = Date.now();
  let mostWaiting = 0;
  const pace = setInterval(() => {
    mostWaiting = Math.max(mostWaiting, replies[0]?.writableLength ?? 0);
    const piece = socket.read() as Buffer | null;
    if (!piece) return;
    bytes += piece.length;
    tail = (tail + piece.toString('latin1')).slice(-64);
  }, 50);
  try {
    for (let i = 0; i < 1_200 && !socket.closed && !tail.includes('data: [DONE]'); i++) await sleep(50);
  } finally {
    clearInterval(pace);
    socket.destroy();
  }
  expect(tail).toContain('data: [DONE]');
  expect(bytes).toBeGreaterThan(ANSWER_BYTES);
  // What waited in Keel's response for the reader never went far past a highWaterMark: the
  // answer is rendered only as fast as it is taken, not a queue's worth at a time.
  expect(mostWaiting).toBeLessThan(256 * 1024);
  // Well past a stalled reader's 4 s: its socket was full all along, and it was still not cut off.
  expect(Date.now() - started).toBeGreaterThan(5_000);
  expect(fake.log[0]).toMatchObject({ completed: true, aborted: false });
  await expect.poll(() => usageStatuses(owner), { timeout: 5_000 }).toEqual(['success']);
  expect(await metricValue(ctx.app, STALLED_COMPLETIONS)).toBe(stalledBefore);
}, 90_000);

it('a streamed agent completion whose client stops reading is cut off too, and counted as a stalled run-event stream (not as a chat completion)', async () => {
  const { fake } = server;
  fake.script('fake-precise', { chunks });
  const owner = await createUser(ctx.app);
  const agent = await createAgent(ctx.app, owner.headers);
  const completionsBefore = await metricValue(ctx.app, STALLED_COMPLETIONS);
  const stalledBefore = await metricValue(ctx.app, 'keel_run_event_streams_stalled_total');
  const socket = await completionSocket(owner, `agent:${agent.id}`);
  await expect.poll(() => metricValue(ctx.app, 'keel_run_event_streams_stalled_total'), { timeout: 30_000, interval: 500 }).toBe(stalledBefore + 1);
  socket.resume();
  await expect.poll(() => socket.closed, { timeout: 5_000 }).toBe(true);
  await expect.poll(() => ctx.app.eventStreams.heldBy(owner.user.id)).toBe(0);
  expect(await metricValue(ctx.app, STALLED_COMPLETIONS)).toBe(completionsBefore);
}, 60_000);
