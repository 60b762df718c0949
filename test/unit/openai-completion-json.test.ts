/**
 * The non-stream answer and the stream's usage chunk are written from templates: they must be what
 * JSON.stringify of the equivalent object writes, byte for byte, whatever the model said.
 */
import { describe, expect, it } from 'vitest';

import type { ChatResult, TokenUsage, ToolCall } from '../../src/modules/ai-models/index.js';
import { CompletionFrames, completionId, completionJson } from '../../src/services/openai-gateway.js';

const USAGE: TokenUsage = { input: 12, output: 7, cached_input: 0, cache_write: 0, reasoning: 0 };

function result(overrides: Partial<ChatResult>): ChatResult {
  return {
    model: 'gpt-test',
    provider: 'fake',
    usage: USAGE,
    cost: '0',
    latency_ms: 1,
    text: 'Hello.',
    toolCalls: [],
    finishReason: 'stop',
    responseMessages: [],
    time_to_first_token_ms: null,
    ...overrides,
  };
}

const FINISH: Record<string, string> = { stop: 'stop', length: 'length', 'tool-calls': 'tool_calls', 'content-filter': 'content_filter' };

const usageObject = (u: TokenUsage) => ({
  prompt_tokens: u.input,
  completion_tokens: u.output,
  total_tokens: u.input + u.output,
  prompt_tokens_details: { cached_tokens: u.cached_input },
  completion_tokens_details: { reasoning_tokens: u.reasoning },
});

/** The object OpenAI's answer is, serialized as a whole (what the gateway wrote before the template). */
function expected(r: ChatResult, id: string, created: number): string {
  // A refusal goes in `refusal`, its content null, as OpenAI answers it.
  const message: Record<string, unknown> = { role: 'assistant', content: r.text || (r.toolCalls.length || r.refusal ? null : ''), ...(r.reasoningText && { reasoning_content: r.reasoningText }), refusal: r.refusal ?? null };
  if (r.toolCalls.length) {
    message.tool_calls = r.toolCalls.map((call) => ({
      id: call.toolCallId,
      type: 'function',
      function: { name: call.toolName, arguments: typeof call.input === 'string' ? call.input : JSON.stringify(call.input ?? {}) },
    }));
  }
  // Tool calls say tool_calls, unless they were cut off (length) or filtered, as OpenAI answers then.
  const reason = FINISH[r.finishReason];
  const finish = r.toolCalls.length && reason !== 'length' && reason !== 'content_filter' ? 'tool_calls' : reason && reason !== 'tool_calls' ? reason : 'stop';
  return JSON.stringify({
    id,
    object: 'chat.completion',
    created,
    model: r.model,
    choices: [{ index: 0, message, finish_reason: finish, logprobs: null }],
    usage: usageObject(r.usage),
  });
}

const call = (toolCallId: string, toolName: string, input: unknown): ToolCall => ({ toolCallId, toolName, input });

const CASES: [string, Partial<ChatResult>][] = [
  ['plain text', {}],
  ['unicode: accents, CJK, emoji, a lone surrogate, U+2028', { text: 'Ça va — 你好 👋🏽 \ud800 end\u2028line' }],
  ['quotes, backslashes, control characters, markup', { text: 'He said "hi"\\n\n\t\r\u0000\u001f </script><!-- \'x\'' }],
  ['an empty answer', { text: '' }],
  ['tool calls only: null content', { text: '', toolCalls: [call('call_1', 'get_weather', { city: 'Zürich', "q\"uote": [1, null, true] }), call('call_2', 'noop', undefined)], finishReason: 'tool-calls' }],
  ['text and a tool call whose input is a string', { text: 'Let me check.', toolCalls: [call('call_"3', 'raw', '{"not": "parsed"')] }],
  ['usage with cached and reasoning tokens', { usage: { input: 1_234_567, output: 89, cached_input: 1_000_000, cache_write: 5, reasoning: 64 } }],
  ['a model name that needs escaping', { model: 'org/"model"\\v1 ✓' }],
  ['finish reasons', { finishReason: 'length' }],
  ['content filter', { finishReason: 'content-filter' }],
  ['an unknown finish reason', { finishReason: 'other' }],
  ['a tool call cut off by the output limit', { text: '', toolCalls: [call('call_4', 'get_weather', '{"city":"Pa')], finishReason: 'length' }],
  ['reasoning', { reasoningText: 'Two and "two".' }],
  ['tool_calls without a tool call', { text: '<tool_call>', finishReason: 'tool-calls' }],
  ['a tool call with a provider\'s stop', { text: '', toolCalls: [call('call_5', 'get_weather', { city: 'Paris' })], finishReason: 'stop' }],
  ['a refusal: null content', { text: '', refusal: 'I can\'t help with "that" \u2028.' }],
  ['a refusal after some text', { text: 'Partly.', refusal: 'No more.' }],
  ['non-finite token counts', { usage: { input: Number.NaN, output: Infinity, cached_input: 0, cache_write: 0, reasoning: -0 } }],
];

describe('completionJson', () => {
  it.each(CASES)('writes what JSON.stringify of the object writes: %s', (_name, overrides) => {
    const r = result(overrides);
    const json = completionJson(r);
    const { id, created } = JSON.parse(json) as { id: string; created: number };
    expect(id).toMatch(/^chatcmpl-[0-9a-f]{32}$/);
    expect(Math.abs(created - Date.now() / 1000)).toBeLessThan(5);
    expect(json).toBe(expected(r, id, created));
  });
});

describe('completionId', () => {
  it('is chatcmpl- and the 32 hex digits of a fresh random UUID', () => {
    const ids = Array.from({ length: 100 }, completionId);
    for (const id of ids) expect(id).toMatch(/^chatcmpl-[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}$/);
    expect(new Set(ids).size).toBe(ids.length);
  });
});

describe('the stream usage chunk', () => {
  it('is what JSON.stringify of the chunk writes', async () => {
    const r = result({ model: 'ünïcode "model"', usage: { input: 5, output: 3, cached_input: 2, cache_write: 0, reasoning: 1 } });
    const body = new CompletionFrames(r.model, true).render({ type: 'finish', result: r });
    const frames = body.split('\n\n').filter(Boolean);
    const usageFrame = frames.at(-2)!.replace(/^data: /, '');
    const { id, created } = JSON.parse(usageFrame) as { id: string; created: number };
    expect(usageFrame).toBe(JSON.stringify({ id, object: 'chat.completion.chunk', created, model: r.model, choices: [], usage: usageObject(r.usage) }));
    expect(frames.at(-1)).toBe('data: [DONE]');
  });
});

describe('the stream\'s frames (CompletionFrames)', () => {
  it('are what JSON.stringify writes of OpenAI\'s chunks, in order, the role\'s first and [DONE] last', () => {
    const call: ToolCall = { toolCallId: 'call_1', toolName: 'look "up"', input: { q: 'ü' } };
    const r = result({ toolCalls: [call], finishReason: 'tool-calls' });
    const frames = new CompletionFrames('gpt "test"', false);
    const body =
      frames.render({ type: 'text-delta', text: 'Hi "there"\n' }) +
      frames.render({ type: 'reasoning-delta', text: 'hmm' }) +
      frames.render({ type: 'refusal-delta', text: 'No "way"' }) +
      frames.render({ type: 'tool-call', toolCall: call }) +
      frames.render({ type: 'tool-call', toolCall: call }) +
      frames.render({ type: 'finish', result: r });
    const chunks = body.split('\n\n').filter(Boolean);
    expect(chunks.at(-1)).toBe('data: [DONE]');
    const parsed = chunks.slice(0, -1).map((c) => c.replace(/^data: /, ''));
    const { id, created } = JSON.parse(parsed[0]!) as { id: string; created: number };
    const chunk = (delta: unknown, finish: string | null = null) =>
      JSON.stringify({ id, object: 'chat.completion.chunk', created, model: 'gpt "test"', choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }] });
    const toolDelta = (index: number) => ({ tool_calls: [{ index, id: 'call_1', type: 'function', function: { name: 'look "up"', arguments: '{"q":"ü"}' } }] });
    expect(parsed).toEqual([
      chunk({ role: 'assistant', content: '', refusal: null }),
      chunk({ content: 'Hi "there"\n' }),
      chunk({ reasoning_content: 'hmm' }),
      chunk({ refusal: 'No "way"' }),
      chunk(toolDelta(0)),
      chunk(toolDelta(1)),
      chunk({}, 'tool_calls'),
    ]);
  });

  it('an error is OpenAI\'s error object as an event, after the first chunk or alone before any', () => {
    const frames = new CompletionFrames('m', true);
    frames.render({ type: 'text-delta', text: 'a' });
    const error = { error: { message: 'Upstream 500 error', type: 'server_error', param: null, code: 'upstream_error' } };
    expect(frames.error(error)).toBe(`data: ${JSON.stringify(error)}\n\n`);
    // Before any (a late first event that failed): the error alone, no role chunk for an answer that never came.
    expect(new CompletionFrames('m', true).error(error)).toBe(`data: ${JSON.stringify(error)}\n\n`);
  });
});
