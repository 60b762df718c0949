/**
 * A retry whose input message a client deletes while the retry waits for its locks: the run must
 * still get its input (appended again), so whether the message is there is read under the
 * thread's lock, which the delete waits for.
 */import { eq, sql } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';

import { transaction } from '../../src/core/db.js';

import { runs } from '../../src/models/index.js';

import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { apiOf, type ListBody, sleep } from '../helpers/http.js';
import { createAgent, createThread, type RunBody, startRun, useRunServer, waitForRun } from '../helpers/runs.js';

const MODEL = 'fake-precise';
const ctx = useTestApp({ MODEL_MAX_RETRIES: '0' });
const api = apiOf(ctx);
const server = useRunServer(ctx);

// Server mode: another connection holds the owner's row (the first lock a start takes) while the
// message is deleted; embedded, one connection serves every statement.
describe.runIf(process.env.DATABASE_URL)('a retry and a concurrent delete of its input message', () => {
  it('the retried run gets its input: whether the message is still there is read under the thread\'s lock', async () => {
    const owner = await createUser(ctx.app);
    await createAgent(ctx.app, owner.headers, { is_default: true });
    const thread = await createThread(ctx.app, owner.headers);
    server.fake.script(MODEL, { status: 401 }, { text: 'answered' });
    const failed = await startRun(ctx.app, owner.headers, thread.id, { input: 'the question' });
    await waitForRun(ctx.app, owner.headers, failed.id, ['failed']);
    const [input] = (await api('GET', `/threads/${thread.id}/messages`, owner.headers)).json<ListBody<{ id: string }>>().data;

    // Another transaction holds the owner's row: start()'s holdThreadBusy waits there, after retry()'s messageInThread.
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let locked!: () => void;
    const isLocked = new Promise<void>((resolve) => (locked = resolve));
    const holder = transaction(ctx.app.db, async (tx) => {
      await tx.execute(sql`select 1 from users where id = ${owner.user.id} for no key update`);
      locked();
      await released;
    });
    await isLocked;
    const retry = api('POST', `/runs/${failed.id}/retry`, owner.headers);
    await sleep(500); // retry() has read the message and waits for the owner's lock
    expect((await api('DELETE', `/threads/${thread.id}/messages/${input!.id}`, owner.headers)).statusCode).toBe(200);
    release();
    await holder;
    const retried = await retry;
    expect(retried.statusCode, retried.body).toBe(202);
    const run = await waitForRun(ctx.app, owner.headers, retried.json<RunBody>().id, ['completed', 'failed']);
    expect(run.status).toBe('completed');
    const [row] = await ctx.app.db.select().from(runs).where(eq(runs.id, run.id));
    const sent = server.fake.log.at(-1)!.body.messages as { role: string; content: string }[];
    expect(sent.filter((m) => m.role === 'user').map((m) => m.content)).toEqual(['the question']);
    // The input is in the thread once, and the run names that message.
    const messages = (await api('GET', `/threads/${thread.id}/messages`, owner.headers)).json<ListBody<{ id: string; content: string }>>().data;
    expect(messages.map((m) => m.content)).toEqual(['the question', 'answered']);
    expect(row!.input_message_id).toBe(messages[0]!.id);
  });
});
