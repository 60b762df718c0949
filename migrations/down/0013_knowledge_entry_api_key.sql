-- Reverts 0013_knowledge_entry_api_key.
ALTER TABLE "knowledge_entries" DROP COLUMN IF EXISTS "api_key_id";
