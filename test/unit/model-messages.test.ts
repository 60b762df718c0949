/**
 * What a run sends the model of its thread (toModelMessages): blank text is left out, since
 * Anthropic refuses a text block without a non-white-space character and every later run of the
 * thread failed.
 */
import { describe, expect, it } from 'vitest';

import type { Message, MessageToolCall } from '../../src/models/thread.js';

import { toModelMessages } from '../../src/modules/agents/runner.js';

let seq = 0;
const row = (role: Message['role'], content: string, more: { tool_calls?: MessageToolCall[]; tool_call_id?: string } = {}): Message =>
  ({ role, content, tool_calls: more.tool_calls ?? null, tool_call_id: more.tool_call_id ?? null, seq: ++seq, metadata: {} }) as unknown as Message;

describe('toModelMessages', () => {
  it('leaves out blank text: an assistant answer of white space, a blank user message stored before they were refused, and blank text beside tool calls', () => {
    const call = { id: 'call_1', name: 'knowledge_search', arguments: { query: 'tides' } };
    const sent = toModelMessages([
      row('system', 'Be brief.'),
      row('user', 'q1'),
      row('assistant', ' \n\t'),
      row('user', '   '),
      row('user', 'q2'),
      row('assistant', '\n', { tool_calls: [call] }),
      row('tool', 'passages', { tool_call_id: 'call_1' }),
      row('assistant', ''),
    ]);
    expect(sent).toEqual([
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'q1' },
      { role: 'user', content: 'q2' },
      { role: 'assistant', content: [{ type: 'tool-call', toolCallId: 'call_1', toolName: 'knowledge_search', input: { query: 'tides' } }] },
      { role: 'tool', content: [{ type: 'tool-result', toolCallId: 'call_1', toolName: 'knowledge_search', output: { type: 'text', value: 'passages' } }] },
    ]);
  });

  it('keeps text that says something, white space around it included', () => {
    expect(toModelMessages([row('user', ' hi '), row('assistant', '\nhello\n')])).toEqual([
      { role: 'user', content: ' hi ' },
      { role: 'assistant', content: '\nhello\n' },
    ]);
  });
});
