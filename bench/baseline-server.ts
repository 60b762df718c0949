/**
 * The baseline: a bare Fastify route answering GET /api/v1/projects/:id with the same JSON a
 * project read returns, from memory (no auth, no database, no logging). What Node + Fastify cost alone.
 */
import Fastify from 'fastify';

const port = Number(process.env.PORT ?? 8001);
const app = Fastify({ logger: false });
const project = {
  id: '8e0f4a52-6c1f-4d55-9d43-3f4f1d1b9a11',
  owner_id: '1b6a1f0e-1f0e-4c63-8a0e-6d0f3e5b2c77',
  name: 'Project 1.1',
  description: 'A benchmark project',
  created_at: '2026-11-26T04:00:00.000Z',
  updated_at: '2026-11-26T04:00:00.000Z',
};
app.get('/health', async () => ({ status: 'ok' }));
app.get('/api/v1/projects/:id', async (request) => ({ ...project, id: (request.params as { id: string }).id }));
await app.listen({ host: '127.0.0.1', port });
process.once('SIGTERM', () => void app.close());
