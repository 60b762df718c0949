import { z } from 'zod';

import type { Settings } from '../core/config.js';

/** An email as the mailer queues it (services/email/mailer.ts). */
export const SendEmailJob = z.strictObject({
  to: z.email(),
  subject: z.string().min(1).max(998),
  html: z.string(),
  text: z.string(),
});

/** An agent run to execute: only its id; the run's state is in the database. */
export const RunAgentJob = z.strictObject({ run_id: z.uuid() });
/** A knowledge-base entry to ingest: only its id; the job reads everything else from the database. */
export const IngestEntryJob = z.strictObject({ entry_id: z.uuid() });

/**
 * Every background job by name, with the schema of its data: `queue.add` accepts only these
 * names and their data (checked by the compiler, and validated when queued and when run).
 */
export const JOBS = {
  'send-email': SendEmailJob,
  'run-agent': RunAgentJob,
  'ingest-entry': IngestEntryJob,
} as const;

/**
 * Jobs whose state the database keeps (a run, an entry): their sweepers queue them again, at a
 * process's start among other times. An embedded process that stops drops those it has not begun
 * rather than beginning them past its shutdown deadline (a claimed entry would wait out its lease).
 */
export const RECOVERED_JOBS: readonly JobName[] = ['run-agent', 'ingest-entry'];

export type Jobs = typeof JOBS;
export type JobName = keyof Jobs;

/**
 * Jobs with a queue of their own (in Redis, and in the in-process queue), worked with their own
 * number at once per worker: agent runs mostly wait on a model (a worker runs RUN_CONCURRENCY of
 * them); emails (EMAIL_CONCURRENCY) are short and someone waits on them (a password-recovery link),
 * so a backlog of slow document ingestions, which keep JOB_CONCURRENCY, must not hold them. No kind
 * waits behind another.
 */
export const JOB_LANES = [
  { queue: 'keel-runs', jobs: ['run-agent'], concurrency: (settings: Settings) => settings.RUN_CONCURRENCY },
  { queue: 'keel-emails', jobs: ['send-email'], concurrency: (settings: Settings) => settings.EMAIL_CONCURRENCY },
] as const satisfies readonly JobLane[];

/** A queue of its own for some jobs (JOB_LANES). */
export interface JobLane {
  queue: string;
  jobs: readonly string[];
  concurrency: (settings: Settings) => number;
}
