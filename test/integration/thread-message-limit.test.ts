/**
 * MAX_MESSAGES_PER_THREAD: every path that appends a client's messages to a thread (a post, a run's
 * input — now or when an `enqueue` run takes the thread —, an `agent:` completion's history) is
 * refused with 409 past it, counted under the thread's lock so concurrent appends cannot overshoot.
 */
import { describe, expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createUser, type TestUser } from '../helpers/factories.js';
import { apiOf, createKey, type ListBody } from '../helpers/http.js';
import { createAgent, createThread, type RunBody, startRun, useRunServer, waitForRun } from '../helpers/runs.js';

const MAX = 4;
const ctx = useTestApp({ MAX_MESSAGES_PER_THREAD: String(MAX), MODEL_MAX_RETRIES: '0' });
const api = apiOf(ctx);
const server = useRunServer(ctx);

const LIMIT = /Thread message limit reached: a thread holds at most 4 messages \(MAX_MESSAGES_PER_THREAD\)/;

async function owner(): Promise<TestUser> {
  const user = await createUser(ctx.app);
  await createAgent(ctx.app, user.headers, { is_default: true });
  return user;
}

const post = (user: TestUser, threadId: string, content: string) => api('POST', `/threads/${threadId}/messages`, user.headers, { content });
const countOf = async (user: TestUser, threadId: string) => (await api('GET', `/threads/${threadId}/messages`, user.headers)).json<ListBody<unknown>>().count;

describe('MAX_MESSAGES_PER_THREAD', () => {
  it('refuses a posted message past it with 409, and a deleted message makes room again', async () => {
    const user = await owner();
    const { id } = await createThread(ctx.app, user.headers);
    const ids: string[] = [];
    for (let i = 0; i < MAX; i++) {
      const response = await post(user, id, `m${i}`);
      expect(response.statusCode, response.body).toBe(200);
      ids.push(response.json<{ id: string }>().id);
    }
    const refused = await post(user, id, 'one too many');
    expect(refused.statusCode, refused.body).toBe(409);
    expect(refused.json<{ detail: string }>().detail).toMatch(LIMIT);
    expect(refused.json<{ detail: string }>().detail).toContain('this one holds or will hold 4 or more, and one more would pass it. Start a new thread');
    expect(await countOf(user, id)).toBe(MAX);

    expect((await api('DELETE', `/threads/${id}/messages/${ids[0]}`, user.headers)).statusCode).toBe(200);
    expect((await post(user, id, 'fits again')).statusCode).toBe(200);
  });

  it('refuses a run whose input would pass it (no run, the thread stays idle); a run without input still starts', async () => {
    const user = await owner();
    const { id } = await createThread(ctx.app, user.headers);
    for (let i = 0; i < MAX; i++) expect((await post(user, id, `m${i}`)).statusCode).toBe(200);

    const refused = await api('POST', `/threads/${id}/runs`, user.headers, { input: 'and this?' });
    expect(refused.statusCode, refused.body).toBe(409);
    expect(refused.json<{ detail: string }>().detail).toMatch(LIMIT);
    expect((await api('GET', `/threads/${id}/runs`, user.headers)).json<ListBody<unknown>>().count).toBe(0);
    expect((await api('GET', `/threads/${id}`, user.headers)).json<{ status: string }>().status).toBe('idle');

    // The run's own answer is not a client's message: it is written past the limit.
    server.fake.script('fake-precise', { text: 'Answered.' });
    const run = await startRun(ctx.app, user.headers, id);
    expect((await waitForRun(ctx.app, user.headers, run.id, ['completed', 'failed'])).status).toBe('completed');
    expect(await countOf(user, id)).toBe(MAX + 1);
  });

  it('refuses a retry that would append its input (an enqueued run cancelled before it took the thread) past it', async () => {
    const user = await owner();
    const { id } = await createThread(ctx.app, user.headers);
    server.fake.script('fake-precise', { hang: true });
    const active = await startRun(ctx.app, user.headers, id, { input: 'first' });
    const queued = await startRun(ctx.app, user.headers, id, { input: 'never appended', multitask_strategy: 'enqueue' });
    for (const run of [queued, active]) expect((await api('POST', `/runs/${run.id}/cancel`, user.headers)).statusCode).toBe(200);
    await waitForRun(ctx.app, user.headers, active.id, ['cancelled']);
    for (let i = 1; i < MAX; i++) expect((await post(user, id, `m${i}`)).statusCode).toBe(200);

    const refused = await api('POST', `/runs/${queued.id}/retry`, user.headers);
    expect(refused.statusCode, refused.body).toBe(409);
    expect(refused.json<{ detail: string }>().detail).toMatch(LIMIT);
    expect(await countOf(user, id)).toBe(MAX);
  });

  it('counts the input of an enqueued run, which it appends when it takes the thread', async () => {
    const user = await owner();
    const { id } = await createThread(ctx.app, user.headers);
    expect((await post(user, id, 'first')).statusCode).toBe(200);
    server.fake.script('fake-precise', { hang: true });
    const active = await startRun(ctx.app, user.headers, id, { input: 'second' }); // 2 messages
    const queued = await startRun(ctx.app, user.headers, id, { input: 'third', multitask_strategy: 'enqueue' }); // 3, when it runs
    const queued2 = await startRun(ctx.app, user.headers, id, { input: 'fourth', multitask_strategy: 'enqueue' }); // 4
    const refused = await api('POST', `/threads/${id}/runs`, user.headers, { input: 'fifth', multitask_strategy: 'enqueue' });
    expect(refused.statusCode, refused.body).toBe(409);
    // Two messages listed, two more to come: the count told is what the thread will hold.
    expect(refused.json<{ detail: string }>().detail).toMatch(LIMIT);
    expect(refused.json<{ detail: string }>().detail).toContain('this one holds or will hold 4 or more, and one more would pass it');
    expect(await countOf(user, id)).toBe(2);
    // The usual start (`reject`) does not count waiting runs: the thread is busy, and it is refused as such.
    const busy = await api('POST', `/threads/${id}/runs`, user.headers, { input: 'fifth' });
    expect(busy.statusCode, busy.body).toBe(409);
    expect(busy.json<{ detail: string }>().detail).toMatch(/^Thread is busy: run /);
    // Cancelled while waiting, the enqueued runs never append their inputs; the thread keeps its two messages.
    for (const run of [queued2, queued, active]) expect((await api('POST', `/runs/${run.id}/cancel`, user.headers)).statusCode).toBe(200);
    await waitForRun(ctx.app, user.headers, active.id, ['cancelled']);
    const left = (await api('GET', `/threads/${id}/messages`, user.headers)).json<ListBody<{ role: string; content: string }>>().data;
    expect(left.map((m) => [m.role, m.content])).toEqual([
      ['user', 'first'],
      ['user', 'second'],
    ]);
  });

  it('refuses a new thread whose history and input would pass it (an agent: completion), leaving no thread behind', async () => {
    const user = await owner();
    const agent = await createAgent(ctx.app, user.headers, { name: 'Helper' });
    const key = await createKey(ctx.app, user);
    const threads = async () => (await api('GET', '/threads', user.headers)).json<ListBody<unknown>>().count;
    const before = await threads();

    const history = Array.from({ length: MAX }, (_, i) => ({ role: i % 2 ? 'assistant' : 'user', content: `turn ${i}` }));
    const completion = await ctx.app.inject({
      method: 'POST',
      url: '/v1/chat/completions',
      headers: { authorization: `Bearer ${key.key}` },
      payload: { model: `agent:${agent.id}`, messages: [...history, { role: 'user', content: 'And now?' }] },
    });
    expect(completion.statusCode, completion.body).toBe(409);
    expect(completion.json<{ error: { message: string } }>().error.message).toMatch(LIMIT);
    expect(await threads()).toBe(before);

    // One turn fewer fits: history and input are MAX messages.
    server.fake.script('fake-precise', { text: 'Fine.' });
    const fits = await ctx.app.inject({
      method: 'POST',
      url: '/v1/chat/completions',
      headers: { authorization: `Bearer ${key.key}` },
      payload: { model: `agent:${agent.id}`, messages: [...history.slice(1), { role: 'user', content: 'And now?' }] },
    });
    expect(fits.statusCode, fits.body).toBe(200);
  });

  it('lets concurrent appends to one thread through up to the limit only', async () => {
    const user = await owner();
    const { id } = await createThread(ctx.app, user.headers);
    const answers = await Promise.all(Array.from({ length: 12 }, (_, i) => post(user, id, `racer ${i}`)));
    const statuses = answers.map((answer) => answer.statusCode).sort();
    expect(statuses.filter((status) => status === 200)).toHaveLength(MAX);
    expect(statuses.filter((status) => status === 409)).toHaveLength(12 - MAX);
    expect(await countOf(user, id)).toBe(MAX);
  });

  it('lets concurrent run starts with input and posts through up to the limit only', async () => {
    const user = await owner();
    const threadIds = [];
    for (let t = 0; t < 3; t++) {
      const { id } = await createThread(ctx.app, user.headers);
      for (let i = 0; i < MAX - 1; i++) expect((await post(user, id, `m${i}`)).statusCode).toBe(200);
      threadIds.push(id);
    }
    server.fake.script('fake-precise', { text: 'Done.' }, { text: 'Done.' }, { text: 'Done.' });
    // On each thread one message fits: a run's input or a post, never both.
    const answers = await Promise.all(threadIds.flatMap((id) => [api('POST', `/threads/${id}/runs`, user.headers, { input: 'run input' }), post(user, id, 'posted')]));
    expect(answers.filter((answer) => answer.statusCode === 200 || answer.statusCode === 202)).toHaveLength(threadIds.length);
    for (const answer of answers.filter((a) => a.statusCode === 202)) await waitForRun(ctx.app, user.headers, answer.json<RunBody>().id, ['completed', 'failed']);
    for (const id of threadIds) {
      const messages = (await api('GET', `/threads/${id}/messages`, user.headers)).json<ListBody<{ role: string }>>().data;
      expect(messages.filter((m) => m.role === 'user')).toHaveLength(MAX);
    }
  });
});
