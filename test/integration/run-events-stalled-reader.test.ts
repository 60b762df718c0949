/**
 * A reader of a run's events that stops taking data (its socket full) is cut off after
 * STALLED_READER_KEEPALIVES keep-alive intervals, rather than holding its connection, its reader of
 * the log and its keep-alive timer for as long as it likes — after the run has ended too. It may
 * reconnect with its Last-Event-ID. A reader that takes data slowly but steadily is not cut off,
 * even during one event that takes far longer than that to go out.
 */
import { connect } from 'node:net';

import { expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { metricValue, sleep } from '../helpers/http.js';
import { createAgent, createThread, readEvents, startRun, useRunServer, waitForRun } from '../helpers/runs.js';

const MODEL = 'fake-precise';
// Keep-alives every second: a stalled reader is cut off after 4 s.
const ctx = useTestApp({ RUN_EVENTS_KEEPALIVE_SECONDS: '1', MAX_MESSAGE_CHARS: '10000000' });
const server = useRunServer(ctx);

it('a reader that takes nothing is cut off a few keep-alives later; a reconnect gets the rest', async () => {
  const { fake, base } = server;
  // ~3 MB of text: more than the sockets' buffers hold for a reader that does not read.
  const piece = 'x'.repeat(60_000);
  fake.script(MODEL, { chunks: Array.from({ length: 50 }, () => piece) });
  const owner = await createUser(ctx.app);
  await createAgent(ctx.app, owner.headers, { is_default: true });
  const thread = await createThread(ctx.app, owner.headers);
  const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });

  const stalledBefore = await metricValue(ctx.app, 'keel_run_event_streams_stalled_total');
  const { port, hostname } = new URL(base);
  const socket = connect(Number(port), hostname);
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  socket.write(`GET /api/v1/runs/${run.id}/events HTTP/1.1\r\nHost: ${hostname}\r\nAuthorization: ${owner.headers.authorization}\r\n\r\n`);
  // Takes nothing from here on.
  socket.pause();
  let closed = false;
  socket.once('close', () => (closed = true));
  socket.on('error', () => undefined);

  await waitForRun(ctx.app, owner.headers, run.id, ['completed'], 30_000);
  // Past 4 keep-alives of taking nothing.
  await sleep(6_000);
  let received = '';
  socket.on('data', (data: Buffer) => (received += data.toString('latin1')));
  socket.resume();
  for (let i = 0; i < 100 && !closed; i++) await sleep(50);
  socket.destroy();
  // Cut off: the connection closed by the server, without the end of the stream.
  expect(closed).toBe(true);
  // Its place among the owner's streams (RUN_EVENTS_MAX_STREAMS_PER_USER) is given back.
  await expect.poll(() => ctx.app.eventStreams.heldBy(owner.user.id)).toBe(0);
  // Counted on /metrics: one stream cut off, none left open.
  expect(await metricValue(ctx.app, 'keel_run_event_streams_stalled_total')).toBe(stalledBefore + 1);
  expect(await metricValue(ctx.app, 'keel_run_event_streams_open')).toBe(0);
  expect(received).toContain('event: message.delta');
  expect(received).not.toContain('event: run.completed');
  // A reconnect after the last event it got has the rest, to the end.
  const ids = [...received.matchAll(/^id: (\d+)$/gm)].map((m) => Number(m[1]));
  const rest = await readEvents(base, owner.headers, run.id, { lastEventId: ids.at(-1) ?? 0, timeoutMs: 15_000 });
  expect(rest.events.at(-1)!.event).toBe('run.completed');
}, 60_000);

it('a reader that takes one large event slowly but steadily is not cut off, however long the event takes', async () => {
  const { fake, base } = server;
  // One delta of 6 MB: at the pace below it takes far longer than the 4 s a stalled reader gets.
  fake.script(MODEL, { chunks: ['y'.repeat(6_000_000)] });
  const owner = await createUser(ctx.app);
  await createAgent(ctx.app, owner.headers, { is_default: true });
  const thread = await createThread(ctx.app, owner.headers);
  const run = await startRun(ctx.app, owner.headers, thread.id, { input: 'x' });
  await waitForRun(ctx.app, owner.headers, run.id, ['completed'], 30_000);
  const stalledBefore = await metricValue(ctx.app, 'keel_run_event_streams_stalled_total');

  const { port, hostname } = new URL(base);
  const socket = connect(Number(port), hostname);
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  socket.write(`GET /api/v1/runs/${run.id}/events HTTP/1.1\r\nHost: ${hostname}\r\nAuthorization: ${owner.headers.authorization}\r\n\r\n`);
  let closed = false;
  socket.once('close', () => (closed = true));
  socket.on('error', () => undefined);
  // Reads what the socket holds (at most its buffer) every 50 ms: a steady reader on a slow link.
  const pieces: Buffer[] = [];
  let tail = '';
  const started = Date.now();
  const pace = setInterval(() => {
    const piece = socket.read() as Buffer | null;
    if (!piece) return;
    pieces.push(piece);
    tail = (tail + piece.toString('latin1')).slice(-4_096);
  }, 50);
  try {
    for (let i = 0; i < 1_200 && !closed && !tail.includes('event: run.completed'); i++) await sleep(50);
  } finally {
    clearInterval(pace);
    socket.destroy();
  }
  const took = Date.now() - started;
  const received = Buffer.concat(pieces).toString('latin1');
  // The whole stream, to its end, on the one connection.
  expect(received.length).toBeGreaterThan(6_000_000);
  expect(tail).toContain('event: run.completed');
  // And it took well past a stalled reader's 4 s (so the wait was restarted while it read).
  expect(took).toBeGreaterThan(5_000);
  expect(await metricValue(ctx.app, 'keel_run_event_streams_stalled_total')).toBe(stalledBefore);
}, 90_000);
