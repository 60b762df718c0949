/**
 * API-key authentication reads keys from memory (crud/api-key.ts cacheApiKeys). These tests show a
 * cached key never outlives its revocation, deletion, project or owner — on this node, and (on
 * PostgreSQL) on another node that had it cached.
 */
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { type Database, openDatabase } from '../../src/core/db.js';

import { cacheUsers } from '../../src/crud/user.js';
import { buildTestApp, openTestDatabase, testSettings } from '../helpers/app.js';
import { createProject, createUser, superuserHeaders } from '../helpers/factories.js';
import { createKey, eventually, xApiKey } from '../helpers/http.js';

/** A route every live key may read, scoped or not. */
const me = (app: FastifyInstance, key: string) => app.inject({ method: 'GET', url: '/api/v1/billing/balance', headers: xApiKey(key) });
const status = async (app: FastifyInstance, key: string) => (await me(app, key)).statusCode;

describe('API-key cache', () => {
  let database: Database;
  let url: string | null;
  let destroy: () => Promise<void>;
  let app: FastifyInstance;

  beforeAll(async () => {
    ({ database, url, destroy } = await openTestDatabase());
    app = await buildTestApp(database);
  });
  afterAll(async () => {
    await app.close();
    await destroy();
  });

  it('refuses a cached key at once when it is revoked, and when it is deleted', async () => {
    const owner = await createUser(app);
    const revoked = await createKey(app, owner);
    const deleted = await createKey(app, owner);
    expect(await status(app, revoked.key)).toBe(200); // cached now
    expect(await status(app, deleted.key)).toBe(200);
    expect((await app.inject({ method: 'PATCH', url: `/api/v1/api-keys/${revoked.id}`, headers: owner.headers, payload: { status: 'revoked' } })).statusCode).toBe(200);
    expect(await status(app, revoked.key)).toBe(401);
    expect((await app.inject({ method: 'DELETE', url: `/api/v1/api-keys/${deleted.id}`, headers: owner.headers })).statusCode).toBe(200);
    expect(await status(app, deleted.key)).toBe(401);
  });

  it("refuses a cached project key once its project is deleted, and any key once its owner is deactivated", async () => {
    const owner = await createUser(app);
    const project = await createProject(app, owner.headers);
    const scoped = await createKey(app, owner, { name: 'scoped', project_id: project.id });
    expect(await status(app, scoped.key)).toBe(200);
    expect((await app.inject({ method: 'DELETE', url: `/api/v1/projects/${project.id}`, headers: owner.headers })).statusCode).toBe(200);
    expect(await status(app, scoped.key)).toBe(401);

    const key = await createKey(app, owner);
    expect(await status(app, key.key)).toBe(200);
    const admin = await superuserHeaders(app);
    expect((await app.inject({ method: 'PATCH', url: `/api/v1/users/${owner.user.id}`, headers: admin, payload: { is_active: false } })).statusCode).toBe(200);
    expect(await status(app, key.key)).toBe(401);
  });

  describe.runIf(Boolean(process.env.DATABASE_URL))('with several nodes on one PostgreSQL', () => {
    let other: { database: Database; app: FastifyInstance };

    beforeAll(async () => {
      const otherDatabase = await openDatabase(testSettings({ DATABASE_URL: url! }));
      await cacheUsers(otherDatabase);
      other = { database: otherDatabase, app: await buildTestApp(otherDatabase) };
    });
    afterAll(async () => {
      await other.app.close();
      await other.database.close();
    });

    it('drops a key on the other node when this one revokes it or deletes its project', async () => {
      const owner = await createUser(app);
      const key = await createKey(app, owner);
      const project = await createProject(app, owner.headers);
      const scoped = await createKey(app, owner, { name: 'scoped', project_id: project.id });
      expect(await status(other.app, key.key)).toBe(200); // cached there
      expect(await status(other.app, scoped.key)).toBe(200);

      await app.inject({ method: 'PATCH', url: `/api/v1/api-keys/${key.id}`, headers: owner.headers, payload: { status: 'revoked' } });
      await eventually(async () => (await status(other.app, key.key)) === 401);
      await app.inject({ method: 'DELETE', url: `/api/v1/projects/${project.id}`, headers: owner.headers });
      await eventually(async () => (await status(other.app, scoped.key)) === 401);
    });
  });
});
