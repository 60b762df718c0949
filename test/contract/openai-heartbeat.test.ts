/**
 * A streamed /v1/chat/completions keeps its connection busy while the model is silent
 * (GATEWAY_STREAM_HEARTBEAT_MS): SSE comments (`: keep-alive`), which the official `openai`
 * package's parser skips, so that a proxy's or a load balancer's idle timeout does not cut a model
 * that thinks long before its first event. A failure before the first event within the interval
 * still answers its own HTTP status; once a comment has gone out the answer is a 200, and a failure
 * is the stream's error event. Each stream's one heartbeat timer is cleared however it ends. The
 * same for `agent:<id>` models, whose run may think (or run a tool) long before its first text, or
 * wait to be inserted (a lock on its thread, a busy database).
 *
 * The setting's floor (1,000 ms) is a check of the configuration only: the parts under it
 * (openStream, firstEvent, Heartbeat, completionBody, keptAlive, agentCompletionChunks) take any
 * interval, and are tested here built directly with a short one, against the fake model server
 * through a real model manager. Through the app, at the floor, only what needs the app: the openai
 * package reading late answers as sent, and an agent stream whose run's start waits on a lock.
 */
import { createHook } from 'node:async_hooks';
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import type { Readable } from 'node:stream';

import OpenAI from 'openai';
import pino from 'pino';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import type { SqlSession } from '../../src/core/db.js';
import { NotFoundError } from '../../src/core/errors.js';
import type { Logger } from '../../src/core/logger.js';

import type { UsageRecord } from '../../src/modules/ai-models/index.js';
import { agentCompletionChunks, type OpenedRun } from '../../src/services/agent-completions.js';
import { completionBody, CompletionFrames, firstEvent, KEEP_ALIVE, keptAlive, openAIErrorOf, openStream } from '../../src/services/openai-gateway.js';
import { useTestApp } from '../helpers/app.js';
import { createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer, type ScriptedReply } from '../helpers/fake-model-server.js';
import { apiOf, createKey, eventually, type ListBody, sleep, UUID } from '../helpers/http.js';
import { captureLogs, LEVEL } from '../helpers/logs.js';
import { fakeModelManager } from '../helpers/model-manager.js';
import { apiError } from '../helpers/openai.js';
import { createAgent, createThread, waitForRun } from '../helpers/runs.js';

/**
 * The app's interval: the floor, and of a length no other timer of the process has (the
 * heartbeat's timers are told apart by it). Also the parts' "long" interval, for what must come
 * within it (an answer in time, a failure before any byte): nothing waits for it then.
 */
const HEARTBEAT_MS = 1_009;
/** The parts' short interval, built directly (no other timer of the process has it either). */
const SHORT_MS = 41;
/**
 * Past two short intervals: a comment goes out within two intervals of silence. With room for the
 * event loop's stalls on a busy machine (90–120 ms were seen; 60 ms of room let a late chunk come
 * before its keep-alive).
 */
const SHORT_LATE_MS = 2 * SHORT_MS + 200;
/** Past the app's interval: a first event this late comes after the first keep-alive. */
const LATE_MS = HEARTBEAT_MS + 300;

/** Low, so that a new thread's history can take it past: a start refused after its thread was made. */
const MAX_MESSAGES = 6;

/** The app's warnings and errors: a late stream's failure is one, and must name what its head named. */
const logs = captureLogs('warn');
const ctx = useTestApp(
  { GATEWAY_STREAM_HEARTBEAT_MS: String(HEARTBEAT_MS), MODEL_MAX_RETRIES: '0', MAX_MESSAGES_PER_THREAD: String(MAX_MESSAGES) },
  { logger: logs.logger },
);
const api = apiOf(ctx);
const silent: Logger = pino({ level: 'silent' });

let fake: FakeModelServer;
let baseURL: string;
let client: OpenAI;
let user: TestUser;
/** An agent whose model is fake-chat, as `agent:<id>`. */
let agentModel: string;

/** The heartbeat timers alive in this process (the app runs in it): Timeouts of either interval, from their creation to their clearing. */
const heartbeats = new Set<number>();
const HEARTBEAT_INTERVALS = new Set([HEARTBEAT_MS, SHORT_MS]);
const hook = createHook({
  init(asyncId, type, _trigger, resource) {
    if (type === 'Timeout' && HEARTBEAT_INTERVALS.has((resource as { _idleTimeout?: number })._idleTimeout ?? -1)) heartbeats.add(asyncId);
  },
  destroy(asyncId) {
    heartbeats.delete(asyncId);
  },
});

const pricing = { input_cost_per_million_tokens: '1', output_cost_per_million_tokens: '2' };

beforeAll(async () => {
  hook.enable();
  fake = await FakeModelServer.start();
  await ctx.app.listen({ host: '127.0.0.1', port: 0 });
  baseURL = `http://127.0.0.1:${(ctx.app.server.address() as AddressInfo).port}/v1`;
  const admin = await superuserHeaders(ctx.app);
  expect((await api('POST', '/providers', admin, { name: 'fake', kind: 'openai-compatible', base_url: fake.url, api_key: 'sk-upstream' })).statusCode).toBe(200);
  for (const model of [{ id: 'fake-chat' }, { id: 'fake-backup' }]) {
    expect((await api('POST', '/models', admin, { ...model, provider: 'fake', capabilities: ['chat'], pricing })).statusCode).toBe(200);
  }
  user = await createUser(ctx.app);
  client = new OpenAI({ apiKey: (await createKey(ctx.app, user)).key, baseURL, maxRetries: 0 });
  agentModel = `agent:${(await createAgent(ctx.app, user.headers, { model: 'fake-chat' })).id}`;
});
afterAll(async () => {
  hook.disable();
  await fake.close();
});
beforeEach(() => {
  fake.reset();
  logs.clear();
});

/** Every heartbeat timer is cleared soon after its stream ended (a leaked one would beat on forever). */
async function noHeartbeatLeft(): Promise<void> {
  await eventually(async () => heartbeats.size === 0, 2_000).catch(() => {
    throw new Error(`${heartbeats.size} heartbeat timer(s) still alive`);
  });
}

/** `work`, or a failure saying `what` did not happen within `ms`. */
async function within<T>(work: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([work, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** Reads a streamed body until it has shown `awaited` (a keep-alive, or the first event); all it read (after `seen`). */
async function readUntil(reader: ReadableStreamDefaultReader<Uint8Array>, awaited: string, seen = ''): Promise<string> {
  const decoder = new TextDecoder();
  while (!seen.includes(awaited)) {
    const { done, value } = await reader.read();
    if (done) throw new Error(`the stream ended before ${awaited}: ${seen}`);
    seen += decoder.decode(value, { stream: true });
  }
  return seen;
}

/** The rest of a streamed body, after `seen`. */
async function readToEnd(reader: ReadableStreamDefaultReader<Uint8Array>, seen: string): Promise<string> {
  const decoder = new TextDecoder();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return seen;
    seen += decoder.decode(value, { stream: true });
  }
}

/** A body's whole text. */
async function textOf(body: Readable): Promise<string> {
  let text = '';
  for await (const piece of body) text += String(piece);
  return text;
}

/** The data events of a stream's text, parsed (`[DONE]` as the string). */
const dataEvents = (text: string) =>
  text
    .split('\n\n')
    .filter((event) => event.startsWith('data: '))
    .map((event) => (event === 'data: [DONE]' ? '[DONE]' : (JSON.parse(event.slice(6)) as Record<string, unknown>)));

type Chunk = { id: string; model: string; choices: { delta: { content?: string } }[]; usage?: unknown };
const chunksOf = (text: string) => dataEvents(text).filter((event): event is Chunk => event !== '[DONE]');
const contentOf = (text: string) => chunksOf(text).map((chunk) => chunk.choices[0]?.delta.content ?? '').join('');

/** A stream's text holds a keep-alive between two of its data events (not only before the first). */
const keptAliveBetween = (text: string) => text.slice(text.indexOf('data: ')).split('\n\n').includes(': keep-alive');

/** A late failure's body: keep-alive(s), then the error event alone (no role chunk opens an answer that never came), no `[DONE]`. */
function expectLateError(text: string, code: string): void {
  expect(text.startsWith(KEEP_ALIVE)).toBe(true);
  const events = dataEvents(text);
  expect(events).toHaveLength(1);
  expect((events[0] as { error: Record<string, unknown> }).error).toMatchObject({ code });
  expect(text).not.toContain('[DONE]');
}

describe('the catalog\'s streams, built with a short interval', () => {
  const records: UsageRecord[] = [];
  const manager = () =>
    fakeModelManager(fake, {
      models: [
        { id: 'fake-chat', provider: 'fake', capabilities: ['chat'], pricing },
        { id: 'fake-backup', provider: 'fake', capabilities: ['chat'], pricing },
        { id: 'fake-primary', provider: 'fake', capabilities: ['chat'], pricing, fallbacks: ['fake-backup'] },
      ],
      records,
      overrides: { maxRetries: 0 },
    });

  /** A stream of `model` as the /v1 route opens it (openStream), with a heartbeat of `heartbeatMs`. */
  const opened = (model: string, heartbeatMs: number) => openStream(manager().stream({ model, messages: [{ role: 'user', content: 'Hi' }] }), model, heartbeatMs);

  /** The body of a stream of `model` as the /v1 route sends it (completionBody), with the usage chunk. */
  async function bodyOf(model: string, heartbeatMs = SHORT_MS): Promise<Readable> {
    const stream = await opened(model, heartbeatMs);
    return completionBody(stream, new CompletionFrames(stream.model, true), silent);
  }

  it('sends keep-alive comments before a late first event and between late events, then the answer as sent', async () => {
    fake.script('fake-chat', { chunks: ['Hello ', 'friend'], chunkDelayMs: SHORT_LATE_MS, usage: { prompt_tokens: 3, completion_tokens: 3 } });
    const stream = await opened('fake-chat', SHORT_MS);
    expect(stream.first).toBeInstanceOf(Promise);
    const text = await textOf(completionBody(stream, new CompletionFrames(stream.model, true), silent));
    expect(text.slice(0, text.indexOf('data: '))).toMatch(/^(: keep-alive\n\n)+$/);
    expect(keptAliveBetween(text)).toBe(true);
    expect(text.endsWith('data: [DONE]\n\n')).toBe(true);
    expect(contentOf(text)).toBe('Hello friend');
    const chunks = chunksOf(text);
    expect(chunks.every((chunk) => chunk.model === 'fake-chat')).toBe(true);
    expect(chunks.at(-1)!.usage).toMatchObject({ prompt_tokens: 3, completion_tokens: 3 });
    await noHeartbeatLeft();
  });

  it('sends none when the events come in time', async () => {
    fake.script('fake-chat', { text: 'Quick answer here' });
    const stream = await opened('fake-chat', HEARTBEAT_MS);
    expect(stream.first).not.toBeInstanceOf(Promise);
    const text = await textOf(completionBody(stream, new CompletionFrames(stream.model, false), silent));
    expect(text.startsWith('data: ')).toBe(true);
    expect(text).not.toContain(': keep-alive');
    expect(contentOf(text)).toBe('Quick answer here');
    await noHeartbeatLeft();
  });

  it('throws a failure within the interval before any byte, to be answered with its own status, and stops the timer', async () => {
    for (const [reply, status] of [
      [{ status: 429, headers: { 'retry-after': '1' } }, 429],
      [{ status: 500 }, 502],
    ] as [ScriptedReply, number][]) {
      fake.reset();
      fake.script('fake-chat', reply);
      const failure = await opened('fake-chat', HEARTBEAT_MS).then(
        () => undefined,
        (error: unknown) => error,
      );
      expect(openAIErrorOf(failure).status).toBe(status);
      await noHeartbeatLeft();
    }
  });

  it('ends with the error event alone when it fails after a keep-alive went out (the 200 has been sent)', async () => {
    fake.script('fake-chat', { status: 500, chunkDelayMs: SHORT_LATE_MS });
    expectLateError(await textOf(await bodyOf('fake-chat')), 'upstream_error');
    await noHeartbeatLeft();
  });

  it('names the model that answered in every chunk when the first event came late from a fallback', async () => {
    fake.script('fake-primary', { status: 500, chunkDelayMs: SHORT_LATE_MS });
    fake.script('fake-backup', { text: 'From the backup' });
    const text = await textOf(await bodyOf('fake-primary'));
    expect(text.startsWith(KEEP_ALIVE)).toBe(true);
    expect(new Set(chunksOf(text).map((chunk) => chunk.model))).toEqual(new Set(['fake-backup']));
    expect(contentOf(text)).toBe('From the backup');
    await noHeartbeatLeft();
  });

  it('clears its timer when the client goes away, before the first event or after it, and closes the upstream request', async () => {
    for (const [reply, awaited] of [
      [{ text: 'never said', chunkDelayMs: 5_000 }, ': keep-alive'],
      [{ text: 'one two three four', chunkDelayMs: SHORT_LATE_MS }, 'data: '],
    ] as [ScriptedReply, string][]) {
      fake.reset();
      fake.script('fake-chat', reply);
      const body = await bodyOf('fake-chat');
      let seen = '';
      for await (const piece of body) {
        seen += String(piece);
        if (seen.includes(awaited)) break; // destroys the body, as a client's going away does
      }
      await eventually(async () => fake.log[0]?.aborted === true);
      await noHeartbeatLeft();
    }
  });
});

describe('the agents\' streams, built with a short interval', () => {
  /** `chunks`, each after a silence of SHORT_LATE_MS; `ended` once returned (its `finally`). */
  function slowly(chunks: string[]) {
    const state = { ended: false };
    const generator = (async function* () {
      try {
        for (const chunk of chunks) {
          await sleep(SHORT_LATE_MS);
          yield chunk;
        }
      } finally {
        state.ended = true;
      }
    })();
    return { generator, state };
  }

  /** A body as the agent route sends it: the first chunk awaited by firstEvent, the rest through keptAlive. */
  async function keptAliveBody(chunks: AsyncGenerator<string>): Promise<Readable> {
    const { first, heartbeat } = await firstEvent(chunks.next(), SHORT_MS);
    async function* all() {
      try {
        for (let next = await first; !next.done; next = await chunks.next()) yield next.value;
      } finally {
        await chunks.return(undefined);
      }
    }
    return keptAlive(all(), heartbeat, first instanceof Promise);
  }

  it('sends keep-alive comments before a late first chunk and between late chunks, and stops the timer at the end', async () => {
    const text = await textOf(await keptAliveBody(slowly(['data: one\n\n', 'data: two\n\n']).generator));
    expect(text.startsWith(KEEP_ALIVE)).toBe(true);
    expect(keptAliveBetween(text)).toBe(true);
    expect(text.replaceAll(KEEP_ALIVE, '')).toBe('data: one\n\ndata: two\n\n');
    await noHeartbeatLeft();
  });

  it('stops the timer and returns the chunks when the client goes away', async () => {
    const { generator, state } = slowly(['data: one\n\n', 'data: two\n\n', 'data: three\n\n']);
    const body = await keptAliveBody(generator);
    for await (const piece of body) if (String(piece).includes('data: one')) break;
    await noHeartbeatLeft();
    await eventually(async () => state.ended);
  });

  it('ends with the error event alone when the run\'s start is refused after a keep-alive went out', async () => {
    const refused = (async () => {
      await sleep(SHORT_LATE_MS);
      throw new NotFoundError('Thread not found');
    })();
    const { first, heartbeat } = await firstEvent<OpenedRun>(refused, SHORT_MS);
    expect(first).toBeInstanceOf(Promise);
    const ids = { runId: randomUUID(), threadId: randomUUID(), started: false };
    expectLateError(await textOf(keptAlive(agentCompletionChunks(first, ids, 'agent:x', false, silent), heartbeat, true)), 'not_found');
    await noHeartbeatLeft();
  });
});

/** A streamed completion as raw HTTP: its status, its headers and its body's text. */
async function rawStream(body: Record<string, unknown> = {}): Promise<{ status: number; headers: Headers; text: string }> {
  const response = await fetch(`${baseURL}/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true, ...body }),
  });
  return { status: response.status, headers: response.headers, text: await response.text() };
}

/** A model silent for LATE_MS (its own comments, which the model manager does not pass on), then its answer at once. */
const lateAnswer: ScriptedReply = { chunks: ['Hello ', 'friend'], comments: { everyMs: 250, forMs: LATE_MS }, usage: { prompt_tokens: 3, completion_tokens: 3 } };

describe('through the app, at the floor', () => {
  it('a late answer and a late failure: keep-alive comments, then what the openai package reads as sent', async () => {
    fake.script('fake-chat', lateAnswer, lateAnswer);
    fake.script('fake-backup', { status: 500, chunkDelayMs: LATE_MS });
    const readAnswer = async () => {
      const stream = await client.chat.completions.create({ model: 'fake-chat', messages: [{ role: 'user', content: 'Hi' }], stream: true, stream_options: { include_usage: true } });
      const chunks: OpenAI.ChatCompletionChunk[] = [];
      for await (const chunk of stream) chunks.push(chunk);
      return chunks;
    };
    const readFailure = async () => {
      const stream = await client.chat.completions.create({ model: 'fake-backup', messages: [{ role: 'user', content: 'Hi' }], stream: true });
      const read: OpenAI.ChatCompletionChunk[] = [];
      const failed = await apiError((async () => {
        for await (const chunk of stream) read.push(chunk);
      })());
      return { failed, read };
    };
    // At once: the three wait out the same silence.
    const [raw, chunks, { failed, read }] = await Promise.all([rawStream(), readAnswer(), readFailure()]);

    expect(raw.status).toBe(200);
    expect(raw.text.slice(0, raw.text.indexOf('data: '))).toMatch(/^(: keep-alive\n\n)+$/);
    expect(raw.text.endsWith('data: [DONE]\n\n')).toBe(true);
    expect(contentOf(raw.text)).toBe('Hello friend');

    expect(chunks.map((chunk) => chunk.choices[0]?.delta.content ?? '').join('')).toBe('Hello friend');
    expect(chunks.every((chunk) => chunk.model === 'fake-chat' && chunk.object === 'chat.completion.chunk')).toBe(true);
    expect(chunks.at(-1)!.usage).toMatchObject({ prompt_tokens: 3, completion_tokens: 3 });

    // The error event alone raises on the first read, as an HTTP error does.
    expect(failed.error).toMatchObject({ type: 'server_error', code: 'upstream_error' });
    expect(read).toEqual([]);
    await noHeartbeatLeft();
  });

  it('an agent stream whose run is silent: keep-alive comments after the run\'s headers, then its answer', async () => {
    fake.script('fake-chat', lateAnswer);
    const { status, headers, text } = await rawStream({ model: agentModel });
    expect(status).toBe(200);
    const runId = headers.get('x-keel-run-id');
    expect(runId).toMatch(UUID);
    expect(text.slice(0, text.indexOf('data: '))).toMatch(/^(: keep-alive\n\n)+$/);
    expect(text.endsWith('data: [DONE]\n\n')).toBe(true);
    expect(contentOf(text)).toBe('Hello friend');
    expect(new Set(chunksOf(text).map((chunk) => `${chunk.id} ${chunk.model}`))).toEqual(new Set([`chatcmpl-${runId} ${agentModel}`]));
    await noHeartbeatLeft();
  });

  it('an agent stream answered within the interval has no keep-alive; one whose run fails before its first text answers its own HTTP status', async () => {
    fake.script('fake-chat', { text: 'Quick answer here' });
    const quick = await rawStream({ model: agentModel });
    expect(quick.status).toBe(200);
    expect(quick.text.startsWith('data: ')).toBe(true);
    expect(quick.text).not.toContain(': keep-alive');
    expect(contentOf(quick.text)).toBe('Quick answer here');

    // The model refuses the run's key: the run fails at once.
    fake.script('fake-chat', { status: 401 });
    const failed = await rawStream({ model: agentModel });
    expect(failed.status).toBe(500);
    expect(failed.text).not.toContain('keep-alive');
    expect(JSON.parse(failed.text)).toMatchObject({ error: { type: 'server_error', code: 'agent_run_failed' } });
    expect(failed.headers.get('x-keel-run-id')).toMatch(UUID);
    await noHeartbeatLeft();
  });

  describe('an agent stream whose run waits to be inserted', () => {
    let threadId: string;
    beforeEach(async () => {
      threadId = (await createThread(ctx.app, user.headers)).id;
      // The key's first use is written down (and drops it from the key cache), the second caches it
      // as used: the stream sent under the lock then reads nothing of its key or user from the
      // database, which (PGlite: its one session) waits behind the test's transaction. Warmed here,
      // right before the lock, not once for the file: those caches forget in 30 s, and a slow
      // machine reached these tests later than that.
      await client.models.list();
      await client.models.list();
    });

    /** A stream's request (besides its model and `stream`), and the row whose lock holds its start back. */
    interface HeldStart {
      body: { messages: { role: string; content: string }[]; metadata?: Record<string, string> };
      lock: { table: 'threads' | 'users'; id: string };
    }

    /** A start on the test's thread, held by the thread's row: on the server the start's `UPDATE threads` waits for it. */
    const onThread = (): HeldStart => ({ body: { messages: [{ role: 'user', content: 'Hi' }], metadata: { thread_id: threadId } }, lock: { table: 'threads', id: threadId } });

    /**
     * A start on a new thread that `messages` begin, held by the caller's row: on the server the
     * new thread's insert waits for it (the thread limit's lock), so nothing of the start is written
     * before the commit.
     */
    const onNewThread = (messages: HeldStart['body']['messages']): HeldStart => ({ body: { messages }, lock: { table: 'users', id: user.user.id } });

    /**
     * Sends `start`'s stream while a transaction of the test's holds its row (embedded, PGlite runs
     * one session at a time, so every statement of the start waits), and reads it up to its first
     * keep-alive, which must come while the run cannot have been inserted; then `meanwhile` (in the
     * transaction, with the response whose head went out), and the commit that lets the start go on.
     * The answer's response, its reader and what was read.
     */
    async function startWhileLocked(start: HeldStart, meanwhile: (session: SqlSession, abort: () => void, response: Response) => Promise<void> = async () => {}) {
      const controller = new AbortController();
      return ctx.database.withSession(async (session) => {
        await session.exec('begin');
        try {
          await session.query(`select id from ${start.lock.table} where id = $1 for update`, [start.lock.id]);
          const sent = fetch(`${baseURL}/chat/completions`, {
            method: 'POST',
            headers: { authorization: `Bearer ${client.apiKey}`, 'content-type': 'application/json' },
            body: JSON.stringify({ model: agentModel, stream: true, ...start.body }),
            signal: controller.signal,
          });
          const waited = 3 * HEARTBEAT_MS;
          const response = await within(sent, waited, 'no answer while the run waited to be inserted');
          const reader = (response.body as ReadableStream<Uint8Array>).getReader();
          const seen = await within(readUntil(reader, ': keep-alive'), waited, 'no keep-alive while the run waited to be inserted');
          await meanwhile(session, () => controller.abort(), response);
          return { response, reader, seen };
        } catch (error) {
          controller.abort();
          throw error;
        } finally {
          await session.exec('commit');
        }
      });
    }

    /** The thread's runs, newest first. */
    const runsOfThread = async (id = threadId) => (await api('GET', `/threads/${id}/runs`, user.headers)).json<{ data: { id: string; status: string }[] }>().data;

    /** How many threads the caller has. */
    const threadCount = async () => (await api('GET', '/threads', user.headers)).json<ListBody<unknown>>().count;

    /**
     * A late start's refusal is logged once for its request (x-request-id), as a warning, with the
     * status it answered and the run and thread its head named, saying that they were never made:
     * what the client has to ask about it, and what an operator finds no row for.
     */
    function expectRefusalLogged(response: Response, status: number): void {
      const lines = logs.lines().filter((line) => line.reqId === response.headers.get('x-request-id'));
      expect(lines).toEqual([
        expect.objectContaining({
          level: LEVEL.warn,
          status,
          model: agentModel,
          runId: response.headers.get('x-keel-run-id'),
          threadId: response.headers.get('x-keel-thread-id'),
          runMade: false,
          msg: expect.stringMatching(/never made/) as unknown,
        }),
      ]);
    }

    it('sends keep-alive comments before the run exists, then its answer; its headers, chosen before the insert, name the run and thread made', async () => {
      fake.script('fake-chat', { text: 'Hello there friend' });
      const { response, reader, seen } = await startWhileLocked(onThread());
      const text = await readToEnd(reader, seen);
      expect(response.status).toBe(200);
      expect(text.slice(0, text.indexOf('data: '))).toMatch(/^(: keep-alive\n\n)+$/);
      expect(text.endsWith('data: [DONE]\n\n')).toBe(true);
      expect(contentOf(text)).toBe('Hello there friend');
      const [run] = await runsOfThread();
      expect(response.headers.get('x-keel-run-id')).toBe(run!.id);
      expect(response.headers.get('x-keel-thread-id')).toBe(threadId);
      expect((await api('GET', `/runs/${run!.id}`, user.headers)).json()).toMatchObject({ id: run!.id, thread_id: threadId });
      expect(new Set(chunksOf(text).map((chunk) => chunk.id))).toEqual(new Set([`chatcmpl-${run!.id}`]));
      expect(new Set(chunksOf(text).map((chunk) => chunk.model))).toEqual(new Set([agentModel]));
      await noHeartbeatLeft();
    });

    it('ends with the error event alone when the start is refused after a keep-alive went out (the thread deleted meanwhile), under the ids of a run never made in its headers and its log line', async () => {
      const { response, reader, seen } = await startWhileLocked(onThread(), async (session) => {
        await session.query('delete from threads where id = $1', [threadId]);
      });
      expectLateError(await readToEnd(reader, seen), 'not_found');
      expect(response.headers.get('x-keel-thread-id')).toBe(threadId);
      const runId = response.headers.get('x-keel-run-id');
      expect(runId).toMatch(UUID);
      expect((await api('GET', `/runs/${runId}`, user.headers)).statusCode).toBe(404);
      expectRefusalLogged(response, 404);
      await noHeartbeatLeft();
    });

    it('a run made after a keep-alive went out whose model call then fails is logged as that run\'s failure, not as a start refused', async () => {
      fake.script('fake-chat', { status: 401 });
      const { response, reader, seen } = await startWhileLocked(onThread());
      const events = dataEvents(await readToEnd(reader, seen));
      expect(events).toHaveLength(1);
      expect(events[0]).toHaveProperty('error');
      const runId = response.headers.get('x-keel-run-id');
      const run = await api('GET', `/runs/${runId}`, user.headers);
      expect(run.statusCode).toBe(200);
      expect(run.json<{ status: string }>().status).toBe('failed');
      const lines = logs.lines().filter((line) => line.reqId === response.headers.get('x-request-id'));
      expect(lines).toEqual([expect.objectContaining({ runId, threadId: response.headers.get('x-keel-thread-id'), msg: expect.stringMatching(/stream/) as unknown })]);
      expect(lines[0]).not.toHaveProperty('runMade');
      expect(String(lines[0]!.msg)).not.toMatch(/never made/);
      await noHeartbeatLeft();
    });

    it('on a new thread: its headers, sent before the thread exists, name the caller\'s thread made, which holds the run and the messages', async () => {
      fake.script('fake-chat', { text: 'Hello there friend' });
      const messages = [
        { role: 'user', content: 'Earlier' },
        { role: 'assistant', content: 'Noted' },
        { role: 'user', content: 'Hi' },
      ];
      const { response, reader, seen } = await startWhileLocked(onNewThread(messages), async (session, _abort, head) => {
        // The head names the thread before its insert: the id is the one it will be made with.
        expect(await session.query('select id from threads where id = $1', [head.headers.get('x-keel-thread-id')])).toEqual([]);
      });
      const text = await readToEnd(reader, seen);
      expect(response.status).toBe(200);
      expect(text.slice(0, text.indexOf('data: '))).toMatch(/^(: keep-alive\n\n)+$/);
      expect(contentOf(text)).toBe('Hello there friend');
      const newThreadId = response.headers.get('x-keel-thread-id')!;
      const runId = response.headers.get('x-keel-run-id')!;
      expect(newThreadId).toMatch(UUID);
      expect(new Set(chunksOf(text).map((chunk) => chunk.id))).toEqual(new Set([`chatcmpl-${runId}`]));

      const thread = await api('GET', `/threads/${newThreadId}`, user.headers);
      expect(thread.statusCode).toBe(200);
      expect(thread.json()).toMatchObject({ id: newThreadId, owner_id: user.user.id, title: 'Earlier' });
      expect(await waitForRun(ctx.app, user.headers, runId, ['completed'])).toMatchObject({ thread_id: newThreadId });
      expect((await runsOfThread(newThreadId)).map((run) => run.id)).toEqual([runId]);
      const written = (await api('GET', `/threads/${newThreadId}/messages`, user.headers)).json<ListBody<{ role: string; content: string; run_id: string | null }>>().data;
      expect(written.map(({ role, content }) => ({ role, content }))).toEqual([...messages, { role: 'assistant', content: 'Hello there friend' }]);
      expect(written.at(-1)!.run_id).toBe(runId);
      await noHeartbeatLeft();
    });

    it('on a new thread, a start refused after a keep-alive went out (the history past MAX_MESSAGES_PER_THREAD) leaves neither the thread nor the run its headers name', async () => {
      const before = await threadCount();
      const history = Array.from({ length: MAX_MESSAGES }, (_, i) => ({ role: i % 2 ? 'assistant' : 'user', content: `turn ${i}` }));
      const { response, reader, seen } = await startWhileLocked(onNewThread([...history, { role: 'user', content: 'Hi' }]));
      expectLateError(await readToEnd(reader, seen), 'conflict');
      const newThreadId = response.headers.get('x-keel-thread-id');
      expect(newThreadId).toMatch(UUID);
      // Made for the run, then deleted with its refusal, before the error event went out.
      expect((await api('GET', `/threads/${newThreadId}`, user.headers)).statusCode).toBe(404);
      expect((await api('GET', `/runs/${response.headers.get('x-keel-run-id')}`, user.headers)).statusCode).toBe(404);
      expect(await threadCount()).toBe(before);
      expectRefusalLogged(response, 409);
      await noHeartbeatLeft();
    });

    it('stops its timer when the client goes away while the run waits, and cancels the run once it exists', async () => {
      fake.script('fake-chat', { text: 'never read', chunkDelayMs: 5_000 });
      await startWhileLocked(onThread(), async (_session, abort) => {
        abort();
        // Stopped while the start still waits for the lock.
        await noHeartbeatLeft();
      });
      await eventually(async () => (await runsOfThread()).length === 1);
      const [run] = await runsOfThread();
      await waitForRun(ctx.app, user.headers, run!.id, ['cancelled']);
    });
  });
});
