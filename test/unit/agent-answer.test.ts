/**
 * An agent completion's answer (answerOf) is the run's written assistant messages: a message its
 * run's events end incomplete (its step stopped: the run was resumed after its worker died) is not
 * in the thread, and is no part of the answer either. Its text streamed already is not streamed
 * again when the resumed step repeats it; a stream whose resumed step says something else ends
 * with an error (agentCompletionChunks), as it cannot take text back.
 */
import pino from 'pino';
import { describe, expect, it } from 'vitest';

import type { Run } from '../../src/models/index.js';

import type { RunEvent } from '../../src/modules/agents/run-bus.js';
import { agentCompletionChunks, answerOf, type AnswerPiece, type CompletionIds } from '../../src/services/agent-completions.js';

const RUN = 'run-1';
function* log(...events: { event: RunEvent['event']; data: Record<string, unknown> }[]): Generator<RunEvent> {
  let seq = 0;
  for (const { event, data } of events) {
    seq += 1;
    yield { seq, event, data: { ...data, run_id: RUN, seq } };
  }
}

async function* of(events: Iterable<RunEvent>): AsyncGenerator<RunEvent> {
  for (const event of events) yield await Promise.resolve(event);
}

describe('answerOf', () => {
  it('leaves out a message its events ended incomplete', async () => {
    const events = log(
      { event: 'message.created', data: { message: { id: 'a', role: 'assistant', content: '' } } },
      { event: 'message.delta', data: { message_id: 'a', delta: 'half' } },
      { event: 'message.completed', data: { message: { id: 'a', role: 'assistant', content: 'half' }, status: 'incomplete', reason: 'interrupted' } },
      { event: 'message.created', data: { message: { id: 'b', role: 'assistant', content: '' } } },
      { event: 'message.delta', data: { message_id: 'b', delta: 'whole' } },
      { event: 'message.completed', data: { message: { id: 'b', role: 'assistant', content: 'whole' } } },
      { event: 'run.completed', data: { run: { usage: { input_tokens: 1, output_tokens: 1, cached_input_tokens: 0, reasoning_tokens: 0 } } } },
    );
    const pieces = [];
    for await (const piece of answerOf(of(events), new AbortController().signal)) pieces.push(piece);
    expect(pieces.at(-1)).toMatchObject({ type: 'done', content: 'whole' });
  });

  it('does not stream again the text of a message that ended incomplete when the resumed step repeats it: only what comes after', async () => {
    const pieces = await piecesOf(
      ...step('a', ['one ', 'two ', 'three '], 'incomplete'),
      // The redo, cut into other pieces, a step of its own (no blank line before it).
      ...step('b', ['one two', ' thr', 'ee four ', 'five'], 'written'),
      ...step('c', ['next step'], 'written'),
      USAGE_END,
    );
    expect(texts(pieces)).toBe('one two three four five\n\nnext step');
    expect(pieces.at(-1)).toMatchObject({ type: 'done', content: 'one two three four five\n\nnext step' });
  });

  it('a step resumed twice, the second redo cut short again: the text shown is owed once, whatever attempt shows it', async () => {
    const pieces = await piecesOf(...step('a', ['one ', 'two '], 'incomplete'), ...step('b', ['one ', 'two ', 'three '], 'incomplete'), ...step('c', ['one two three four'], 'written'), USAGE_END);
    expect(texts(pieces)).toBe('one two three four');
    expect(pieces.at(-1)).toMatchObject({ type: 'done', content: 'one two three four' });
  });

  it('the text of a step that called tools without text does not count against the next step', async () => {
    const pieces = await piecesOf(
      ...step('a', ['looking '], 'written'),
      ...step('t', [], 'written'),
      ...step('b', ['found '], 'incomplete'),
      ...step('c', ['found it'], 'written'),
      USAGE_END,
    );
    expect(texts(pieces)).toBe('looking \n\nfound it');
    expect(pieces.map((p) => p.type)).not.toContain('diverged');
  });

  it('a resumed step that says something else, or less, than was streamed: `diverged` once, no more text, and the answer as written still follows', async () => {
    for (const redo of [['two ', 'one'], ['on']]) {
      const pieces = await piecesOf(...step('a', ['one ', 'two '], 'incomplete'), ...step('b', redo, 'written'), ...step('c', ['more'], 'written'), USAGE_END);
      expect(pieces.map((p) => p.type), redo.join('')).toEqual(['text', 'text', 'diverged', 'done']);
      expect(pieces.at(-1)).toMatchObject({ type: 'done', content: `${redo.join('')}\n\nmore` });
    }
  });

  it('a stream whose resumed step diverged ends with an error event (agent_run_resumed), no finish chunk and no [DONE]', async () => {
    const pieces = answerOf(of(log(...step('a', ['one ', 'two '], 'incomplete'), ...step('b', ['uno'], 'written'), USAGE_END)), new AbortController().signal)[Symbol.asyncIterator]();
    const run = { id: 'run-1', thread_id: 'thread-1', created_at: new Date() } as Run;
    const ids: CompletionIds = { runId: run.id, threadId: run.thread_id, started: true };
    const body: string[] = [];
    for await (const chunk of agentCompletionChunks({ run, pieces, first: await pieces.next() }, ids, 'agent:x', false, pino({ level: 'silent' }))) body.push(chunk);
    const frames = body.join('').split('\n\n').filter(Boolean).map((frame) => frame.replace(/^data: /, ''));
    expect(frames.at(-1)).not.toBe('[DONE]');
    expect(JSON.parse(frames.at(-1)!)).toMatchObject({ error: { code: 'agent_run_resumed' } });
    const streamed = frames.slice(0, -1).map((frame) => (JSON.parse(frame) as { choices: { delta: { content?: string } }[] }).choices[0]!.delta.content ?? '');
    expect(streamed.join('')).toBe('one two ');
  });
});

type LogEvent = { event: RunEvent['event']; data: Record<string, unknown> };

/** A message's events: created, its deltas, completed as `written` or `incomplete`. */
function step(id: string, deltas: string[], end: 'written' | 'incomplete'): LogEvent[] {
  const content = deltas.join('');
  return [
    { event: 'message.created', data: { message: { id, role: 'assistant', content: '' } } },
    ...deltas.map((delta) => ({ event: 'message.delta' as const, data: { message_id: id, delta } })),
    { event: 'message.completed', data: { message: { id, role: 'assistant', content }, ...(end === 'incomplete' ? { status: 'incomplete', reason: 'interrupted' } : {}) } },
  ];
}

const USAGE_END: LogEvent = { event: 'run.completed', data: { run: { usage: { input_tokens: 1, output_tokens: 1, cached_input_tokens: 0, reasoning_tokens: 0 } } } };

async function piecesOf(...events: LogEvent[]): Promise<AnswerPiece[]> {
  const pieces: AnswerPiece[] = [];
  for await (const piece of answerOf(of(log(...events)), new AbortController().signal)) pieces.push(piece);
  return pieces;
}

const texts = (pieces: AnswerPiece[]) => pieces.map((p) => (p.type === 'text' ? p.text : '')).join('');
