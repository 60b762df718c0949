-- Reverts 0022_knowledge_file_deletions_not_before. An upload's row still recorded (in flight, or
-- left by a crash) would then be due at once: dropped first, so no running upload loses its file
-- (a crash's leftover file is then left, as before the column).
DELETE FROM "knowledge_file_deletions" WHERE "not_before" IS NOT NULL;--> statement-breakpoint
DROP INDEX IF EXISTS "ix_knowledge_file_deletions_not_before";--> statement-breakpoint
ALTER TABLE "knowledge_file_deletions" DROP COLUMN IF EXISTS "not_before";
