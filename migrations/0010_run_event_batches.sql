-- A run's events stored one row per batch the log writes together (src/models/run.ts): the rows an
-- embedded run wrote cost PGlite ~80 µs each (the insert, its key, the foreign key's check, the
-- jsonb), ~10 per run. Each existing row becomes a batch of its one event.
ALTER TABLE "run_events" ADD COLUMN "last_seq" integer;--> statement-breakpoint
ALTER TABLE "run_events" ADD COLUMN "last_event" varchar(32);--> statement-breakpoint
ALTER TABLE "run_events" ADD COLUMN "events" json;--> statement-breakpoint
UPDATE "run_events" SET "last_seq" = "seq", "last_event" = "event", "events" = json_build_array(json_build_object('seq', "seq", 'event', "event", 'data', "data"));--> statement-breakpoint
ALTER TABLE "run_events" ALTER COLUMN "last_seq" SET NOT NULL;--> statement-breakpoint
ALTER TABLE "run_events" ALTER COLUMN "last_event" SET NOT NULL;--> statement-breakpoint
ALTER TABLE "run_events" ALTER COLUMN "events" SET NOT NULL;--> statement-breakpoint
ALTER TABLE "run_events" DROP COLUMN "event";--> statement-breakpoint
ALTER TABLE "run_events" DROP COLUMN "data";
