import pino from 'pino';
import { describe, expect, it } from 'vitest';

import type { Run } from '../../src/models/index.js';

import { type NewRunEvent, type RunEvent, type RunEventLog, RunWriter } from '../../src/modules/agents/run-bus.js';
import { RunEventsRefusedError } from '../../src/modules/agents/run-bus-errors.js';
import { appendFinalEvent, type RunDeps } from '../../src/modules/agents/run-lifecycle.js';

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

/** A log that numbers each event after the last, as a stream does, and notes each append's seqs in `said`. */
function numberingLog(said: string[]): RunEventLog & { top: number } {
  const log = {
    top: 1,
    append(_runId: string, events: readonly NewRunEvent[]): Promise<RunEvent[]> {
      const stored = events.map((event) => ({ ...event, seq: ++log.top }) as RunEvent);
      said.push(`append ${stored[0]!.seq}-${log.top}`);
      return Promise.resolve(stored);
    },
    lastSeq: () => Promise.resolve(log.top),
  };
  return log as unknown as RunEventLog & { top: number };
}

const deltas = (count: number): NewRunEvent[] => Array.from({ length: count }, (_, i) => ({ event: 'message.delta', data: { delta: `d${i}` } }));

describe('RunWriter', () => {
  it("counts a run's final batch (appended by appendFinalEvent) against the run's seq ceiling: raised first, waited for, where the batch passes it; not appended when the raise is refused", async () => {
    const said: string[] = [];
    const log = numberingLog(said);
    const deps = { bus: { events: log }, log: pino({ level: 'silent' }) } as unknown as RunDeps;
    const completed = { id: 'run-1', status: 'completed', cost: '0' } as Run;
    let refuse = false;
    const ceiling = {
      after: 1,
      at: 11,
      room: 10,
      raise: async (to: number) => {
        if (refuse) throw new Error('the run is no longer this worker\'s');
        said.push(`raise ${to}`);
      },
    };
    const writer = new RunWriter(log, 'run-1', () => Promise.resolve(true), ceiling);
    // Seqs 2-5: under half the room used, no raise.
    await writer.append(deltas(4));
    expect(said).toEqual(['append 2-5']);

    // The final batch, 8 events and run.completed (seqs 6-14), would pass the ceiling (11): the raise
    // (to the room past them) is committed before they go out.
    expect(await appendFinalEvent(deps, completed, deltas(8), writer)).toBe(true);
    expect(said).toEqual(['append 2-5', 'raise 24', 'append 6-14']);
    expect(ceiling.at).toBe(24);

    // A raise refused (the run taken up by another worker): its final batch is not appended past the ceiling.
    const other = new RunWriter(log, 'run-1', () => Promise.resolve(true), { ...ceiling, after: 14, at: 15 });
    refuse = true;
    expect(await appendFinalEvent(deps, completed, deltas(2), other)).toBe(false);
    expect(log.top).toBe(14);
  });

  it('hands back a ceiling at or above what another writer stored, after catch-ups whose appends were all refused', async () => {
    const log = logRacedByAnotherWriter();
    const ceiling = { after: 5, at: 1_005, room: 1_000, raise: () => Promise.resolve() };
    const writer = new RunWriter(log, 'run-1', () => Promise.resolve(true), ceiling);

    const refused = await writer.append([{ event: 'message.delta', data: { delta: 'x' } }]).catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(RunEventsRefusedError);
    await writer.settle().catch(() => undefined);

    // The other writer's events reach at least the top the last catch-up read: a hand-back's ceiling
    // below it would let the next writer number over events clients saw.
    const readTop = log.top - 3;
    expect(writer.lastSeq()).toBeGreaterThanOrEqual(readTop);
  });

  it('asks the database whether it still holds the run when the log refuses an append as ended (the run ended by another), once, before the refusal reaches the run: a worker that lost its run stops as a lost lease does rather than failing it', async () => {
    // A worker woken after a pause past its lease, its stream's buffered parts read at once: the
    // worker that took the run over has completed it, so the log ends with run.completed.
    const log = {
      append: (runId: string) => Promise.reject(new RunEventsRefusedError(runId, 'ended', 9)),
      lastSeq: () => Promise.resolve(9),
    } as unknown as RunEventLog;
    const asked: RunEventsRefusedError[] = [];
    let answer!: (held: boolean) => void;
    const held = new Promise<boolean>((resolve) => (answer = resolve));
    const writer = new RunWriter(log, 'run-1', (refusal) => {
      asked.push(refusal);
      return held;
    });
    writer.add(deltas(1));
    writer.add(deltas(2));
    const waited = writer.append(deltas(1)).catch((error: unknown) => error);
    await new Promise((resolve) => setImmediate(resolve));
    expect(asked.map((refusal) => refusal.reason)).toEqual(['ended']);
    // Not through to the run before the answer (the runner's stillHolds stops the run first when it lost it).
    expect(() => writer.check()).not.toThrow();
    answer(false);
    expect(await waited).toMatchObject({ reason: 'ended' });
    await expect(writer.settle()).rejects.toMatchObject({ reason: 'ended' });
    expect(asked).toHaveLength(1);
  });
});
