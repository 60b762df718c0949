/* global process */
// The floor of a gateway built like Keel's: bare Fastify (as Keel's HTTP server) passing
// POST /v1/chat/completions to UPSTREAM with undici's `request()` on a keep-alive Agent (as Keel's
// openai-wire), streamed answers piped through. No authentication, no database, no metering, no
// logging: what two HTTP hops on Node cost on this machine, against which Keel's added latency
// (bench/gateway.mjs, target `bare-proxy`) can be read.
//   PORT=8204 UPSTREAM=http://127.0.0.1:8201/v1 node bench/bare-proxy.mjs
import Fastify from 'fastify';
import { Agent, request } from 'undici';

const port = Number(process.env.PORT ?? 8204);
const upstream = process.env.UPSTREAM ?? 'http://127.0.0.1:8201/v1';
const dispatcher = new Agent({ keepAliveTimeout: 60_000, connections: 256 });
const app = Fastify({ logger: false, bodyLimit: 1 << 20 });

app.post('/v1/chat/completions', async (req, reply) => {
  const answer = await request(`${upstream}/chat/completions`, {
    method: 'POST',
    dispatcher,
    headers: { 'content-type': 'application/json', authorization: 'Bearer sk-bench' },
    body: JSON.stringify(req.body),
  });
  reply.code(answer.statusCode).header('content-type', answer.headers['content-type'] ?? 'application/json');
  if (req.body?.stream) return reply.send(answer.body);
  return reply.send(await answer.body.text());
});
app.get('/health', async () => ({ status: 'ok' }));

await app.listen({ host: '127.0.0.1', port });
process.once('SIGTERM', () => void app.close().then(() => dispatcher.close()));
