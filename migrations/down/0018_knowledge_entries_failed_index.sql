-- Reverts 0018_knowledge_entries_failed_index.
DROP INDEX IF EXISTS "ix_knowledge_entries_owner_id_failed";
