import { randomUUID } from 'node:crypto';

import { eq, sql } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';

import { integrityAnswer } from '../../src/core/error-mapping.js';

import { projects, users } from '../../src/models/index.js';

import { useTestApp } from '../helpers/app.js';
import { createProject, createUser } from '../helpers/factories.js';
import { apiOf, sleep } from '../helpers/http.js';
import { databaseUrl } from '../helpers/postgres.js';

const ctx = useTestApp();
const api = apiOf(ctx);

/** The driver error a statement fails with (pg and PGlite alike), found on the error or its cause. */
async function failure(run: () => Promise<unknown>): Promise<{ code: string; constraint?: string; message?: string }> {
  try {
    await run();
  } catch (error) {
    for (let e: unknown = error; e; e = (e as { cause?: unknown }).cause) {
      if (typeof (e as { code?: unknown }).code === 'string') return e as { code: string };
    }
    throw error;
  }
  throw new Error('the statement did not fail');
}

describe('database errors by constraint', () => {
  it('answers a duplicate email with the users’ own message, by constraint name', async () => {
    const alice = await createUser(ctx.app);
    const error = await failure(() => ctx.app.db.insert(users).values({ email: alice.email.toUpperCase(), hashed_password: 'x' }));
    expect(error.code).toBe('23505');
    expect(integrityAnswer(error)).toEqual({ status: 409, detail: 'The user with this email already exists in the system' });
  });

  it('answers a key for a project that vanished with "Project not found"', async () => {
    const alice = await createUser(ctx.app);
    const error = await failure(() =>
      ctx.app.db.execute(sql`insert into api_keys (owner_id, project_id, name, prefix, key_hash) values (${alice.user.id}, ${randomUUID()}, 'k', 'p', ${randomUUID()})`),
    );
    expect(integrityAnswer(error)).toEqual({ status: 404, detail: 'Project not found' });
  });

  // PostgreSQL 17 (PGlite) reports a RESTRICT as 23001, earlier servers as 23503, like NO ACTION.
  it.each([
    ['restrict', ['23001', '23503']],
    ['no action', ['23503']],
  ])('answers a foreign key (on delete %s) violated by a delete with 409, not 404', async (rule, codes) => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    await ctx.app.db.execute(sql.raw(`create table kit_restrict (id uuid primary key, project_id uuid not null references projects(id) on delete ${rule})`));
    try {
      await ctx.app.db.execute(sql`insert into kit_restrict values (${randomUUID()}, ${project.id})`);
      const error = await failure(() => ctx.app.db.delete(projects).where(eq(projects.id, project.id)));
      expect(codes).toContain(error.code);
      expect(integrityAnswer(error)).toEqual({ status: 409, detail: 'The resource is still in use by other resources' });
      // Through the API, too: the delete answers 409 and the project stays.
      const response = await api('DELETE', `/projects/${project.id}`, alice.headers);
      expect(response.statusCode).toBe(409);
      expect(response.json()).toEqual({ detail: 'The resource is still in use by other resources' });
      expect((await api('GET', `/projects/${project.id}`, alice.headers)).statusCode).toBe(200);
    } finally {
      await ctx.app.db.execute(sql`drop table kit_restrict`);
    }
  });
});

describe('prepared statement names', () => {
  it('a name used twice stops the start-up (the module defining it fails to load), on either database', async () => {
    // projects_by_ids is taken by crud/project.ts; a second resource over the same table would clash.
    await expect(import('../helpers/colliding-crud.js')).rejects.toThrow('prepared statement name "projects_by_ids" is used twice');
    expect(ctx.database.kind).toBe(process.env.DATABASE_URL ? 'postgres' : 'pglite');
  });
});

describe('update racing a delete', () => {
  // PGlite is one session: a second connection holding a row lock needs the server.
  it.skipIf(!process.env.DATABASE_URL)('answers 404, not the stale row, when a concurrent delete wins', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers, 'Racing');
    const { rows } = await ctx.database.withSession(async (session) => ({ rows: await session.query<{ db: string }>('select current_database() as db') }));
    const url = databaseUrl(process.env.DATABASE_URL!, rows[0]!.db);
    // Another connection deletes the project and holds the row lock until it commits.
    const pg = await import('pg');
    const other = new pg.default.Client({ connectionString: url });
    await other.connect();
    try {
      await other.query('begin');
      await other.query('delete from projects where id = $1', [project.id]);
      const patch = api('PATCH', `/projects/${project.id}`, alice.headers, { name: 'Too late' });
      await sleep(300);
      await other.query('commit');
      const response = await patch;
      expect(response.statusCode).toBe(404);
      expect(response.json()).toEqual({ detail: 'Project not found' });
    } finally {
      await other.end();
    }
  });
});
