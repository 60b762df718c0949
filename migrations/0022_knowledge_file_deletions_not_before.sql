-- An upload records its file's key before storing it, due only once the upload cannot be running
-- (src/models/knowledge.ts: knowledge_file_deletions.not_before): a process killed between storing
-- the file and writing its entry no longer leaves the file for good. The partial index serves the
-- count of an owner's uploads in flight, which every upload makes (uploadsInFlight).
ALTER TABLE "knowledge_file_deletions" ADD COLUMN "not_before" timestamp with time zone;--> statement-breakpoint
CREATE INDEX "ix_knowledge_file_deletions_not_before" ON "knowledge_file_deletions" USING btree ("not_before") WHERE "knowledge_file_deletions"."not_before" is not null;
