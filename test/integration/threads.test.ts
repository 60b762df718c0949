import { randomUUID } from 'node:crypto';

import { eq, type SQL, sql } from 'drizzle-orm';
import Fastify from 'fastify';
import { describe, expect, it } from 'vitest';

import { transaction } from '../../src/core/db.js';
import { databaseError, registerErrorHandler } from '../../src/core/errors.js';

import { messages, threads } from '../../src/models/index.js';

import { appendMessage } from '../../src/crud/thread.js';
import { useTestApp } from '../helpers/app.js';
import { bearer, createProject, createUser, type TestUser } from '../helpers/factories.js';
import { apiOf, createKey, expectValidationError, type ListBody, sleep } from '../helpers/http.js';
import { databaseUrl } from '../helpers/postgres.js';

const MAX_CHARS = 50;
const ctx = useTestApp({ MAX_THREADS_PER_USER: '3', MAX_MESSAGE_CHARS: String(MAX_CHARS), BODY_LIMIT_BYTES: '32768' });
const api = apiOf(ctx);

interface ThreadBody {
  id: string;
  project_id: string | null;
  title: string;
  status: 'idle' | 'busy';
  metadata: Record<string, unknown>;
}

interface MessageBody {
  id: string;
  thread_id: string;
  role: string;
  content: string;
  run_id: string | null;
  tool_calls: unknown;
  metadata: Record<string, unknown>;
}

async function createThread(owner: TestUser, body: Record<string, unknown> = {}, headers = owner.headers): Promise<ThreadBody> {
  const response = await api('POST', '/threads', headers, body);
  expect(response.statusCode, response.body).toBe(200);
  return response.json<ThreadBody>();
}

async function post(owner: TestUser, threadId: string, content: string): Promise<MessageBody> {
  const response = await api('POST', `/threads/${threadId}/messages`, owner.headers, { content });
  expect(response.statusCode, response.body).toBe(200);
  return response.json<MessageBody>();
}

const page = async (owner: TestUser, threadId: string, query = '') => (await api('GET', `/threads/${threadId}/messages${query}`, owner.headers)).json<ListBody<MessageBody>>();

/** What a run does to a thread (the only writer of `status`). */
const setStatus = (id: string, status: 'idle' | 'busy') => ctx.app.db.update(threads).set({ status }).where(eq(threads.id, id));

describe('threads', () => {
  it('start idle with an empty title; status is not the client’s to set', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    expect(thread).toMatchObject({ title: '', status: 'idle', project_id: null, metadata: {} });
    expectValidationError(await api('PATCH', `/threads/${thread.id}`, alice.headers, { status: 'busy' }), ['body', 'status'], 'extra_forbidden');
    expectValidationError(await api('POST', '/threads', alice.headers, { status: 'busy' }), ['body', 'status'], 'extra_forbidden');
    const changed = await api('PATCH', `/threads/${thread.id}`, alice.headers, { title: ' Trip ', metadata: { k: [1, 2] } });
    expect(changed.json()).toMatchObject({ title: 'Trip', status: 'idle', metadata: { k: [1, 2] } });
  });

  it('a NUL character in metadata, tags or text is refused with 422 in words, as PostgreSQL cannot store it (in JSON or as text)', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    const message = (await api('POST', `/threads/${thread.id}/messages`, alice.headers, { content: 'hi' })).json<MessageBody>();
    const agent = (await api('POST', '/agents', alice.headers, { name: 'nul', model: 'gpt-4.1-mini' })).json<{ id: string }>();
    const writes: ['POST' | 'PATCH', string, unknown][] = [
      ['POST', '/threads', { metadata: { k: 'a\u0000b' } }],
      ['PATCH', `/threads/${thread.id}`, { metadata: { 'a\u0000b': 1 } }],
      ['PATCH', `/threads/${thread.id}`, { metadata: { k: { nested: ['\u0000'] } } }],
      ['PATCH', `/threads/${thread.id}`, { title: 'a\u0000b' }],
      ['POST', `/threads/${thread.id}/messages`, { content: 'x', metadata: { k: '\u0000' } }],
      ['PATCH', `/threads/${thread.id}/messages/${message.id}`, { metadata: { k: '\u0000' } }],
      ['POST', '/agents', { name: 'x', model: 'gpt-4.1-mini', metadata: { k: '\u0000' } }],
      ['POST', '/agents', { name: 'x', model: 'gpt-4.1-mini', tags: ['a\u0000'] }],
      ['PATCH', `/agents/${agent.id}`, { metadata: { k: '\u0000' } }],
    ];
    for (const [method, url, body] of writes) {
      const response = await api(method, url, alice.headers, body);
      expect(response.statusCode, `${method} ${url} ${JSON.stringify(body)}: ${response.body}`).toBe(422);
      expect(response.json<{ detail: { msg: string }[] }>().detail[0]!.msg).toBe('Text contains a character that cannot be stored');
    }
  });

  it('text with an unpaired surrogate (half of a UTF-16 pair) is refused with 422 naming the field, not stored as U+FFFD (text) nor refused as "Value out of range" (JSON); a whole pair is kept', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    const message = (await api('POST', `/threads/${thread.id}/messages`, alice.headers, { content: 'hi' })).json<MessageBody>();
    const agent = (await api('POST', '/agents', alice.headers, { name: 'lone', model: 'gpt-4.1-mini' })).json<{ id: string }>();
    const [high, low] = ['\ud83d', '\ude00'];
    const writes: ['POST' | 'PATCH', string, unknown, (string | number)[]][] = [
      ['POST', `/threads/${thread.id}/messages`, { content: `a${high}b` }, ['body', 'content']],
      ['PATCH', `/threads/${thread.id}/messages/${message.id}`, { content: `${low}` }, ['body', 'content']],
      ['POST', '/threads', { title: `cut ${high}` }, ['body', 'title']],
      ['PATCH', `/threads/${thread.id}`, { title: `${low}x` }, ['body', 'title']],
      ['PATCH', `/threads/${thread.id}`, { metadata: { k: `a${high}` } }, ['body', 'metadata', 'k']],
      ['PATCH', `/threads/${thread.id}`, { metadata: { k: { nested: ['ok', `${low}`] } } }, ['body', 'metadata', 'k', 'nested', '1']],
      ['POST', `/threads/${thread.id}/messages`, { content: 'x', metadata: { [`key${high}`]: 1 } }, ['body', 'metadata', `key${high}`]],
      ['POST', '/agents', { name: 'x', model: 'gpt-4.1-mini', description: `d${high}` }, ['body', 'description']],
      ['PATCH', `/agents/${agent.id}`, { description: `${low}` }, ['body', 'description']],
      ['PATCH', `/agents/${agent.id}`, { name: `n${high}` }, ['body', 'name']],
      ['PATCH', `/agents/${agent.id}`, { system_prompt: `p${high}` }, ['body', 'system_prompt']],
      ['PATCH', `/agents/${agent.id}`, { tags: ['fine', `t${low}`] }, ['body', 'tags', '1']],
      ['POST', '/projects', { name: `p${high}` }, ['body', 'name']],
      ['POST', `/threads/${thread.id}/runs`, { input: `i${high}` }, ['body', 'input']],
      ['POST', '/runs', { input: 'i', thread: { title: `${low}` } }, ['body', 'thread', 'title']],
    ];
    for (const [method, url, body, loc] of writes) {
      const response = await api(method, url, alice.headers, body);
      expect(response.statusCode, `${method} ${url} ${JSON.stringify(body)}: ${response.body}`).toBe(422);
      expect(response.json<{ detail: unknown[] }>().detail, `${method} ${url}`).toEqual([{ loc, msg: 'Text holds an unpaired surrogate (half of a UTF-16 surrogate pair, which is no character): send whole characters', type: 'value_error' }]);
    }
    expect((await page(alice, thread.id)).data.map((m) => m.content)).toEqual(['hi']);
    // A whole pair (an emoji) is a character like any other.
    const emoji = `${high}${low}`;
    const kept = await api('PATCH', `/threads/${thread.id}`, alice.headers, { title: `smile ${emoji}`, metadata: { [emoji]: emoji } });
    expect(kept.json(), kept.body).toMatchObject({ title: `smile ${emoji}`, metadata: { [emoji]: emoji } });
    expect((await post(alice, thread.id, emoji)).content).toBe(emoji);
  });

  it('the database refusing a JSON value with an unpaired surrogate (22P02) is answered 422 saying so, not "Value out of range"', async () => {
    const refused = await ctx.app.db.execute(sql`select ${JSON.stringify({ k: 'a\ud800' })}::jsonb`).then(
      () => undefined,
      (error: unknown) => error,
    );
    expect(databaseError(refused)).toMatchObject({ code: '22P02' });
    const app = Fastify({ logger: false });
    registerErrorHandler(app);
    app.post('/', async () => {
      throw refused;
    });
    const response = await app.inject({ method: 'POST', url: '/', payload: {} });
    await app.close();
    expect(response.statusCode).toBe(422);
    expect(response.json()).toEqual({ detail: [{ loc: ['body'], msg: 'Text holds an unpaired surrogate (half of a UTF-16 surrogate pair, which is no character): send whole characters', type: 'value_error' }] });
  });

  it('a value the database refuses that no schema bounded (22001, 22003, 22P02) is answered 422 in its own words, not all "Value out of range"', async () => {
    const refusalOf = (statement: SQL) =>
      ctx.app.db.execute(statement).then(
        () => undefined,
        (error: unknown) => error,
      );
    const cases: [SQL, string, string][] = [
      // Assigned, not cast (an explicit cast to varchar(n) cuts the text without a word).
      [sql`do $$ declare v varchar(2); begin v := 'abc'; end $$`, '22001', 'Value too long for its field'],
      [sql`select 2147483648::int4`, '22003', 'Number out of range for its field'],
      [sql`select 'abc'::int4`, '22P02', 'Invalid value for its field\'s type'],
    ];
    const app = Fastify({ logger: false });
    registerErrorHandler(app);
    const thrown = new Map<string, unknown>();
    app.post('/:code', async (request) => {
      throw thrown.get((request.params as { code: string }).code);
    });
    for (const [statement, code, msg] of cases) {
      const refused = await refusalOf(statement);
      expect(databaseError(refused), code).toMatchObject({ code });
      thrown.set(code, refused);
      const response = await app.inject({ method: 'POST', url: `/${code}`, payload: {} });
      expect(response.statusCode, code).toBe(422);
      expect(response.json(), code).toEqual({ detail: [{ loc: ['body'], msg, type: 'value_error' }] });
    }
    await app.close();
  });

  it('list by project and by status', async () => {
    const alice = await createUser(ctx.app);
    const project = await createProject(ctx.app, alice.headers);
    const inProject = await createThread(alice, { project_id: project.id });
    const loose = await createThread(alice);
    await setStatus(loose.id, 'busy');
    const ids = async (query: string) => (await api('GET', `/threads${query}`, alice.headers)).json<ListBody<ThreadBody>>().data.map((t) => t.id);
    expect(await ids(`?project_id=${project.id}`)).toEqual([inProject.id]);
    expect(await ids('?status=busy')).toEqual([loose.id]);
    expect(await ids(`?status=idle&project_id=${project.id}`)).toEqual([inProject.id]);
    expect(await ids('?status=idle')).toEqual([inProject.id]);
    expectValidationError(await api('GET', '/threads?status=running', alice.headers), ['query', 'status'], 'enum');
    expectValidationError(await api('GET', '/threads?project_id=x', alice.headers), ['query', 'project_id']);
  });

  it('stop at MAX_THREADS_PER_USER with 409', async () => {
    const alice = await createUser(ctx.app);
    for (let i = 0; i < 3; i++) await createThread(alice);
    const refused = await api('POST', '/threads', alice.headers, {});
    expect(refused.statusCode).toBe(409);
    expect(refused.json()).toEqual({ detail: 'Thread limit reached (3 per user)' });
  });

  it('take only the caller’s project; a scoped key’s go into its project', async () => {
    const alice = await createUser(ctx.app);
    const bob = await createUser(ctx.app);
    const bobs = await createProject(ctx.app, bob.headers);
    const response = await api('POST', '/threads', alice.headers, { project_id: bobs.id });
    expect(response.statusCode).toBe(404);
    expect(response.json()).toEqual({ detail: 'Project not found' });
    const project = await createProject(ctx.app, alice.headers);
    const key = bearer((await createKey(ctx.app, alice, { name: 'scoped', project_id: project.id })).key);
    const thread = await createThread(alice, {}, key);
    expect(thread.project_id).toBe(project.id);
    expect((await api('PATCH', `/threads/${thread.id}`, key, { project_id: null })).statusCode).toBe(403);
    expect((await api('PATCH', `/threads/${thread.id}`, alice.headers, { project_id: bobs.id })).statusCode).toBe(404);
  });

  it('delete their messages with them, and refuse (409) while busy', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    await post(alice, thread.id, 'one');
    await post(alice, thread.id, 'two');
    await setStatus(thread.id, 'busy');
    const refused = await api('DELETE', `/threads/${thread.id}`, alice.headers);
    expect(refused.statusCode).toBe(409);
    expect(refused.json<{ detail: string }>().detail).toMatch(/^Thread is busy/);
    await setStatus(thread.id, 'idle');
    expect((await api('DELETE', `/threads/${thread.id}`, alice.headers)).statusCode).toBe(200);
    const left = await ctx.app.db.select({ id: messages.id }).from(messages).where(eq(messages.thread_id, thread.id));
    expect(left).toEqual([]);
    expect((await api('GET', `/threads/${thread.id}/messages`, alice.headers)).statusCode).toBe(404);
  });
});

describe('messages', () => {
  it('are user messages: other roles, and run fields, are refused with 422', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    const message = await post(alice, thread.id, 'hi');
    expect(message).toMatchObject({ thread_id: thread.id, role: 'user', content: 'hi', run_id: null, tool_calls: null, metadata: {} });
    for (const role of ['system', 'assistant', 'tool']) {
      const response = await api('POST', `/threads/${thread.id}/messages`, alice.headers, { role, content: 'x' });
      expect(expectValidationError(response, ['body', 'role']).detail[0]!.msg).toMatch(/^Clients post user messages/);
    }
    for (const field of ['tool_calls', 'tool_call_id', 'run_id']) {
      expectValidationError(await api('POST', `/threads/${thread.id}/messages`, alice.headers, { content: 'x', [field]: null }), ['body', field], 'extra_forbidden');
    }
    expect((await page(alice, thread.id)).count).toBe(1);
  });

  it('hold at most MAX_MESSAGE_CHARS characters (422), and a body over the limit is 413', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    const message = await post(alice, thread.id, 'é'.repeat(MAX_CHARS));
    const long = 'x'.repeat(MAX_CHARS + 1);
    for (const [method, url] of [['POST', `/threads/${thread.id}/messages`], ['PATCH', `/threads/${thread.id}/messages/${message.id}`]] as const) {
      const response = await api(method, url, alice.headers, { content: long });
      const body = expectValidationError(response, ['body', 'content'], 'string_too_long');
      expect(body.detail[0]!.msg).toBe(`String should have at most ${MAX_CHARS} characters`);
    }
    const huge = await api('POST', `/threads/${thread.id}/messages`, alice.headers, { content: 'x'.repeat(40_000) });
    expect(huge.statusCode).toBe(413);
    expect(huge.json()).toEqual({ detail: 'Request body too large' });
    expect((await page(alice, thread.id)).data.map((m) => m.content)).toEqual(['é'.repeat(MAX_CHARS)]);
  });

  it('hold more than white space (422): the model is sent each message, and a provider that refuses a blank one (Anthropic) failed every later run of the thread', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    const message = await post(alice, thread.id, 'hi');
    for (const [method, url] of [['POST', `/threads/${thread.id}/messages`], ['PATCH', `/threads/${thread.id}/messages/${message.id}`]] as const) {
      expectValidationError(await api(method, url, alice.headers, { content: ' \n\t ' }), ['body', 'content'], 'value_error');
    }
    expectValidationError(await api('POST', `/threads/${thread.id}/runs`, alice.headers, { input: '  ' }), ['body', 'input'], 'value_error');
    expectValidationError(await api('POST', '/runs', alice.headers, { input: '\n' }), ['body', 'input'], 'value_error');
    expect((await page(alice, thread.id)).data.map((m) => m.content)).toEqual(['hi']);
  });

  it('change: metadata of any message, content of user messages only', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    const mine = await post(alice, thread.id, 'draft');
    const answer = await transaction(ctx.app.db, (tx) => appendMessage(tx, { thread_id: thread.id, role: 'assistant', content: 'reply' }));
    expect((await api('PATCH', `/threads/${thread.id}/messages/${mine.id}`, alice.headers, { content: 'final' })).json()).toMatchObject({ content: 'final' });
    const refused = await api('PATCH', `/threads/${thread.id}/messages/${answer.id}`, alice.headers, { content: 'rewritten' });
    expect(expectValidationError(refused, ['body', 'content'], 'value_error').detail[0]!.msg).toMatch(/^Only the content of user messages/);
    const tagged = await api('PATCH', `/threads/${thread.id}/messages/${answer.id}`, alice.headers, { metadata: { rating: 5 } });
    expect(tagged.json()).toMatchObject({ role: 'assistant', content: 'reply', run_id: answer.run_id, metadata: { rating: 5 } });
    expect((await api('DELETE', `/threads/${thread.id}/messages/${answer.id}`, alice.headers)).json()).toEqual({ message: 'Message deleted successfully' });
    expect((await page(alice, thread.id)).data.map((m) => m.id)).toEqual([mine.id]);
  });

  it('cannot be written while a run works on the thread (409); reads go on', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    const message = await post(alice, thread.id, 'before');
    await setStatus(thread.id, 'busy');
    const item = `/threads/${thread.id}/messages/${message.id}`;
    for (const [method, url, body] of [['POST', `/threads/${thread.id}/messages`, { content: 'x' }], ['PATCH', item, { content: 'y' }], ['PATCH', item, { metadata: {} }], ['DELETE', item, undefined]] as const) {
      const response = await api(method, url, alice.headers, body);
      expect(response.statusCode, `${method} ${url}`).toBe(409);
      expect(response.json<{ detail: string }>().detail).toMatch(/^Thread is busy/);
    }
    expect((await api('GET', item, alice.headers)).json()).toMatchObject({ content: 'before' });
    expect((await api('PATCH', `/threads/${thread.id}`, alice.headers, { title: 'renamed while busy' })).json()).toMatchObject({ status: 'busy', title: 'renamed while busy' });
    await setStatus(thread.id, 'idle');
    await post(alice, thread.id, 'after');
  });

  it('page by offset and by cursor in creation order', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    const all: MessageBody[] = [];
    for (let i = 1; i <= 5; i++) all.push(await post(alice, thread.id, `m${i}`));
    const [m1, m2, , m4, m5] = all.map((m) => m.id);
    expect((await page(alice, thread.id)).data.map((m) => m.content)).toEqual(['m1', 'm2', 'm3', 'm4', 'm5']);
    const afterTwo = await page(alice, thread.id, `?after=${m2}&limit=2`);
    expect(afterTwo.data.map((m) => m.content)).toEqual(['m3', 'm4']);
    expect(afterTwo.count).toBe(3);
    expect((await page(alice, thread.id, `?after=${m2}&limit=2&offset=2`)).data.map((m) => m.content)).toEqual(['m5']);
    expect((await page(alice, thread.id, `?after=${m4}`)).data.map((m) => m.id)).toEqual([m5]);
    expect(await page(alice, thread.id, `?after=${m5}`)).toEqual({ data: [], count: 0 });
    // A new message lands after the last page's cursor.
    const m6 = await post(alice, thread.id, 'm6');
    expect((await page(alice, thread.id, `?after=${m5}`)).data.map((m) => m.id)).toEqual([m6.id]);
    expect((await page(alice, thread.id, `?offset=1&limit=1`)).data.map((m) => m.id)).toEqual([m2]);
    expect(m1).toBe(all[0]!.id);
  });

  it('answer 422 for a cursor that is not a message of the thread', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    const other = await createThread(alice);
    const elsewhere = await post(alice, other.id, 'elsewhere');
    await post(alice, thread.id, 'here');
    for (const after of [elsewhere.id, randomUUID()]) {
      const body = expectValidationError(await api('GET', `/threads/${thread.id}/messages?after=${after}`, alice.headers), ['query', 'after'], 'value_error');
      expect(body.detail[0]!.msg).toBe('No message with this id in this list');
    }
    expectValidationError(await api('GET', `/threads/${thread.id}/messages?after=m1`, alice.headers), ['query', 'after']);
  });

  it('keep creation order with equal timestamps, and under concurrent posts', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    // One transaction: every row gets the same now().
    const written = await transaction(ctx.app.db, async (tx) => {
      const rows = [];
      for (let i = 0; i < 6; i++) rows.push(await appendMessage(tx, { thread_id: thread.id, role: i % 2 ? 'assistant' : 'user', content: `t${i}` }));
      return rows;
    });
    expect(new Set(written.map((m) => m.created_at.getTime())).size).toBe(1);
    const seen: string[] = [];
    let cursor = '';
    for (;;) {
      const next = await page(alice, thread.id, `?limit=1${cursor}`);
      if (!next.data.length) break;
      seen.push(next.data[0]!.id);
      cursor = `&after=${next.data[0]!.id}`;
    }
    expect(seen).toEqual(written.map((m) => m.id));

    const posted = await Promise.all(Array.from({ length: 8 }, (_, i) => api('POST', `/threads/${thread.id}/messages`, alice.headers, { content: `c${i}` })));
    expect(posted.map((r) => r.statusCode)).toEqual(Array(8).fill(200));
    const listed = await page(alice, thread.id, `?after=${written[5]!.id}&limit=100`);
    expect(listed.count).toBe(8);
    expect(new Set(listed.data.map((m) => m.content))).toEqual(new Set(posted.map((r) => r.json<MessageBody>().content)));
    const seqs = await ctx.app.db.select({ seq: messages.seq }).from(messages).where(eq(messages.thread_id, thread.id)).orderBy(sql`${messages.seq}`);
    expect(seqs.map((r) => r.seq)).toEqual(Array.from({ length: 14 }, (_, i) => i + 1));
  });
});

describe('a run starting while a message is posted', () => {
  // PGlite is one session: a second connection holding the thread's row needs the server.
  it.skipIf(!process.env.DATABASE_URL)('makes the post wait for it and answer 409, never slip in', async () => {
    const alice = await createUser(ctx.app);
    const thread = await createThread(alice);
    const { rows } = await ctx.database.withSession(async (session) => ({ rows: await session.query<{ db: string }>('select current_database() as db') }));
    const pg = await import('pg');
    const other = new pg.default.Client({ connectionString: databaseUrl(process.env.DATABASE_URL!, rows[0]!.db) });
    await other.connect();
    try {
      // What a run's start does: mark the thread busy, holding its row until it commits.
      await other.query('begin');
      await other.query(`update threads set status = 'busy' where id = $1 and status = 'idle'`, [thread.id]);
      const posting = api('POST', `/threads/${thread.id}/messages`, alice.headers, { content: 'racing' });
      await sleep(300);
      await other.query('commit');
      const response = await posting;
      expect(response.statusCode).toBe(409);
      expect((await page(alice, thread.id)).count).toBe(0);
    } finally {
      await other.end();
    }
  });
});
