-- Reverts 0019_knowledge_entries_chunks_hidden: failed entries' chunks are left out by their status again (0018's index).
DROP TRIGGER IF EXISTS "knowledge_entries_chunks_hidden" ON "knowledge_entries";--> statement-breakpoint
DROP FUNCTION IF EXISTS "keel_knowledge_chunks_hidden"();--> statement-breakpoint
DROP INDEX IF EXISTS "ix_knowledge_entries_owner_id_chunks_hidden";--> statement-breakpoint
CREATE INDEX IF NOT EXISTS "ix_knowledge_entries_owner_id_failed" ON "knowledge_entries" USING btree ("owner_id") WHERE "knowledge_entries"."status" = 'failed';--> statement-breakpoint
ALTER TABLE "knowledge_entries" DROP COLUMN IF EXISTS "chunks_hidden";
