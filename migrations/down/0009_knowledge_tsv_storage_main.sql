-- Reverts 0009_knowledge_tsv_storage_main: the tsvector back to the storage 0008 left in effect
-- (EXTENDED) for rows written from now on; rows already written stay in line until rewritten.
ALTER TABLE "knowledge_chunks" ALTER COLUMN "tsv" SET STORAGE EXTENDED;
