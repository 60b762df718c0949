-- Reverts 0021_knowledge_file_deletions_key_index.
DROP INDEX IF EXISTS "ix_knowledge_file_deletions_storage_key";
