/**
 * The chat route's hand-written check of the usual body (simpleChatRequest) against Zod's parse of
 * the schema: for every body it takes it returns exactly what Zod returns, and it takes no body
 * Zod refuses (those go to Zod, whose errors carry OpenAI's `param`).
 */
import { describe, expect, it } from 'vitest';

import { ChatCompletionRequest, ChatRequestBounds, chatRequestBoundsIssue, MAX_LOGIT_BIAS_TOKENS, MAX_MESSAGE_PARTS, MAX_MESSAGES, MAX_METADATA_PAIRS, MAX_SCHEMA_VALUES, MAX_TOOLS, simpleChatRequest } from '../../src/schemas/openai.js';

const user = { role: 'user', content: 'Hello' };
const taken = [
  { model: 'm', messages: [user] },
  { model: 'm', messages: [{ role: 'system', content: 'Be brief.' }, { role: 'developer', content: 'x', name: 'dev' }, user, { role: 'assistant', content: 'Hi' }, user] },
  { model: 'm', messages: [user], max_tokens: 16, temperature: 0.5, top_p: 1, n: 1, stop: ['a', 'b'], stream: true, stream_options: { include_usage: true } },
  { model: 'm', messages: [user], max_completion_tokens: 10_000_000, temperature: null, top_p: null, stop: 'x', stream: false, stream_options: null, n: null, max_tokens: null },
  { model: 'm', messages: [{ ...user, extra: 1 }], user: 'someone', seed: 3, frequency_penalty: 0, unknown_field: {} },
  { model: 'm', messages: [user], stream: true, stream_options: { include_usage: false, other: 1 } },
  { model: 'm', messages: [user], stream: null, stream_options: null },
  { model: 'm', messages: [user], stream: true, stream_options: { include_usage: null } },
  { model: 'm', messages: [user], frequency_penalty: -2, presence_penalty: 2, seed: -7 },
  { model: 'm', messages: [user], frequency_penalty: null, presence_penalty: null, seed: null, user: null, reasoning_effort: null },
  { model: 'm', messages: [user], reasoning_effort: 'low', user: 'end-user' },
  { model: 'm', messages: [user], prompt_cache_key: 'x'.repeat(64), safety_identifier: 'x'.repeat(64), stream: true },
  { model: 'm', messages: [user], prompt_cache_key: null, safety_identifier: null },
  { model: 'm', messages: [user], prompt_cache_key: 'k', prompt_cache_retention: '24h' },
  { model: 'm', messages: [user], prompt_cache_retention: 'in_memory' },
  { model: 'm', messages: [user], prompt_cache_retention: null },
  { model: 'm', messages: [{ role: 'user', content: 'x', name: 'Ada_Lovelace-2' }, { role: 'user', content: 'x', name: 'José' }, { role: 'user', content: 'x', name: 'alice@example.com' }, { role: 'user', content: 'x', name: 'agent:planner' }, { role: 'assistant', content: 'y', name: 'n'.repeat(64) }] },
];
/** `stream_options` (not null) without `stream: true`. */
const notStreamed = [
  { model: 'm', messages: [user], stream_options: { include_usage: true } },
  { model: 'm', messages: [user], stream: false, stream_options: { include_usage: true } },
  { model: 'm', messages: [user], stream: null, stream_options: {} },
  { model: 'm', messages: [user], stream: false, stream_options: { include_usage: null } },
];
const toZod = [
  // valid, but not the simple shape
  { model: 'm', messages: [{ role: 'user', content: [{ type: 'text', text: 'Hi' }] }] },
  { model: 'm', messages: [user, { role: 'assistant', content: null, tool_calls: [{ id: 'c', type: 'function', function: { name: 'f', arguments: '{}' } }] }, { role: 'tool', content: 'r', tool_call_id: 'c' }] },
  { model: 'm', messages: [user], tools: [{ type: 'function', function: { name: 'f' } }] },
  { model: 'm', messages: [user], response_format: { type: 'json_object' } },
  { model: 'm', messages: [user], metadata: { thread_id: 't' } },
  { model: 'm', messages: [user], parallel_tool_calls: true },
  { model: 'm', messages: [user], logprobs: true, top_logprobs: 2, logit_bias: { '50256': -100 } },
  { model: 'm', messages: [user], logit_bias: { '007': 1 } }, // its token id made canonical by Zod
  { model: 'm', messages: [{ role: 'user', content: 'z', name: null }] },
  // invalid
  null,
  [],
  'text',
  {},
  { model: '', messages: [user] },
  { model: 'x'.repeat(201), messages: [user] },
  { model: 1, messages: [user] },
  { model: 'm', messages: [] },
  { model: 'm', messages: {} },
  { model: 'm', messages: [{ role: 'robot', content: 'x' }] },
  { model: 'm', messages: [{ role: 'user' }] },
  { model: 'm', messages: [{ role: 'user', content: 3 }] },
  { model: 'm', messages: [{ role: 'user', content: 'x', name: 3 }] },
  // A participant's name as OpenAI checks it: no whitespace, none of < | \ / > (and at most 256 characters).
  { model: 'm', messages: [{ role: 'user', content: 'x', name: 'Ada Lovelace' }] },
  { model: 'm', messages: [{ role: 'system', content: 'x', name: '' }] },
  { model: 'm', messages: [{ role: 'assistant', content: 'x', name: 'n'.repeat(257) }] },
  { model: 'm', messages: [{ role: 'user', content: 'x', name: 'a/b' }] },
  { model: 'm', messages: [{ role: 'user', content: 'x', name: 'a<b' }] },
  { model: 'm', messages: [{ role: 'user', content: 'x', name: 'tab\there' }] },
  { model: 'm', messages: [user], max_tokens: 0 },
  { model: 'm', messages: [user], max_tokens: 1.5 },
  { model: 'm', messages: [user], max_tokens: 10_000_001 },
  { model: 'm', messages: [user], max_completion_tokens: '3' },
  { model: 'm', messages: [user], temperature: 2.1 },
  { model: 'm', messages: [user], top_p: -0.1 },
  { model: 'm', messages: [user], frequency_penalty: 2.1 },
  { model: 'm', messages: [user], presence_penalty: '0' },
  { model: 'm', messages: [user], seed: 1.5 },
  { model: 'm', messages: [user], seed: 2 ** 53 },
  { model: 'm', messages: [user], user: 5 },
  { model: 'm', messages: [user], user: 'u'.repeat(257) },
  { model: 'm', messages: [user], reasoning_effort: 'auto' },
  { model: 'm', messages: [user], n: 2 },
  { model: 'm', messages: [user], stream: 'yes' },
  { model: 'm', messages: [user], stream_options: { include_usage: 'yes' } },
  { model: 'm', messages: [user], stream_options: 'x' },
  // Options of a stream on an answer not streamed: OpenAI's 400.
  ...notStreamed,
  { model: 'm', messages: [user], stop: ['a', 'b', 'c', 'd', 'e'] },
  { model: 'm', messages: [user], stop: [1] },
  { model: 'm', messages: [user], logit_bias: { '1': 1, '01': 2 } },
  { model: 'm', messages: [user], safety_identifier: 'x'.repeat(65) },
  { model: 'm', messages: [user], prompt_cache_key: 'x'.repeat(65) },
  { model: 'm', messages: [user], prompt_cache_key: 7 },
  { model: 'm', messages: [user], prompt_cache_retention: '1h' },
  { model: 'm', messages: [user], prompt_cache_retention: 24 },
  { model: 'm', messages: [user], user: 'x'.repeat(257) },
  // Past MAX_MESSAGES: the simple shape, but refused (chatRequestBoundsIssue).
  { model: 'm', messages: Array.from({ length: 2049 }, () => user) },
];

describe('simpleChatRequest', () => {
  it.each(taken.map((body, i) => [i, body] as const))('takes the usual body %i and returns what Zod returns', (_, body) => {
    const simple = simpleChatRequest(body);
    expect(simple).toBeDefined();
    expect(simple).toStrictEqual(ChatCompletionRequest.parse(body));
  });

  it.each(toZod.map((body, i) => [i, body] as const))('leaves body %i to Zod', (_, body) => {
    expect(simpleChatRequest(body)).toBeUndefined();
  });

  it.each(notStreamed.map((body, i) => [i, body] as const))('stream_options without stream: true (body %i) is refused at stream_options in OpenAI\'s words', (_, body) => {
    const parsed = ChatCompletionRequest.safeParse(body);
    expect(parsed.success).toBe(false);
    expect(parsed.error?.issues).toEqual([expect.objectContaining({ path: ['stream_options'], message: 'The \'stream_options\' parameter is only allowed when \'stream\' is enabled.' })]);
  });

  it('never takes a body Zod refuses', () => {
    for (const body of toZod) if (!ChatCompletionRequest.safeParse(body).success) expect(simpleChatRequest(body)).toBeUndefined();
  });
});

describe('chatRequestBoundsIssue', () => {
  const text = { type: 'text', text: 'x' };
  const call = { id: 'c', type: 'function', function: { name: 'f', arguments: '{}' } };
  const tools = (n: number) => Array.from({ length: n }, (_, i) => ({ type: 'function', function: { name: `f${i}` } }));
  const partsOf = (n: number) => Array.from({ length: n }, () => text);
  /** A JSON Schema of about `values` values: an object, its `type` and `properties`, two for each property. */
  const schemaOf = (values: number) => ({ type: 'object', properties: Object.fromEntries(Array.from({ length: Math.floor(values / 2) }, (_, i) => [`p${i}`, { type: 'string' }])) });
  const schemaTool = (i: number, values: number) => ({ type: 'function', function: { name: `f${i}`, parameters: schemaOf(values) } });
  const keys = (n: number, value: unknown) => Object.fromEntries(Array.from({ length: n }, (_, i) => [String(i), value]));
  const past: [body: Record<string, unknown>, path: (string | number)[]][] = [
    [{ model: 'm', messages: Array.from({ length: MAX_MESSAGES + 1 }, () => user) }, ['messages']],
    [{ model: 'm', messages: [user], tools: tools(MAX_TOOLS + 1) }, ['tools']],
    [{ model: 'm', messages: [{ role: 'user', content: partsOf(MAX_MESSAGE_PARTS + 1) }] }, ['messages', 0, 'content']],
    [{ model: 'm', messages: [{ role: 'system', content: partsOf(MAX_MESSAGE_PARTS) }, { role: 'user', content: [text] }] }, ['messages', 1, 'content']],
    [{ model: 'm', tools: tools(1), messages: [{ role: 'user', content: partsOf(MAX_MESSAGE_PARTS) }, { role: 'assistant', content: null, tool_calls: [call] }] }, ['messages', 1, 'tool_calls']],
    [{ model: 'm', messages: [{ role: 'user', content: partsOf(MAX_MESSAGE_PARTS) }], prediction: { type: 'content', content: [text] } }, ['prediction', 'content']],
    // The schemas' values all together: the second tool's takes the count past it.
    [{ model: 'm', messages: [user], tools: [schemaTool(0, MAX_SCHEMA_VALUES / 2), schemaTool(1, MAX_SCHEMA_VALUES / 2)] }, ['tools', 1, 'function', 'parameters']],
    [{ model: 'm', messages: [user], tools: [schemaTool(0, MAX_SCHEMA_VALUES / 2)], response_format: { type: 'json_schema', json_schema: { name: 'r', schema: schemaOf(MAX_SCHEMA_VALUES / 2) } } }, ['response_format', 'json_schema', 'schema']],
  ];

  it.each(past.map(([body, path]) => [path.join('.'), body] as const))('finds the bound passed at %s, where and as Zod refuses it (the route\'s bounds schema too)', (_, body) => {
    const issue = chatRequestBoundsIssue(body)!;
    expect(issue).toBeDefined();
    const expected = [expect.objectContaining({ code: 'too_big', path: issue.path, message: issue.message, maximum: issue.maximum })];
    expect(ChatCompletionRequest.safeParse(body).error?.issues).toEqual(expected);
    expect(ChatRequestBounds.safeParse(body).error?.issues).toEqual(expected);
    expect(simpleChatRequest(body)).toBeUndefined();
  });

  it('finds logit_bias past OpenAI\'s 300 tokens and metadata past its 16 pairs, where and in the words Zod refuses them', () => {
    for (const [body, path, message] of [
      [{ model: 'm', messages: [user], logit_bias: keys(MAX_LOGIT_BIAS_TOKENS + 1, 1) }, ['logit_bias'], 'At most 300 tokens'],
      [{ model: 'm', messages: [user], metadata: keys(MAX_METADATA_PAIRS + 1, 'v') }, ['metadata'], 'At most 16 pairs'],
    ] as const) {
      expect(chatRequestBoundsIssue(body)).toMatchObject({ path, message });
      expect(ChatCompletionRequest.safeParse(body).error?.issues).toEqual([expect.objectContaining({ path, message })]);
      expect(ChatRequestBounds.safeParse(body).error?.issues).toEqual([expect.objectContaining({ path, message })]);
    }
  });

  it('finds none at the bounds, nor in what is no request; Zod takes a body at them', () => {
    const at = { model: 'm', tools: tools(MAX_TOOLS), messages: [...Array.from({ length: MAX_MESSAGES - 2 }, () => user), { role: 'user', content: partsOf(MAX_MESSAGE_PARTS - 1) }, { role: 'assistant', content: null, tool_calls: [call] }] };
    expect(chatRequestBoundsIssue(at)).toBeUndefined();
    expect(ChatCompletionRequest.safeParse(at).success).toBe(true);
    // 300 token biases, 16 pairs, schemas of 100,000 values in all (an object, its type and properties, then two a property).
    const fields = { model: 'm', messages: [user], logit_bias: keys(MAX_LOGIT_BIAS_TOKENS, 1), metadata: keys(MAX_METADATA_PAIRS, 'v'), tools: [schemaTool(0, MAX_SCHEMA_VALUES / 2 - 4)], response_format: { type: 'json_schema', json_schema: { name: 'r', schema: schemaOf(MAX_SCHEMA_VALUES / 2 - 2) } } };
    expect(chatRequestBoundsIssue(fields)).toBeUndefined();
    expect(ChatCompletionRequest.safeParse(fields).success).toBe(true);
    for (const data of [null, 'x', [], {}, { messages: 'x', tools: 3 }, { messages: [null, 1, { content: 'x' }] }]) expect(chatRequestBoundsIssue(data)).toBeUndefined();
  });

  it('leaves an agent model\'s messages to the thread\'s own bound (MAX_MESSAGES_PER_THREAD), its parts not', () => {
    const agent = { model: 'agent:00000000-0000-4000-8000-000000000000', messages: Array.from({ length: MAX_MESSAGES + 1 }, () => user) };
    expect(chatRequestBoundsIssue(agent)).toBeUndefined();
    expect(simpleChatRequest(agent)).toStrictEqual(ChatCompletionRequest.parse(agent));
    expect(chatRequestBoundsIssue({ ...agent, messages: [{ role: 'user', content: partsOf(MAX_MESSAGE_PARTS + 1) }] })?.path).toEqual(['messages', 0, 'content']);
  });

  it('refuses a user message of no parts at its content, as OpenAI does', () => {
    expect(ChatCompletionRequest.safeParse({ model: 'm', messages: [{ role: 'user', content: [] }] }).error?.issues).toEqual([expect.objectContaining({ path: ['messages', 0, 'content'] })]);
  });
});
