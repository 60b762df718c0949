import { z } from 'zod';

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

export type Jobs = typeof JOBS;
export type JobName = keyof Jobs;
