import { describe, expect, it } from 'vitest';

import { runs } from '../../src/models/index.js';

import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { apiOf } from '../helpers/http.js';
import { createThread } from '../helpers/runs.js';

// Scaled mode with its Redis out of reach (nothing listens on port 1): a run's event stream
// answers 503 in the API's {detail} shape before any SSE header, not a stream that ends at once.
const ctx = useTestApp({ REDIS_URL: 'redis://127.0.0.1:1' });
const api = apiOf(ctx);

describe('run events with Redis down', () => {
  it('GET /runs/{id}/events answers 503 {detail} quickly, for a running and an ended run', async () => {
    const owner = await createUser(ctx.app);
    const thread = await createThread(ctx.app, owner.headers);
    for (const status of ['running', 'completed'] as const) {
      const [run] = await ctx.app.db.insert(runs).values({ owner_id: owner.user.id, thread_id: thread.id, agent_version: 1, model: 'm', status }).returning({ id: runs.id });
      const started = Date.now();
      const response = await api('GET', `/runs/${run!.id}/events`, owner.headers);
      expect(response.statusCode, response.body).toBe(503);
      expect(response.headers['content-type']).toMatch(/^application\/json/);
      expect(response.json<{ detail: string }>().detail).toBe('Run events are unavailable, try again later');
      expect(Date.now() - started).toBeLessThan(5_000);
    }
    // The refused streams gave their places back (RUN_EVENTS_MAX_STREAMS_PER_USER).
    await expect.poll(() => ctx.app.eventStreams.heldBy(owner.user.id)).toBe(0);
  });
});
