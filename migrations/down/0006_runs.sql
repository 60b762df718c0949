-- Reverts 0006_runs: unlinks messages from runs, drops the run event log and the runs (their
-- indexes and foreign keys go with the tables), then the two enum types.
ALTER TABLE "messages" DROP CONSTRAINT IF EXISTS "messages_run_id_runs_id_fk";--> statement-breakpoint
DROP TABLE IF EXISTS "run_events";--> statement-breakpoint
DROP TABLE IF EXISTS "runs";--> statement-breakpoint
DROP TYPE IF EXISTS "public"."run_status";--> statement-breakpoint
DROP TYPE IF EXISTS "public"."multitask_strategy";
