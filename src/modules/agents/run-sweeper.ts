/**
 * The sweep that keeps runs from being lost or stuck: the database is the truth, the queue only
 * carries ids. At start-up and every RUN_SWEEP_INTERVAL_SECONDS it queues again runs left `queued`
 * (an in-process queue forgets its jobs on restart; a job may be lost) — a run at most once a lease,
 * whichever worker sweeps, as its job may only be waiting its turn in a backlog — resumes running runs whose worker is gone (lease
 * expired or handed back) or fails them after RUN_MAX_ATTEMPTS (saying so, or that their deadline passed), writes the final event of runs
 * cancelled while their worker died, and forgets events older than RUN_EVENTS_TTL_SECONDS.
 */
import type { Message, Run } from '../../models/index.js';

import * as runCrud from '../../crud/run.js';
import { appendFinalEvent, closePending, completedEvents, deadlineOf, finishRun, queueRun, type RunDeps, takeUpLog } from './run-lifecycle.js';
import type { AgentRunner } from './runner.js';

const BATCH = 500;

/** The step a run's answer was written by (its metadata says; else the run's last). */
const answerStep = (answer: Message, run: Run): number => (typeof answer.metadata.step === 'number' ? answer.metadata.step : run.steps);

export class RunSweeper {
  private timer: NodeJS.Timeout | undefined;
  private sweeping: Promise<void> | null = null;
  private started = false;

  constructor(
    private readonly deps: RunDeps,
    private readonly runner: AgentRunner,
  ) {}

  start(): void {
    void this.sweepSafely();
    this.timer = setInterval(() => void this.sweepSafely(), this.deps.settings.RUN_SWEEP_INTERVAL_SECONDS * 1000);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.sweeping;
  }

  private sweepSafely(): Promise<void> {
    this.sweeping ??= this.sweep()
      .then(() => undefined)
      .catch((error: unknown) => this.deps.log.error({ err: error }, 'run sweep failed'))
      .finally(() => (this.sweeping = null));
    return this.sweeping;
  }

  /** One pass; returns what it did (for logs and tests). */
  async sweep(): Promise<{ queued: number; resumed: number; failed: number; closed: number; expired: number }> {
    const { deps } = this;
    const { settings, log } = deps;
    // At start-up every queued run lost its in-memory job (whatever an earlier process's sweep
    // marked); later only those waiting longer than a lease, and not queued again by a sweep within one.
    const atStart = !this.started;
    this.started = true;
    // An in-process queue lost its jobs with the process; BullMQ's survive a restart (a rolling one would queue every run again once per worker).
    const lostJobs = atStart && deps.queue.kind === 'in-process';
    const queued = await runCrud.queuedWithoutWorker(deps.db, { olderThanSeconds: atStart ? 0 : settings.RUN_LEASE_SECONDS, leaseSeconds: settings.RUN_LEASE_SECONDS, ignoreMarks: lostJobs, limit: BATCH });
    for (const run of queued) await queueRun(deps, run.id);

    let resumed = 0;
    let failed = 0;
    for (const run of await runCrud.orphanedRunning(deps.db, BATCH)) {
      if (run.attempts >= settings.RUN_MAX_ATTEMPTS) {
        // Past its deadline, that is why it stopped (its worker was stuck, so its lease ran out): said as the runner says it.
        const pastDeadline = run.started_at !== null && deadlineOf(run, settings.RUN_TIMEOUT_SECONDS).getTime() <= Date.now();
        const error = pastDeadline
          ? `The run passed its deadline of ${settings.RUN_TIMEOUT_SECONDS} s (RUN_TIMEOUT_SECONDS) and was stopped; start it again with POST /runs/${run.id}/retry`
          : `The run was interrupted ${run.attempts} times (its worker stopped before finishing) and was given up; start it again with POST /runs/${run.id}/retry`;
        const ended = await finishRun(deps, run, { status: 'failed', error }, { leaseExpired: true });
        if (ended) {
          await closePending(deps, ended.run);
          failed += 1;
        }
      } else {
        await queueRun(deps, run.id);
        resumed += 1;
      }
    }

    let closed = 0;
    for (const run of await runCrud.endedWithExpiredLease(deps.db, BATCH)) {
      // The log refuses an event after a final one: a final event already written is not doubled.
      // A completed run's worker appends its answer's `message.completed` with `run.completed` (one
      // append): both are missing, and readers (the /v1 agent answer too) take the answer from it.
      const answer = run.status === 'completed' ? await runCrud.lastAnswer(deps.db, run.id) : undefined;
      const before = answer ? completedEvents([answer], answerStep(answer, run)) : [];
      if (!(await appendFinalEvent(deps, run, before, takeUpLog(deps, run)))) continue;
      await runCrud.clearEndedLease(deps.db, run.id);
      closed += 1;
    }

    const expired = (await deps.bus.events.expire?.(settings.RUN_EVENTS_TTL_SECONDS)) ?? 0;
    if (queued.length || resumed || failed || closed) log.warn({ queued: queued.length, resumed, failed, closed, runningHere: this.runner.running }, 'run sweep: runs taken up again');
    return { queued: queued.length, resumed, failed, closed, expired };
  }
}
