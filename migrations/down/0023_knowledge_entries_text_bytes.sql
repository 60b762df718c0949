-- Reverts 0023_knowledge_entries_text_bytes: the quota counts the uploaded files only again.
ALTER TABLE "knowledge_entries" DROP COLUMN IF EXISTS "text_bytes";
