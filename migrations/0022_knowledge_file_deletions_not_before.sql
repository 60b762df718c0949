-- An upload records its file's key before storing it, due only once the upload cannot be running
-- (src/models/knowledge.ts: knowledge_file_deletions.not_before): a process killed between storing
-- the file and writing its entry no longer leaves the file for good.
ALTER TABLE "knowledge_file_deletions" ADD COLUMN "not_before" timestamp with time zone;
