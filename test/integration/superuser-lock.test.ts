/**
 * The last-superuser check (a delete, a demotion or a deactivation must not leave no active
 * superuser) serializes the changes that could leave none, and nothing else: while one is in
 * progress, the other superusers' model calls (a hold's reservation and a settlement's ledger entry
 * take KEY SHARE on their users row) and run starts (their users row FOR NO KEY UPDATE) go on.
 * Locking every active superuser's row FOR UPDATE made each of those wait for any user's delete by
 * a superuser.
 *
 * Each change is paused after its check, where it would commit (the test holds a row it then
 * needs); the crossing change is sent then: it must wait and be refused. Embedded, PGlite runs one
 * session at a time: nothing runs beside an open transaction, so these run on the server only.
 */
import { sql } from 'drizzle-orm';
import type { LightMyRequestResponse } from 'fastify';
import { describe, expect, it } from 'vitest';

import { getBalance } from '../../src/crud/billing.js';
import { useTestApp } from '../helpers/app.js';
import { createProject, createUser, type TestUser } from '../helpers/factories.js';
import type { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, eventually } from '../helpers/http.js';
import { creditedUser, lockWaits, unlessItWaits } from '../helpers/lock-waits.js';
import { useFakeModels } from '../helpers/metered-models.js';
import { createAgent, createThread, waitForRun } from '../helpers/runs.js';

const ctx = useTestApp({ BILLING_ENABLED: 'true', USAGE_FLUSH_INTERVAL_MS: '20', MODEL_MAX_RETRIES: '0' }, { tools: { knowledge_search: undefined } });
const api = apiOf(ctx);
const onServer = !!process.env.DATABASE_URL;

let fake: FakeModelServer;
let admin: Record<string, string>;
useFakeModels(ctx, (server, headers) => {
  fake = server;
  admin = headers;
});

const { rowsOf, waitingForLocks, blockedBy, waitingForAdvisoryLock } = lockWaits(ctx);
const superuserWithCredits = () => creditedUser(ctx, admin, { superuser: true });

/**
 * `first` is sent while a connection of the test holds `pause` (a row it needs after its
 * last-superuser check); once it waits there, `second` is sent and waits too (for `first`'s lock)
 * unless it answers first; then the pause ends. Returns both answers.
 */
async function crossing(
  pause: [text: string, params: unknown[]],
  first: () => Promise<LightMyRequestResponse>,
  second: () => Promise<LightMyRequestResponse>,
): Promise<[LightMyRequestResponse, LightMyRequestResponse]> {
  let answers!: Promise<[LightMyRequestResponse, LightMyRequestResponse]>;
  await ctx.database.withSession(async (session) => {
    await session.exec('begin');
    try {
      const [row] = await session.query<{ pid: number }>('select pg_backend_pid() as pid');
      const pid = row!.pid;
      await session.query(...pause);
      const one = first();
      await eventually(async () => (await blockedBy(pid)) > 0);
      const two = second();
      // Unserialized, the second would not wait: its answer (and what is left) then tells.
      await Promise.race([eventually(async () => (await waitingForAdvisoryLock()) > 0), two]);
      answers = Promise.all([one, two]);
    } finally {
      await session.exec('rollback');
    }
  });
  return answers;
}

async function activeSuperusers(): Promise<string[]> {
  return (await rowsOf<{ id: string }>(sql`select id from users where is_superuser and is_active order by id`)).map((row) => row.id);
}

describe.runIf(onServer)('the last-superuser check', () => {
  it("a user's delete by a superuser, paused at its cascade: another superuser's model call is held, answered and settled, and their run starts, meanwhile", async () => {
    const other = await superuserWithCredits();
    await createAgent(ctx.app, other.headers, { model: 'fake-billed', max_output_tokens: 10, is_default: true });
    const thread = await createThread(ctx.app, other.headers);
    const doomed = await createUser(ctx.app);
    const project = await createProject(ctx.app, doomed.headers);
    let deleted!: Promise<LightMyRequestResponse>;
    await ctx.database.withSession(async (session) => {
      await session.exec('begin');
      try {
        // The delete cascades to the project: it waits there, past its superuser lock and check.
        await session.query('select id from projects where id = $1 for share', [project.id]);
        deleted = api('DELETE', `/users/${doomed.user.id}`, admin);
        await eventually(async () => (await waitingForLocks()) > 0);

        fake.script('fake-billed', { text: 'done', usage: { prompt_tokens: 1, completion_tokens: 4 } });
        const call = ctx.app.inject({ method: 'POST', url: '/v1/chat/completions', headers: other.headers, payload: { model: 'fake-billed', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 10 } });
        const answered = await unlessItWaits(call);
        expect(answered === 'waited' ? "the hold waited for the delete's superuser lock" : answered.statusCode).toBe(200);
        expect(await unlessItWaits(ctx.app.meter.idle().then(() => 'settled'))).toBe('settled');
        const account = await getBalance(ctx.database.db, other.user.id);
        expect([Number(account.balance), Number(account.reserved)]).toEqual([96, 0]);

        fake.script('fake-billed', { text: 'ran', usage: { prompt_tokens: 1, completion_tokens: 2 } });
        const started = await unlessItWaits(api('POST', `/threads/${thread.id}/runs`, other.headers, { input: 'hello' }));
        expect(started === 'waited' ? "the run start waited for the delete's superuser lock" : started.statusCode).toBe(202);
        if (started !== 'waited') await waitForRun(ctx.app, other.headers, started.json<{ id: string }>().id, ['completed']);
      } finally {
        await session.exec('rollback');
      }
    });
    const response = await deleted;
    expect(response.statusCode, response.body).toBe(200);
  });

  it("a user's own delete, paused before its check, of a user promoted meanwhile: checked as the superuser they now are, and refused as the last one", async () => {
    const b = await createUser(ctx.app);
    const granted = await api('POST', '/billing/credits', admin, { user_id: b.user.id, amount: '1', description: 'an account row to pause at' });
    expect(granted.statusCode, granted.body).toBe(200);
    const others = `{${(await activeSuperusers()).join(',')}}`;
    let deleted!: Promise<LightMyRequestResponse>;
    try {
      await ctx.database.withSession(async (session) => {
        await session.exec('begin');
        try {
          // b's delete locks b's billing rows first (lockBillingRows): it waits there, authenticated as a plain user.
          await session.query('select user_id from credit_accounts where user_id = $1 for update', [b.user.id]);
          deleted = api('DELETE', '/users/me', b.headers);
          await eventually(async () => (await waitingForLocks()) > 0);
          const promoted = await api('PATCH', `/users/${b.user.id}`, admin, { is_superuser: true });
          expect(promoted.statusCode, promoted.body).toBe(200);
          // The other superusers gone meanwhile (demoted here, as their own deletes would): b is the last one.
          await rowsOf(sql`update users set is_superuser = false where id = any(${others}::uuid[])`);
        } finally {
          await session.exec('rollback');
        }
      });
      const response = await deleted;
      expect([response.statusCode, response.json<{ detail: string }>().detail]).toEqual([403, 'The last superuser cannot delete their account']);
      expect(await activeSuperusers()).toEqual([b.user.id]);
    } finally {
      await rowsOf(sql`update users set is_superuser = true where id = any(${others}::uuid[])`);
    }
  });

  describe('two superusers, the only active ones, crossing', () => {
    /** a and b, the only active superusers while `work` runs (the others, the configured one among them, demoted meanwhile). */
    async function onlyTwo(work: (a: TestUser, b: TestUser) => Promise<void>): Promise<void> {
      const others = `{${(await activeSuperusers()).join(',')}}`;
      const a = await createUser(ctx.app, { superuser: true });
      const b = await createUser(ctx.app, { superuser: true });
      await rowsOf(sql`update users set is_superuser = false where id = any(${others}::uuid[])`);
      try {
        expect(await activeSuperusers()).toEqual([a.user.id, b.user.id].sort());
        await work(a, b);
      } finally {
        await rowsOf(sql`update users set is_superuser = true where id = any(${others}::uuid[])`);
      }
    }

    it('deleting each other: the second waits for the first, then is refused as the last superuser; one is left', async () => {
      await onlyTwo(async (a, b) => {
        const project = await createProject(ctx.app, b.headers);
        const [first, second] = await crossing(
          // a's delete of b cascades to b's project: paused past its check.
          ['select id from projects where id = $1 for share', [project.id]],
          () => api('DELETE', `/users/${b.user.id}`, a.headers),
          () => api('DELETE', `/users/${a.user.id}`, b.headers),
        );
        expect(first.statusCode, first.body).toBe(200);
        expect([second.statusCode, second.json<{ detail: string }>().detail]).toEqual([403, 'The last superuser cannot be deleted']);
        expect(await activeSuperusers()).toEqual([a.user.id]);
      });
    });

    it('a demotion crossing a delete: the delete waits for the demotion, then is refused as the last superuser; one is left', async () => {
      await onlyTwo(async (a, b) => {
        const [first, second] = await crossing(
          // a's demotion of b updates b's row: paused past its check.
          ['select id from users where id = $1 for share', [b.user.id]],
          () => api('PATCH', `/users/${b.user.id}`, a.headers, { is_superuser: false }),
          () => api('DELETE', `/users/${a.user.id}`, b.headers),
        );
        expect(first.statusCode, first.body).toBe(200);
        expect([second.statusCode, second.json<{ detail: string }>().detail]).toEqual([403, 'The last superuser cannot be deleted']);
        expect(await activeSuperusers()).toEqual([a.user.id]);
      });
    });
  });
});
