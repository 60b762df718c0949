/**
 * An agent completion's answer (answerOf) is the run's written assistant messages: a message its
 * run's events end incomplete (its step stopped: the run was resumed after its worker died) is not
 * in the thread, and is no part of the answer either.
 */
import { describe, expect, it } from 'vitest';

import type { RunEvent } from '../../src/modules/agents/run-bus.js';
import { answerOf } from '../../src/services/agent-completions.js';

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
});
