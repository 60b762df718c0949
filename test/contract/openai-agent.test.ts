/**
 * `agent:<agent_id>` models on the OpenAI-compatible surface, as the official `openai` package sees
 * them against a live Keel server: the agent runs on a thread (a new one, or `metadata.thread_id`),
 * its model calls go to the fake model server, and the answer comes back as OpenAI completions.
 */
import type { AddressInfo } from 'node:net';

import { eq } from 'drizzle-orm';
import OpenAI from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';

import { apiKeys, runs } from '../../src/models/index.js';

import { runCrud } from '../../src/crud/run.js';
import { RunBusUnavailableError } from '../../src/modules/agents/run-bus-errors.js';
import { READ_OUTAGE_GRACE_MS } from '../../src/services/agent-completions.js';
import { useTestApp } from '../helpers/app.js';
import { createProject, createUser, superuserHeaders, type TestUser } from '../helpers/factories.js';
import { FakeModelServer } from '../helpers/fake-model-server.js';
import { apiOf, createKey, sleep } from '../helpers/http.js';
import { captureLogs, LEVEL } from '../helpers/logs.js';
import { addFakeModels } from '../helpers/metered-models.js';
import { apiError } from '../helpers/openai.js';
import { createAgent, createThread, getRun, type RunBody, waitForRun } from '../helpers/runs.js';

/** What the test's knowledge_search implementation was asked. */
const searches: unknown[] = [];
const logs = captureLogs('warn');
const ctx = useTestApp(
  { MODEL_MAX_RETRIES: '0', MODEL_RETRY_MAX_WAIT_MS: '50', MODEL_TIMEOUT_MS: '30000' },
  {
    logger: logs.logger,
    tools: {
      knowledge_search: async (input) => {
        searches.push(input);
        return { passages: [{ text: 'Keel ships on Tuesdays.', source: 'handbook.md' }] };
      },
    },
  },
);
const api = apiOf(ctx);

let fake: FakeModelServer;
let baseURL: string;
let owner: TestUser;
let client: OpenAI;
let agentModel: string;

/** A client with no retries of its own (unless given): what happens is what one request did. */
const clientWith = (apiKey: string, maxRetries = 0) => new OpenAI({ apiKey, baseURL, maxRetries });

const ask = (content: string): OpenAI.ChatCompletionMessageParam[] => [{ role: 'user', content }];

async function threadMessages(headers: Record<string, string>, threadId: string): Promise<{ role: string; content: string; run_id: string | null }[]> {
  const response = await api('GET', `/threads/${threadId}/messages?limit=100`, headers);
  expect(response.statusCode, response.body).toBe(200);
  return response.json<{ data: { role: string; content: string; run_id: string | null }[] }>().data;
}

/** What the model was sent, as role/content pairs. */
const sentMessages = (request: { body: Record<string, unknown> } | undefined) => (request!.body.messages as { role: string; content: unknown }[]).map(({ role, content }) => ({ role, content }));

async function collect(stream: AsyncIterable<OpenAI.ChatCompletionChunk>): Promise<OpenAI.ChatCompletionChunk[]> {
  const chunks: OpenAI.ChatCompletionChunk[] = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

const textOf = (chunks: OpenAI.ChatCompletionChunk[]) => chunks.map((c) => c.choices[0]?.delta.content ?? '').join('');

beforeAll(async () => {
  fake = await FakeModelServer.start();
  await ctx.app.listen({ host: '127.0.0.1', port: 0 });
  baseURL = `http://127.0.0.1:${(ctx.app.server.address() as AddressInfo).port}/v1`;
  await addFakeModels(ctx.app, await superuserHeaders(ctx.app), fake.url);
  owner = await createUser(ctx.app);
  client = clientWith((await createKey(ctx.app, owner)).key);
  agentModel = `agent:${(await createAgent(ctx.app, owner.headers, { name: 'Helper' })).id}`;
});
afterAll(async () => {
  await fake?.close();
});
beforeEach(() => {
  fake.reset();
  searches.length = 0;
  logs.clear();
});

/** The warn and error lines logged for one request (by its x-request-id). */
const linesOf = (reqId: string | null) => logs.lines().filter((line) => line.reqId === reqId);

describe('agents as models', () => {
  it('lists the caller\'s agents as agent:<id> (owned_by keel-agent) and retrieves them; another user\'s agent is model_not_found', async () => {
    const ids: string[] = [];
    for await (const model of client.models.list()) ids.push(model.id);
    expect(ids).toContain(agentModel);
    expect(ids).toContain('fake-precise'); // the catalog is still listed

    const model = await client.models.retrieve(agentModel);
    expect(model).toMatchObject({ id: agentModel, object: 'model', owned_by: 'keel-agent' });
    expect(model.created).toBeGreaterThan(1_700_000_000);

    const stranger = await createUser(ctx.app);
    const strangerClient = clientWith((await createKey(ctx.app, stranger)).key);
    const theirs: string[] = [];
    for await (const m of strangerClient.models.list()) theirs.push(m.id);
    expect(theirs.filter((id) => id.startsWith('agent:'))).toEqual([]);
    for (const id of [agentModel, 'agent:not-a-uuid', 'agent:']) {
      const error = await apiError(strangerClient.models.retrieve(id));
      expect(error, id).toBeInstanceOf(OpenAI.NotFoundError);
      expect(error.code).toBe('model_not_found');
    }
  });

  it('takes the agent id in capitals, as every other route takes a UUID: the same agent, named in lower case', async () => {
    const shouted = `agent:${agentModel.slice('agent:'.length).toUpperCase()}`;
    expect(await client.models.retrieve(shouted)).toMatchObject({ id: agentModel, owned_by: 'keel-agent' });
    const completion = await client.chat.completions.create({ model: shouted, messages: ask('Hi') });
    expect(completion.choices[0]!.message.content).toBe('Hello from the fake model.');
  });
});

describe('a project-scoped key', () => {
  it('sees its project\'s agents and the unassigned ones, and its agent runs on a thread in its project', async () => {
    const user = await createUser(ctx.app);
    const [mine, other] = [await createProject(ctx.app, user.headers, 'Mine'), await createProject(ctx.app, user.headers, 'Other')];
    const inProject = `agent:${(await createAgent(ctx.app, user.headers, { project_id: mine.id })).id}`;
    const unassigned = `agent:${(await createAgent(ctx.app, user.headers)).id}`;
    const elsewhere = `agent:${(await createAgent(ctx.app, user.headers, { project_id: other.id })).id}`;
    const scoped = clientWith((await createKey(ctx.app, user, { name: 'scoped', project_id: mine.id })).key);
    const ids: string[] = [];
    for await (const model of scoped.models.list()) ids.push(model.id);
    expect(ids.filter((id) => id.startsWith('agent:')).sort()).toEqual([inProject, unassigned].sort());
    expect(await apiError(scoped.chat.completions.create({ model: elsewhere, messages: ask('Hi') }))).toMatchObject({ status: 404, code: 'model_not_found' });

    const completion = await scoped.chat.completions.create({ model: inProject, messages: ask('Hi') });
    const threadId = (completion as unknown as { metadata: { thread_id: string } }).metadata.thread_id;
    expect((await api('GET', `/threads/${threadId}`, user.headers)).json()).toMatchObject({ project_id: mine.id });
  });
});

describe('chat completions with an agent', () => {
  it('answers non-stream with the agent\'s final text, the run\'s usage, and where the run is', async () => {
    fake.script('fake-precise', { text: 'Four.', usage: { prompt_tokens: 12, completion_tokens: 3, cached_tokens: 2 } });
    const { data: completion, response } = await client.chat.completions.create({ model: agentModel, messages: ask('What is 2+2?'), temperature: 1.5 }).withResponse();
    expect(completion).toMatchObject({
      object: 'chat.completion',
      model: agentModel,
      choices: [{ index: 0, message: { role: 'assistant', content: 'Four.' }, finish_reason: 'stop' }],
      usage: { prompt_tokens: 12, completion_tokens: 3, total_tokens: 15, prompt_tokens_details: { cached_tokens: 2 } },
    });
    const { thread_id: threadId, run_id: runId } = (completion as unknown as { metadata: { thread_id: string; run_id: string } }).metadata;
    expect(completion.id).toBe(`chatcmpl-${runId}`);
    expect(response.headers.get('x-keel-run-id')).toBe(runId);
    expect(response.headers.get('x-keel-thread-id')).toBe(threadId);

    const run = await getRun(ctx.app, owner.headers, runId);
    expect(run).toMatchObject({ status: 'completed', thread_id: threadId, steps: 1, input: 'What is 2+2?' });
    // The agent's own prompt and settings: the request's temperature is not the agent's.
    const [sent] = fake.requestsFor('fake-precise');
    expect(sentMessages(sent)).toEqual([
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'What is 2+2?' },
    ]);
    expect(sent!.body.temperature).toBeUndefined();
    expect(await threadMessages(owner.headers, threadId)).toMatchObject([
      { role: 'user', content: 'What is 2+2?', run_id: null },
      { role: 'assistant', content: 'Four.', run_id: runId },
    ]);
  });

  it('streams chunk by chunk with include_usage, assembling the same text as the non-stream answer', async () => {
    const reply = { chunks: ['The ', 'answer ', 'is ', 'four.'], usage: { prompt_tokens: 9, completion_tokens: 4 } };
    fake.script('fake-precise', reply, reply);
    const plain = await client.chat.completions.create({ model: agentModel, messages: ask('Again?') });

    const { data: stream, response } = await client.chat.completions.create({ model: agentModel, messages: ask('Again?'), stream: true, stream_options: { include_usage: true } }).withResponse();
    const chunks = await collect(stream);
    const runId = response.headers.get('x-keel-run-id')!;
    expect(response.headers.get('content-type')).toMatch(/^text\/event-stream/);
    expect(chunks[0]!.choices[0]!.delta.role).toBe('assistant');
    expect(textOf(chunks)).toBe('The answer is four.');
    expect(textOf(chunks)).toBe(plain.choices[0]!.message.content);
    expect(chunks.filter((c) => c.choices[0]?.delta.content).length).toBeGreaterThanOrEqual(2); // it streamed
    expect(chunks.find((c) => c.choices[0]?.finish_reason)!.choices[0]!.finish_reason).toBe('stop');
    const last = chunks.at(-1)!;
    expect(last.choices).toEqual([]);
    expect(last.usage).toMatchObject({ prompt_tokens: 9, completion_tokens: 4, total_tokens: 13 });
    expect(chunks.slice(0, -1).every((c) => c.usage === null)).toBe(true);
    expect(new Set(chunks.map((c) => c.id))).toEqual(new Set([`chatcmpl-${runId}`]));
    expect(chunks.every((c) => c.model === agentModel)).toBe(true);
    expect((await getRun(ctx.app, owner.headers, runId)).status).toBe('completed');

    // Without include_usage: no usage chunk and no usage field.
    const bare = await collect(await client.chat.completions.create({ model: agentModel, messages: ask('Hi'), stream: true }));
    expect(bare.every((c) => c.choices.length === 1 && c.usage === undefined)).toBe(true);
    expect(textOf(bare)).toBe('Hello from the fake model.');
  });

  it('starts a new thread with the earlier user and assistant messages; metadata.thread_id goes on with the thread\'s history', async () => {
    fake.script('fake-precise', { text: 'Your name is Ada.' }, { text: 'Ada has 3 letters.' });
    const first = await client.chat.completions.create({
      model: agentModel,
      messages: [
        { role: 'user', content: 'My name is Ada.' },
        { role: 'assistant', content: 'Hello Ada.' },
        { role: 'user', content: [{ type: 'text', text: 'What is ' }, { type: 'text', text: 'my name?' }] },
      ],
    });
    const threadId = (first as unknown as { metadata: { thread_id: string } }).metadata.thread_id;
    const thread = await api('GET', `/threads/${threadId}`, owner.headers);
    expect(thread.json()).toMatchObject({ title: 'My name is Ada.', status: 'idle' });

    // A client that names the thread sends the next message; earlier ones in the request are not written again.
    const second = await client.chat.completions.create({
      model: agentModel,
      messages: [{ role: 'user', content: 'Not written: the thread has the history.' }, ...ask('How long is my name?')],
      metadata: { thread_id: threadId },
    });
    expect(second.choices[0]!.message.content).toBe('Ada has 3 letters.');
    expect((second as unknown as { metadata: { thread_id: string } }).metadata.thread_id).toBe(threadId);
    const [, continued] = fake.requestsFor('fake-precise');
    expect(sentMessages(continued)).toEqual([
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'My name is Ada.' },
      { role: 'assistant', content: 'Hello Ada.' },
      { role: 'user', content: 'What is my name?' },
      { role: 'assistant', content: 'Your name is Ada.' },
      { role: 'user', content: 'How long is my name?' },
    ]);
    expect((await threadMessages(owner.headers, threadId)).map((m) => m.content)).toEqual(['My name is Ada.', 'Hello Ada.', 'What is my name?', 'Your name is Ada.', 'How long is my name?', 'Ada has 3 letters.']);
  });

  it('starts a thread with a long history (more turns than one statement can take as parameters) in order', async () => {
    fake.script('fake-precise', { text: 'Read it all.' });
    const turns = 12_000;
    const history: OpenAI.ChatCompletionMessageParam[] = Array.from({ length: turns }, (_, i) => ({ role: i % 2 ? 'assistant' : 'user', content: `turn ${i}` }));
    const completion = await client.chat.completions.create({ model: agentModel, messages: [...history, ...ask('And now?')] });
    expect(completion.choices[0]!.message.content).toBe('Read it all.');
    const threadId = (completion as unknown as { metadata: { thread_id: string } }).metadata.thread_id;
    const tail = await api('GET', `/threads/${threadId}/messages?limit=3&offset=${turns - 1}`, owner.headers);
    expect(tail.json<{ count: number }>().count).toBe(turns + 2);
    expect(tail.json<{ data: { content: string }[] }>().data.map((m) => m.content)).toEqual([`turn ${turns - 1}`, 'And now?', 'Read it all.']);
    expect(sentMessages(fake.requestsFor('fake-precise')[0]).length).toBe(turns + 2);
  });

  it('titles a new thread with the first user message cut at 80 characters, never inside an emoji', async () => {
    fake.script('fake-precise', { text: 'Noted.' });
    const first = `${'a'.repeat(79)}😀 and more`;
    const completion = await client.chat.completions.create({ model: agentModel, messages: ask(first) });
    const threadId = (completion as unknown as { metadata: { thread_id: string } }).metadata.thread_id;
    const thread = await api('GET', `/threads/${threadId}`, owner.headers);
    expect(thread.json<{ title: string }>().title).toBe(`${'a'.repeat(79)}😀`);
  });

  it('runs the agent\'s tool round and answers once: the streamed text equals the non-stream answer', async () => {
    const tooled = `agent:${(await createAgent(ctx.app, owner.headers, { name: 'Searcher', tools: ['knowledge_search'] })).id}`;
    const round = [
      { text: 'Let me check. ', toolCalls: [{ id: 'call_1', name: 'knowledge_search', arguments: '{"query":"release day"}' }], usage: { prompt_tokens: 20, completion_tokens: 6 } },
      { text: 'Keel ships on Tuesdays.', usage: { prompt_tokens: 40, completion_tokens: 5 } },
    ];
    fake.script('fake-precise', ...round, ...round);
    const completion = await client.chat.completions.create({ model: tooled, messages: ask('When does Keel ship?') });
    expect(completion.choices).toHaveLength(1);
    expect(completion.choices[0]!.message).toMatchObject({ role: 'assistant', content: 'Let me check. \n\nKeel ships on Tuesdays.' });
    expect(completion.choices[0]!.message.tool_calls).toBeUndefined();
    expect(completion.choices[0]!.finish_reason).toBe('stop');
    expect(completion.usage).toMatchObject({ prompt_tokens: 60, completion_tokens: 11, total_tokens: 71 });
    expect(searches).toEqual([{ query: 'release day' }]);
    const [, answered] = fake.requestsFor('fake-precise');
    expect((answered!.body.messages as { role: string; content: unknown }[]).at(-1)).toMatchObject({ role: 'tool', tool_call_id: 'call_1' });
    const runId = (completion as unknown as { metadata: { run_id: string } }).metadata.run_id;
    expect((await getRun(ctx.app, owner.headers, runId)).steps).toBe(2);

    const chunks = await collect(await client.chat.completions.create({ model: tooled, messages: ask('When does Keel ship?'), stream: true }));
    expect(textOf(chunks)).toBe(completion.choices[0]!.message.content);
    expect(chunks.some((c) => c.choices[0]?.delta.tool_calls)).toBe(false);
  });
});

describe('what an agent model refuses', () => {
  it('answers another user\'s agent or thread with 404, before anything runs', async () => {
    const stranger = await createUser(ctx.app);
    const theirAgent = `agent:${(await createAgent(ctx.app, stranger.headers)).id}`;
    const theirThread = await createThread(ctx.app, stranger.headers);
    const notMine = await apiError(client.chat.completions.create({ model: theirAgent, messages: ask('Hi') }));
    expect(notMine).toBeInstanceOf(OpenAI.NotFoundError);
    expect(notMine.error).toEqual({ message: `The model \`${theirAgent}\` does not exist or you do not have access to it.`, type: 'invalid_request_error', param: null, code: 'model_not_found' });
    const stream = await apiError(client.chat.completions.create({ model: theirAgent, messages: ask('Hi'), stream: true }));
    expect(stream).toMatchObject({ status: 404, code: 'model_not_found' });

    const otherThread = await apiError(client.chat.completions.create({ model: agentModel, messages: ask('Hi'), metadata: { thread_id: theirThread.id } }));
    expect(otherThread).toBeInstanceOf(OpenAI.NotFoundError);
    expect(otherThread.message).toMatch(/Thread not found/);
    const badThread = await apiError(client.chat.completions.create({ model: agentModel, messages: ask('Hi'), metadata: { thread_id: 'thread-1' } }));
    expect(badThread).toMatchObject({ status: 400, param: 'metadata.thread_id' });
    expect((await threadMessages(stranger.headers, theirThread.id)).length).toBe(0);
    expect(fake.log).toEqual([]);
  });

  it('refuses system and tool messages, tools, a last message that is not the user\'s, and images: 400 naming the param', async () => {
    const refused: [OpenAI.ChatCompletionCreateParamsNonStreaming, string][] = [
      [{ model: agentModel, messages: [{ role: 'system', content: 'Be rude.' }, ...ask('Hi')] }, 'messages[0].role'],
      [{ model: agentModel, messages: [{ role: 'developer', content: 'Be rude.' }, ...ask('Hi')] }, 'messages[0].role'],
      [{ model: agentModel, messages: ask('Hi'), tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object' } } }] }, 'tools'],
      [{ model: agentModel, messages: ask('Hi'), response_format: { type: 'json_object' } }, 'response_format'],
      [{ model: agentModel, messages: [...ask('Hi'), { role: 'assistant', content: 'Hello.' }] }, 'messages[1].role'],
      [{ model: agentModel, messages: ask('   ') }, 'messages[0].content'],
      // An earlier user turn too: the thread would keep it, and every later run send it.
      [{ model: agentModel, messages: [...ask(' '), ...ask('Hi')] }, 'messages[0].content'],
      [
        {
          model: agentModel,
          messages: [
            ...ask('Hi'),
            { role: 'assistant', content: null, tool_calls: [{ id: 'c1', type: 'function', function: { name: 'f', arguments: '{}' } }] },
            { role: 'tool', tool_call_id: 'c1', content: 'x' },
            ...ask('And?'),
          ],
        },
        'messages[1].tool_calls',
      ],
      [{ model: agentModel, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'https://example.com/a.png' } }] }] }, 'messages[0].content[0]'],
    ];
    for (const [request, param] of refused) {
      const error = await apiError(client.chat.completions.create(request));
      expect(error.status, param).toBe(400);
      expect(error).toMatchObject({ type: 'invalid_request_error', param });
    }
    // Too long for a thread's message (MAX_MESSAGE_CHARS): 400 naming the message.
    const long = await apiError(client.chat.completions.create({ model: agentModel, messages: ask('x'.repeat(ctx.app.settings.MAX_MESSAGE_CHARS + 1)) }));
    expect(long).toMatchObject({ status: 400, param: 'messages[0].content' });
    expect(fake.log).toEqual([]);
  });

  it('refuses half of a surrogate pair in a message (the thread kept it as U+FFFD) with 400 at its content; nothing is written or run; a whole pair goes on', async () => {
    const [high, low] = ['\ud83d', '\ude00'];
    const threadCount = async () => (await api('GET', '/threads', owner.headers)).json<{ count: number }>().count;
    const before = await threadCount();
    const thread = await createThread(ctx.app, owner.headers);
    const refused: [OpenAI.ChatCompletionCreateParamsNonStreaming, string][] = [
      [{ model: agentModel, messages: ask(`hi ${high}`) }, 'messages[0].content'],
      [{ model: agentModel, messages: [{ role: 'user', content: `${low}earlier` }, { role: 'assistant', content: 'Noted.' }, ...ask('Now?')] }, 'messages[0].content'],
      [{ model: agentModel, messages: [...ask('Earlier.'), { role: 'assistant', content: `cut ${high}` }, ...ask('Now?')] }, 'messages[1].content'],
      [{ model: agentModel, messages: [{ role: 'user', content: [{ type: 'text', text: 'in ' }, { type: 'text', text: `parts ${low}` }] }] }, 'messages[0].content'],
      [{ model: agentModel, messages: ask(`on a thread ${high}`), metadata: { thread_id: thread.id } }, 'messages[0].content'],
    ];
    for (const [request, param] of refused) {
      const error = await apiError(client.chat.completions.create(request));
      expect(error.status, param).toBe(400);
      expect(error.error, param).toEqual({
        message: `Invalid value for ${param}: Text holds an unpaired surrogate (half of a UTF-16 surrogate pair, which is no character): send whole characters`,
        type: 'invalid_request_error',
        param,
        code: null,
      });
    }
    expect(await threadMessages(owner.headers, thread.id)).toEqual([]);
    expect(await threadCount()).toBe(before + 1);
    expect(fake.log).toEqual([]);
    // A whole pair (an emoji) is a character like any other.
    fake.script('fake-precise', { text: 'Nice.' });
    await client.chat.completions.create({ model: agentModel, messages: ask(`smile ${high}${low}`), metadata: { thread_id: thread.id } });
    expect((await threadMessages(owner.headers, thread.id)).map((m) => m.content)).toEqual([`smile ${high}${low}`, 'Nice.']);
  });

  it('answers 409 while another run works on the named thread', async () => {
    fake.script('fake-precise', { chunks: ['slow ', 'answer'], chunkDelayMs: 400 });
    const thread = await createThread(ctx.app, owner.headers);
    const busy = client.chat.completions.create({ model: agentModel, messages: ask('First'), metadata: { thread_id: thread.id } });
    await fake.waitFor((log) => log.length === 1);
    const conflict = await apiError(client.chat.completions.create({ model: agentModel, messages: ask('Second'), metadata: { thread_id: thread.id } }));
    expect(conflict).toBeInstanceOf(OpenAI.ConflictError);
    expect(conflict.message).toMatch(/Thread is busy/);
    expect(conflict.headers?.get('x-should-retry')).toBe('false'); // the client would retry a 409 at once
    expect((await busy).choices[0]!.message.content).toBe('slow answer');
    expect((await threadMessages(owner.headers, thread.id)).map((m) => m.content)).toEqual(['First', 'slow answer']);
  });

  it("answers a key past its rpm with 429 before anything is written, as a catalog model does (no thread per refused call); a run's every model call counts", async () => {
    const user = await createUser(ctx.app);
    const tooled = `agent:${(await createAgent(ctx.app, user.headers, { name: 'Searcher', tools: ['knowledge_search'] })).id}`;
    const paced = clientWith((await createKey(ctx.app, user, { name: 'paced', rpm: 1 })).key);
    const threadCount = async () => (await api('GET', '/threads?limit=100', user.headers)).json<{ count: number }>().count;
    // The start only looks at the count: the run's first call is the minute's one; its second is
    // one too many, and fails the run that was written (so the SDK is told not to retry).
    fake.script('fake-precise', { text: 'Let me check. ', toolCalls: [{ id: 'call_1', name: 'knowledge_search', arguments: '{"query":"pace"}' }] });
    const failedRun = await apiError(paced.chat.completions.create({ model: tooled, messages: ask('First') }));
    expect(failedRun.status).toBe(429);
    expect(failedRun.message).toMatch(/API key rate limit reached: rpm 1/);
    expect(failedRun.headers?.get('x-should-retry')).toBe('false');
    expect(fake.requestsFor('fake-precise')).toHaveLength(1);
    expect(await threadCount()).toBe(1);
    // Past the limit, every call (stream or not) is refused before its start writes anything.
    for (const stream of [false, true, false, true, false]) {
      const error = await apiError(paced.chat.completions.create({ model: tooled, messages: ask('Over the limit'), stream }));
      expect(error.status, `stream ${stream}`).toBe(429);
      expect(error.error).toMatchObject({ type: 'requests', code: 'rate_limit_exceeded' });
      expect(error.message).toMatch(/API key rate limit reached: rpm 1/);
      expect(error.headers?.get('retry-after')).toMatch(/^\d+$/);
      // Nothing was written or called: the SDK may retry it once the minute has passed.
      expect(error.headers?.get('x-should-retry')).toBeNull();
    }
    expect(await threadCount()).toBe(1);
    expect(fake.requestsFor('fake-precise')).toHaveLength(1);
  });
});

describe('runs that do not end well', () => {
  it('a run that fails answers 500 agent_run_failed with the run\'s error, and the SDK does not retry it', async () => {
    fake.script('fake-precise', { status: 401 });
    const retrying = clientWith(client.apiKey!, 2);
    const error = await apiError(retrying.chat.completions.create({ model: agentModel, messages: ask('Hi') }));
    expect(error).toBeInstanceOf(OpenAI.InternalServerError);
    expect(error).toMatchObject({ status: 500, type: 'server_error', code: 'agent_run_failed' });
    expect(error.message).toMatch(/The provider rejected the API key for model fake-precise \(401\)/);
    const runId = error.headers!.get('x-keel-run-id')!;
    const failed = await getRun(ctx.app, owner.headers, runId);
    expect(failed.status).toBe('failed');
    expect(failed.error).toMatch(/rejected the API key/);
    expect(fake.log).toHaveLength(1); // one run, one model call: no retry
  });

  it('a run that fails after its first text ends the stream with an error event the SDK raises', async () => {
    fake.script('fake-precise', { chunks: ['a ', 'b ', 'c '], chunkDelayMs: 30, drop: { afterChunks: 2 } });
    const stream = await client.chat.completions.create({ model: agentModel, messages: ask('Hi'), stream: true });
    const texts: string[] = [];
    const error = await apiError(
      (async () => {
        for await (const chunk of stream) texts.push(chunk.choices[0]?.delta.content ?? '');
      })(),
    );
    expect(error.error).toMatchObject({ type: 'server_error', code: 'agent_run_failed' });
    expect(texts.join('')).toMatch(/^a (b )?$/);
  });

  it('logs a stream whose run fails after its first text once, as an error with the request id, the run and the model, never the prompt', async () => {
    const prompt = 'my-private-agent-prompt';
    fake.script('fake-precise', { chunks: ['a ', 'b ', 'c '], chunkDelayMs: 30, drop: { afterChunks: 2 } });
    const { data: stream, response } = await client.chat.completions.create({ model: agentModel, messages: ask(prompt), stream: true }).withResponse();
    const reqId = response.headers.get('x-request-id');
    expect(reqId).toBeTruthy();
    await apiError(
      (async () => {
        for await (const _ of stream);
      })(),
    );
    const failure = expect.objectContaining({
      level: LEVEL.error,
      runId: response.headers.get('x-keel-run-id'),
      threadId: response.headers.get('x-keel-thread-id'),
      model: agentModel,
      status: 500,
      err: expect.objectContaining({ type: 'CodedOpenAIError', message: expect.stringMatching(/could not be reached or failed/) as unknown }) as unknown,
    }) as unknown;
    expect(linesOf(reqId)).toEqual([failure]);
    // The runner logs the provider's failure of a run at info: this is the one error, the one alert.
    expect(logs.lines().filter((line) => Number(line.level) >= LEVEL.error)).toEqual([failure]);
    expect(JSON.stringify(logs.lines())).not.toContain(prompt);
  });

  it('a client that leaves mid-stream cancels the run, and its model call is aborted upstream; the stream\'s end is a warning, not an error', async () => {
    fake.script('fake-precise', { chunks: Array.from({ length: 40 }, (_, i) => `w${i} `), chunkDelayMs: 50 });
    const { data: stream, response } = await client.chat.completions.create({ model: agentModel, messages: ask('A long story'), stream: true }).withResponse();
    let seen = 0;
    for await (const chunk of stream) {
      if (chunk.choices[0]?.delta.content) seen += 1;
      if (seen === 2) break; // leaving the loop aborts the HTTP request
    }
    await fake.waitFor((log) => log[0]?.aborted === true);
    expect(fake.log[0]!.completed).toBe(false);
    expect(fake.log[0]!.chunksSent).toBeLessThan(40);
    const run = await waitForRun(ctx.app, owner.headers, response.headers.get('x-keel-run-id')!, ['cancelled', 'completed', 'failed']);
    expect(run.status).toBe('cancelled');
    const thread = await api('GET', `/threads/${run.thread_id}`, owner.headers);
    expect(thread.json<{ status: string }>().status).toBe('idle');
    // A client going away is no fault of the server's: a warning an error alert does not count.
    expect(linesOf(response.headers.get('x-request-id'))).toEqual([
      expect.objectContaining({ level: LEVEL.warn, runId: run.id, threadId: run.thread_id, status: 499, err: expect.objectContaining({ type: 'CodedOpenAIError', code: 'client_closed_request' }) as unknown }),
    ]);
  });

  it('a client that gives up on a non-stream answer cancels the run too', async () => {
    fake.script('fake-precise', { hang: true });
    const thread = await createThread(ctx.app, owner.headers);
    const controller = new AbortController();
    const waiting = client.chat.completions.create({ model: agentModel, messages: ask('Never answered'), metadata: { thread_id: thread.id } }, { signal: controller.signal });
    await fake.waitFor((log) => log.length === 1);
    controller.abort();
    await expect(waiting).rejects.toThrow();
    await fake.waitFor((log) => log[0]?.aborted === true);
    let run: RunBody | undefined;
    for (let i = 0; i < 100 && run?.status !== 'cancelled'; i++) {
      const runs = await api('GET', `/threads/${thread.id}/runs`, owner.headers);
      run = runs.json<{ data: RunBody[] }>().data[0];
      if (run?.status !== 'cancelled') await sleep(50);
    }
    expect(run!.status).toBe('cancelled');
  });
});

describe('run events that cannot be read (the run bus unreachable)', () => {
  const unreachable = () => new RunBusUnavailableError({ cause: new Error('connect ECONNREFUSED') });

  /**
   * While `work` runs, the app's run event log fails as an unreachable Redis does: its `reachable`
   * check (before a start) when `beforeStart`, and the first `reads` reads of a run's events.
   */
  async function outage<T>({ beforeStart = false, reads = 0 }, work: () => Promise<T>): Promise<T> {
    const events = ctx.app.runs.bus.events;
    const read = events.read.bind(events);
    let failedReads = 0;
    if (beforeStart) events.reachable = () => Promise.reject(unreachable());
    events.read = (runId, after, signal) => {
      if (failedReads >= reads) return read(runId, after, signal);
      failedReads += 1;
      // eslint-disable-next-line require-yield
      return (async function* () {
        throw unreachable();
      })();
    };
    try {
      return await work();
    } finally {
      // Both are the log's own methods again (a log without `reachable`, embedded, has none again).
      for (const patched of ['read', 'reachable']) Reflect.deleteProperty(events, patched);
    }
  }

  it('answers 503 before anything is written when the events cannot be reached: no thread, no run, no model call, however often the SDK retries', async () => {
    const user = await createUser(ctx.app);
    const sdk = clientWith((await createKey(ctx.app, user)).key, 2);
    const model = `agent:${(await createAgent(ctx.app, user.headers)).id}`;
    fake.script('fake-precise', { text: 'never' });
    for (const stream of [false, true]) {
      const error = await outage({ beforeStart: true }, () => apiError(sdk.chat.completions.create({ model, messages: ask('Hi'), stream })));
      expect(error, `stream: ${stream}`).toMatchObject({ status: 503, code: 'service_unavailable' });
      expect(error.headers!.get('x-keel-run-id')).toBeNull();
    }
    expect((await api('GET', '/threads', user.headers)).json<{ count: number }>().count).toBe(0);
    expect(fake.log).toEqual([]);
  });

  /** A new user's SDK client (no retries) and agent model; `runsSince()` gives what lists the runs started after it was asked. */
  async function agentCaller() {
    const user = await createUser(ctx.app);
    const sdk = clientWith((await createKey(ctx.app, user)).key, 0);
    const model = `agent:${(await createAgent(ctx.app, user.headers)).id}`;
    const runsOf = async () => ctx.app.db.select().from(runs).where(eq(runs.owner_id, user.user.id));
    const runsSince = async () => {
      const before = new Set((await runsOf()).map((run) => run.id));
      return async () => (await runsOf()).filter((run) => !before.has(run.id));
    };
    return { sdk, model, runsSince };
  }

  it('reads on through a short outage: a read that failed is made again after the last event seen, and the run it started answers', async () => {
    const { sdk, model, runsSince } = await agentCaller();
    for (const stream of [false, true]) {
      const started = await runsSince();
      fake.reset();
      fake.script('fake-precise', { text: 'answered once' });
      const { content, response } = await outage({ reads: 1 }, async () => {
        if (!stream) {
          const { data, response } = await sdk.chat.completions.create({ model, messages: ask('Hi') }).withResponse();
          return { content: data.choices[0]!.message.content, response };
        }
        const { data, response } = await sdk.chat.completions.create({ model, messages: ask('Hi'), stream: true }).withResponse();
        return { content: textOf(await collect(data)), response };
      });
      expect(content, `stream: ${stream}`).toBe('answered once');
      expect((await started()).map((run) => [run.id, run.status])).toEqual([[response.headers.get('x-keel-run-id'), 'completed']]);
    }
  });

  it('cancels the run it started when its events cannot be read for READ_OUTAGE_GRACE_MS, before answering 503: it does not run on unseen', async () => {
    const { sdk, model, runsSince } = await agentCaller();
    for (const stream of [false, true]) {
      const started = await runsSince();
      fake.reset();
      // Still answering when the reader gives up (as a run whose events cannot be stored would still be going).
      fake.script('fake-precise', { chunks: Array.from({ length: 40 }, (_, i) => `t${i} `), chunkDelayMs: 250 });
      const began = Date.now();
      const error = await outage({ reads: Number.POSITIVE_INFINITY }, () => apiError(sdk.chat.completions.create({ model, messages: ask('Hi'), stream })));
      expect(error, `stream: ${stream}`).toMatchObject({ status: 503, code: 'service_unavailable' });
      expect(Date.now() - began).toBeGreaterThanOrEqual(READ_OUTAGE_GRACE_MS);
      expect((await started()).map((run) => run.status)).toEqual(['cancelled']);
    }
  }, 60_000);
});

describe('a streamed answer whose run is resumed mid-step', () => {
  /**
   * Streams a completion whose run loses its events' store for one append of its first step's
   * deltas (as a Redis blip): the worker hands it back, the sweep resumes it, and the step is redone
   * with the model's second reply. Resolves with what the SDK read (or its error) and the run.
   */
  async function resumedMidStream(redo: string[]) {
    const { RunSweeper } = await import('../../src/modules/agents/run-sweeper.js');
    fake.script('fake-precise', { chunks: ['one ', 'two ', 'three ', 'four ', 'five '], chunkDelayMs: 150 }, { chunks: redo, chunkDelayMs: 20 });
    const events = ctx.app.runs.bus.events;
    const append = events.append.bind(events);
    let deltaAppends = 0;
    events.append = (runId, batch) => {
      if (batch.some((e) => e.event === 'message.delta') && ++deltaAppends === 3) return Promise.reject(new RunBusUnavailableError({ cause: new Error('connect ECONNREFUSED') }));
      return append(runId, batch);
    };
    try {
      const { data, response } = await client.chat.completions.create({ model: agentModel, messages: ask('Count'), stream: true }).withResponse();
      const runId = response.headers.get('x-keel-run-id')!;
      const chunks: OpenAI.ChatCompletionChunk[] = [];
      const read = (async () => {
        for await (const chunk of data) chunks.push(chunk);
      })().then(
        () => undefined,
        (error: unknown) => error,
      );
      // Handed back (#2), then resumed by the sweep on this app's runner.
      await vi.waitFor(async () => expect(await runCrud.getById(ctx.app.db, runId)).toMatchObject({ status: 'running', lease_owner: null }), { timeout: 5_000 });
      Reflect.deleteProperty(events, 'append');
      expect((await new RunSweeper(ctx.app.runs, ctx.app.runs.runner).sweep()).resumed).toBe(1);
      const error = await read;
      return { text: textOf(chunks), error, run: await waitForRun(ctx.app, owner.headers, runId, ['completed', 'failed']) };
    } finally {
      Reflect.deleteProperty(events, 'append');
    }
  }

  it('does not send the text it sent already again: the client reads the thread\'s answer once', async () => {
    const { text, error, run } = await resumedMidStream(['one two ', 'three four five ', 'six']);
    expect(error).toBeUndefined();
    expect(run.status).toBe('completed');
    expect(text).toBe('one two three four five six');
    const assistants = (await threadMessages(owner.headers, run.thread_id)).filter((m) => m.role === 'assistant');
    expect(assistants.map((m) => m.content)).toEqual(['one two three four five six']);
  });

  it('ends the stream with agent_run_resumed when the resumed step says something else; the run goes on to its answer', async () => {
    const { text, error, run } = await resumedMidStream(['uno dos tres']);
    expect(error).toBeInstanceOf(OpenAI.APIError);
    expect((error as InstanceType<typeof OpenAI.APIError>).error).toMatchObject({ code: 'agent_run_resumed' });
    expect(text).toBe('one two ');
    expect(run.status).toBe('completed');
    expect((await threadMessages(owner.headers, run.thread_id)).filter((m) => m.role === 'assistant').map((m) => m.content)).toEqual(['uno dos tres']);
  });
});

describe('with billing on', () => {
  const billed = useTestApp({ BILLING_ENABLED: 'true' });
  let billedURL: string;

  beforeAll(async () => {
    await billed.app.listen({ host: '127.0.0.1', port: 0 });
    billedURL = `http://127.0.0.1:${(billed.app.server.address() as AddressInfo).port}/v1`;
    await addFakeModels(billed.app, await superuserHeaders(billed.app), fake.url);
  });

  it('answers 402 insufficient_quota when the credits cannot cover the first step; no thread, no model call', async () => {
    const broke = await createUser(billed.app);
    const agent = await createAgent(billed.app, broke.headers, { model: 'fake-billed', max_output_tokens: 10 });
    const brokeClient = new OpenAI({ apiKey: (await createKey(billed.app, broke)).key, baseURL: billedURL, maxRetries: 0 });
    for (const stream of [false, true]) {
      const error = await apiError(brokeClient.chat.completions.create({ model: `agent:${agent.id}`, messages: ask('Hi'), stream }));
      expect(error.status).toBe(402);
      expect(error.error).toMatchObject({ type: 'insufficient_quota', code: 'insufficient_quota' });
      expect((error.error as { message: string }).message).toMatch(/^Not enough credits to start this run: available 0; /);
    }
    const threads = await billed.app.inject({ method: 'GET', url: '/api/v1/threads', headers: broke.headers });
    expect(threads.json<{ count: number }>().count).toBe(0);
    expect(fake.log).toEqual([]);
  });

  it("answers a key's rate limit and budget as the plain models do (429 with retry-after, 402), not as a failed run's 500", async () => {
    const admin = await superuserHeaders(billed.app);
    const payer = await createUser(billed.app);
    const granted = await billed.app.inject({ method: 'POST', url: '/api/v1/billing/credits', headers: admin, payload: { user_id: payer.user.id, amount: '1000', description: 'test' } });
    expect(granted.statusCode, granted.body).toBe(200);
    const agent = await createAgent(billed.app, payer.headers, { model: 'fake-billed', max_output_tokens: 10 });
    const clientOf = async (limits: Record<string, unknown>) => new OpenAI({ apiKey: (await createKey(billed.app, payer, { name: 'limited', ...limits })).key, baseURL: billedURL, maxRetries: 0 });
    const limited = await clientOf({ rpm: 1 });
    fake.script('fake-billed', { text: 'First.' });
    expect((await limited.chat.completions.create({ model: `agent:${agent.id}`, messages: ask('Hi') })).choices[0]!.message.content).toBe('First.');
    for (const stream of [false, true]) {
      const error = await apiError(limited.chat.completions.create({ model: `agent:${agent.id}`, messages: ask('Again'), stream }));
      expect(error.status, `stream ${stream}`).toBe(429);
      expect(error.error).toMatchObject({ type: 'requests', code: 'rate_limit_exceeded' });
      expect(error.message).toMatch(/API key rate limit reached: rpm 1/);
      expect(error.headers?.get('retry-after')).toMatch(/^\d+$/);
      // Refused before its start wrote anything (the first call spent the minute): nothing to pay for again.
      expect(error.headers?.get('x-should-retry')).toBeNull();
    }
    expect((await billed.app.inject({ method: 'GET', url: '/api/v1/threads', headers: payer.headers })).json<{ count: number }>().count).toBe(1);
    const capped = await clientOf({ max_budget: '5' });
    for (const stream of [false, true]) {
      const error = await apiError(capped.chat.completions.create({ model: `agent:${agent.id}`, messages: ask('Hi'), stream }));
      expect(error.status, `stream ${stream}`).toBe(402);
      expect(error.error).toMatchObject({ type: 'insufficient_quota', code: 'insufficient_quota' });
      expect(error.message).toMatch(/API key budget exceeded: max_budget 5/);
    }
    expect(fake.log).toHaveLength(1);
  });

  it('answers 401 invalid_api_key, as a call made with the key now is, when the key is revoked between the request and its run\'s hold; not a failed run\'s 500', async () => {
    const admin = await superuserHeaders(billed.app);
    const payer = await createUser(billed.app);
    expect((await billed.app.inject({ method: 'POST', url: '/api/v1/billing/credits', headers: admin, payload: { user_id: payer.user.id, amount: '1000', description: 'test' } })).statusCode).toBe(200);
    const agent = await createAgent(billed.app, payer.headers, { model: 'fake-billed', max_output_tokens: 10 });
    const key = await createKey(billed.app, payer, { name: 'budgeted', max_budget: '100' });
    const meter = billed.app.meter;
    const reserve = meter.reserve.bind(meter);
    // The revocation's update committed; its cancellation of the key's runs not yet sent.
    meter.reserve = async (estimate) => {
      meter.reserve = reserve;
      await billed.database.db.update(apiKeys).set({ status: 'revoked' }).where(eq(apiKeys.id, key.id));
      return reserve(estimate);
    };
    try {
      const error = await apiError(new OpenAI({ apiKey: key.key, baseURL: billedURL, maxRetries: 0 }).chat.completions.create({ model: `agent:${agent.id}`, messages: ask('Hi') }));
      expect(error.status).toBe(401);
      // OpenAI's words, as the plain models' 401 for a key that no longer works (openai-sdk.test.ts).
      expect(error.error).toMatchObject({ code: 'invalid_api_key', message: 'Incorrect API key provided.' });
      expect(error.headers?.get('x-should-retry')).toBe('false');
      expect(error.headers?.get('www-authenticate')).toBe('Bearer');
    } finally {
      meter.reserve = reserve;
    }
    expect(fake.log).toEqual([]);
  });
});

describe('a server that closes', () => {
  const closingLogs = captureLogs('warn');
  const closing = useTestApp({ MODEL_TIMEOUT_MS: '30000' }, { logger: closingLogs.logger });

  it('ends the completions waiting on runs with 503 (no retry), the stream\'s with a warning, not an error; the runs are handed back to resume', async () => {
    await closing.app.listen({ host: '127.0.0.1', port: 0 });
    const url = `http://127.0.0.1:${(closing.app.server.address() as AddressInfo).port}/v1`;
    await addFakeModels(closing.app, await superuserHeaders(closing.app), fake.url);
    const user = await createUser(closing.app);
    const model = `agent:${(await createAgent(closing.app, user.headers)).id}`;
    const sdk = new OpenAI({ apiKey: (await createKey(closing.app, user)).key, baseURL: url, maxRetries: 2 });
    fake.script('fake-precise', { hang: true }, { chunks: Array.from({ length: 40 }, (_, i) => `w${i} `), chunkDelayMs: 100 });

    const waiting = apiError(sdk.chat.completions.create({ model, messages: ask('Never answered') }));
    await fake.waitFor((log) => log.length === 1);
    const stream = await sdk.chat.completions.create({ model, messages: ask('A long story'), stream: true });
    let closed: Promise<void> | undefined;
    const streamed = apiError(
      (async () => {
        for await (const chunk of stream) if (chunk.choices[0]?.delta.content) closed ??= closing.app.close();
      })(),
    );

    const error = await waiting;
    expect(error).toMatchObject({ status: 503, code: 'service_unavailable' });
    expect(error.message).toMatch(/shutting down/);
    const midStream = await streamed;
    expect(midStream.error).toMatchObject({ type: 'server_error', code: 'service_unavailable' });
    // A planned restart: the run resumes, so the stream's end alerts nobody.
    const streamEnd = closingLogs.lines().filter((line) => line.status === 503);
    expect(streamEnd).toEqual([expect.objectContaining({ level: LEVEL.warn, model, err: expect.objectContaining({ code: 'service_unavailable' }) as unknown })]);
    expect(closingLogs.lines().filter((line) => Number(line.level) >= LEVEL.error)).toEqual([]);
    // Both answers are complete; the SDK's keep-alive connections are not this test's subject.
    closing.app.server.closeAllConnections();
    await closed;
    // Handed back, not cancelled: the runs resume at the next start (or on another worker).
    const runId = error.headers!.get('x-keel-run-id')!;
    const run = await runCrud.getById(closing.database.db, runId);
    expect(run).toMatchObject({ status: 'running', lease_owner: null });
    expect(fake.log.filter((r) => r.model === 'fake-precise')).toHaveLength(2); // no retried request
  });
});
