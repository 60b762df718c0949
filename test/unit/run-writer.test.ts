import { describe, expect, it } from 'vitest';

import { type NewRunEvent, type RunEvent, type RunEventLog, RunWriter } from '../../src/modules/agents/run-bus.js';
import { RunEventsRefusedError } from '../../src/modules/agents/run-bus-errors.js';

/**
 * A log another writer keeps appending to: every append of ours is refused as stale, and the top
 * has moved again by the time we read it. Only what RunWriter calls is there.
 */
function logRacedByAnotherWriter(): RunEventLog & { top: number } {
  const log = {
    top: 5,
    append(runId: string, _events: readonly NewRunEvent[]): Promise<RunEvent[]> {
      log.top += 3;
      return Promise.reject(new RunEventsRefusedError(runId, 'stale', log.top));
    },
    lastSeq: () => Promise.resolve(log.top),
  };
  return log as unknown as RunEventLog & { top: number };
}

describe('RunWriter', () => {
  it('hands back a ceiling at or above what another writer stored, after catch-ups whose appends were all refused', async () => {
    const log = logRacedByAnotherWriter();
    const ceiling = { after: 5, at: 1_005, raise: () => Promise.resolve() };
    const writer = new RunWriter(log, 'run-1', () => Promise.resolve(true), ceiling);

    const refused = await writer.append([{ event: 'message.delta', data: { delta: 'x' } }]).catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(RunEventsRefusedError);
    await writer.settle().catch(() => undefined);

    // The other writer's events reach at least the top the last catch-up read: a hand-back's ceiling
    // below it would let the next writer number over events clients saw.
    const readTop = log.top - 3;
    expect(writer.lastSeq()).toBeGreaterThanOrEqual(readTop);
  });
});
