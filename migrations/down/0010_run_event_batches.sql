-- Reverts 0010_run_event_batches: one row per event again. Each batch's first event stays in its
-- row; the others become rows of their own.
ALTER TABLE "run_events" ADD COLUMN "event" varchar(32);--> statement-breakpoint
ALTER TABLE "run_events" ADD COLUMN "data" jsonb;--> statement-breakpoint
ALTER TABLE "run_events" ALTER COLUMN "last_seq" DROP NOT NULL;--> statement-breakpoint
ALTER TABLE "run_events" ALTER COLUMN "last_event" DROP NOT NULL;--> statement-breakpoint
ALTER TABLE "run_events" ALTER COLUMN "events" DROP NOT NULL;--> statement-breakpoint
INSERT INTO "run_events" ("run_id", "seq", "event", "data", "created_at")
  SELECT b."run_id", (e.value->>'seq')::integer, e.value->>'event', (e.value->'data')::jsonb, b."created_at"
  FROM "run_events" b, json_array_elements(b."events") e
  WHERE b."events" IS NOT NULL AND (e.value->>'seq')::integer <> b."seq";--> statement-breakpoint
UPDATE "run_events" SET "event" = "events"->0->>'event', "data" = ("events"->0->'data')::jsonb WHERE "events" IS NOT NULL;--> statement-breakpoint
ALTER TABLE "run_events" DROP COLUMN "last_seq";--> statement-breakpoint
ALTER TABLE "run_events" DROP COLUMN "last_event";--> statement-breakpoint
ALTER TABLE "run_events" DROP COLUMN "events";--> statement-breakpoint
ALTER TABLE "run_events" ALTER COLUMN "event" SET NOT NULL;--> statement-breakpoint
ALTER TABLE "run_events" ALTER COLUMN "data" SET NOT NULL;
