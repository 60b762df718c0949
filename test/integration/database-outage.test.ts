import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { describe, expect, it } from 'vitest';

import { DATABASE_RETRY_AFTER_SECONDS } from '../../src/core/db-errors.js';

import { buildTestApp, openTestDatabase } from '../helpers/app.js';
import { createUser, loginRequest, superuserHeaders } from '../helpers/factories.js';
import { adminQuery } from '../helpers/postgres.js';

const adminUrl = process.env.DATABASE_URL;

function expectUnavailable(response: LightMyRequestResponse, label: string): void {
  expect(response.statusCode, `${label}: ${response.body}`).toBe(503);
  expect(response.headers['retry-after'], label).toBe(String(DATABASE_RETRY_AFTER_SECONDS));
  expect(response.json(), label).toEqual({ detail: 'Service unavailable' });
}

// Server mode only: an embedded database cannot be dropped from under the app.
describe.skipIf(!adminUrl)('a database dropped while the app runs', () => {
  it('answers 503 with Retry-After on every route that needs it, as /ready does', async () => {
    const opened = await openTestDatabase();
    let app: FastifyInstance | null = null;
    try {
      app = await buildTestApp(opened.database);
      const alice = await createUser(app);
      const admin = await superuserHeaders(app);
      const name = new URL(opened.url!).pathname.slice(1);
      await adminQuery(adminUrl!, `drop database "${name}" with (force)`);

      // Twice: first the pool's connections were terminated (57P01), then reconnecting finds no database (3D000).
      for (let round = 1; round <= 2; round++) {
        expectUnavailable(await loginRequest(app, alice.email, alice.password), `login, round ${round}`);
        expectUnavailable(await app.inject({ method: 'GET', url: '/api/v1/projects/', headers: admin }), `projects, round ${round}`);
        expectUnavailable(
          await app.inject({ method: 'POST', url: '/api/v1/users/signup', payload: { email: `new-${round}@keel.test`, password: 'long-enough-password' } }),
          `signup, round ${round}`,
        );
      }
      expect((await app.inject({ method: 'GET', url: '/ready' })).statusCode).toBe(503);
    } finally {
      await app?.close();
      await opened.destroy();
    }
  });
});
