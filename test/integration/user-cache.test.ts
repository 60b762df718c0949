import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { type Database, openDatabase } from '../../src/core/db.js';

import { cacheUsers } from '../../src/crud/user.js';
import { buildTestApp, openTestDatabase, testSettings } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { eventually } from '../helpers/http.js';

// The user cache makes authentication skip a query; these tests show it never lets a dead token
// through, whichever node or connection changed the user.
const me = (app: FastifyInstance, headers: Record<string, string>) => app.inject({ method: 'GET', url: '/api/v1/users/me', headers });

describe('authenticated-user cache', () => {
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

  it('rejects a cached token as soon as this node deactivates the user', async () => {
    const user = await createUser(app);
    const admin = await createUser(app, { superuser: true });
    expect((await me(app, user.headers)).statusCode).toBe(200); // now cached
    const patch = await app.inject({ method: 'PATCH', url: `/api/v1/users/${user.user.id}`, headers: admin.headers, payload: { is_active: false } });
    expect(patch.statusCode).toBe(200);
    expect((await me(app, user.headers)).statusCode).toBe(401);
  });

  it('serves a profile change at once (no stale row after an update)', async () => {
    const user = await createUser(app);
    expect((await me(app, user.headers)).json()).toMatchObject({ full_name: null });
    await app.inject({ method: 'PATCH', url: '/api/v1/users/me', headers: user.headers, payload: { full_name: 'Ada' } });
    expect((await me(app, user.headers)).json()).toMatchObject({ full_name: 'Ada' });
  });

  it('rejects a cached token once the user is deleted', async () => {
    const user = await createUser(app);
    expect((await me(app, user.headers)).statusCode).toBe(200);
    expect((await app.inject({ method: 'DELETE', url: '/api/v1/users/me', headers: user.headers })).statusCode).toBe(200);
    expect((await me(app, user.headers)).statusCode).toBe(401);
  });

  describe.runIf(Boolean(process.env.DATABASE_URL))('with several nodes on one PostgreSQL', () => {
    let other: { database: Database; app: FastifyInstance };

    beforeAll(async () => {
      // A second node: its own pool and listener on the same database.
      const otherDatabase = await openDatabase(testSettings({ DATABASE_URL: url! }));
      await cacheUsers(otherDatabase);
      other = { database: otherDatabase, app: await buildTestApp(otherDatabase) };
    });
    afterAll(async () => {
      await other.app.close();
      await other.database.close();
    });

    it("drops a token on the other node when this one changes the user's password", async () => {
      const user = await createUser(app);
      const token = await app.tokens.create(user.user.id, user.user.token_version, 'access');
      // Each test app has its own SECRET_KEY: sign the other node's token with its key.
      const otherToken = await other.app.tokens.create(user.user.id, user.user.token_version, 'access');
      expect((await me(app, { authorization: `Bearer ${token}` })).statusCode).toBe(200);
      expect((await me(other.app, { authorization: `Bearer ${otherToken}` })).statusCode).toBe(200); // cached there
      const change = await app.inject({
        method: 'PATCH',
        url: '/api/v1/users/me/password',
        headers: { authorization: `Bearer ${token}` },
        payload: { current_password: user.password, new_password: 'another-password' },
      });
      expect(change.statusCode).toBe(200);
      await eventually(async () => (await me(other.app, { authorization: `Bearer ${otherToken}` })).statusCode === 401, 2_000);
    });

    it('hears changes made by any connection (another process, the CLI, plain SQL)', async () => {
      const user = await createUser(other.app);
      expect((await me(other.app, user.headers)).statusCode).toBe(200);
      await database.withSession((s) => s.query('update users set is_active = false where id = $1', [user.user.id]));
      await eventually(async () => (await me(other.app, user.headers)).statusCode === 401, 2_000);
    });

    it('stops trusting the cache while its notification connection is down', async () => {
      const user = await createUser(other.app);
      expect((await me(other.app, user.headers)).statusCode).toBe(200);
      // Cut every listener connection, then change the user while nobody can hear it.
      await database.withSession(async (s) => {
        await s.query(`select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'keel-listener' and datname = current_database()`);
        await s.query('update users set is_active = false where id = $1', [user.user.id]);
      });
      await eventually(async () => (await me(other.app, user.headers)).statusCode === 401, 2_000);
      // The listener comes back, and the cache with it, still exact.
      await eventually(async () => {
        const rows = await database.withSession((s) =>
          s.query<{ n: number }>(`select count(*)::int as n from pg_stat_activity where application_name = 'keel-listener' and datname = current_database()`),
        );
        return rows[0]!.n >= 2;
      }, 10_000);
      await database.withSession((s) => s.query('update users set is_active = true where id = $1', [user.user.id]));
      await eventually(async () => (await me(other.app, user.headers)).statusCode === 200, 2_000);
    });
  });
});
