/* global process, setImmediate */
// The runs benchmark's baseline: a bare Fastify app with the two requests a run client makes —
// POST /api/v1/threads/:id/runs answers 202 with a run id, GET /api/v1/runs/:id/events writes the
// events of a run from memory as SSE (run.started, message.created, five message.delta,
// message.completed, run.completed) and ends. No auth, no database, no model, no logging: what
// Node + Fastify + loopback HTTP cost alone. PORT (default 8230).
import { randomUUID } from 'node:crypto';

import Fastify from 'fastify';

const port = Number(process.env.PORT ?? 8230);
const app = Fastify({ logger: false });
const frame = (seq, event, data) => `id: ${seq}\nevent: ${event}\ndata: ${JSON.stringify({ ...data, seq })}\n\n`;
const events = (runId) => {
  const messageId = randomUUID();
  const names = ['run.started', 'message.created', ...Array(5).fill('message.delta'), 'message.completed', 'run.completed'];
  return names.map((name, i) => frame(i + 1, name, { run_id: runId, message_id: messageId, ...(name === 'message.delta' ? { delta: 'Hello ', step: 1 } : {}) }));
};

app.get('/health', async () => ({ status: 'ok' }));
app.post('/api/v1/threads/:id/runs', async (request, reply) => reply.code(202).send({ id: randomUUID(), thread_id: request.params.id, status: 'queued' }));
app.get('/api/v1/runs/:id/events', (request, reply) => {
  reply.hijack();
  reply.raw.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store' });
  reply.raw.write(': connected\n\n');
  // The events come on a later turn, as a run's do after the stream opens.
  setImmediate(() => {
    for (const piece of events(request.params.id)) reply.raw.write(piece);
    reply.raw.end();
  });
});
await app.listen({ host: '127.0.0.1', port });
process.once('SIGTERM', () => void app.close());
