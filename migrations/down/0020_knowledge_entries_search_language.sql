-- Reverts 0020_knowledge_entries_search_language: every ready entry's reindex clears and re-embeds it again.
ALTER TABLE "knowledge_entries" DROP COLUMN IF EXISTS "search_language";
