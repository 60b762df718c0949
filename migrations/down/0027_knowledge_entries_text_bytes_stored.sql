-- Reverts 0027_knowledge_entries_text_bytes_stored: a killed worker's last reservation counts until the entry's next indexing ends again.
ALTER TABLE "knowledge_entries" DROP COLUMN IF EXISTS "text_bytes_stored";
