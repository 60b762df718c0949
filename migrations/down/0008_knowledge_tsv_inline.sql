-- Reverts 0008_knowledge_tsv_inline: the tsvector back to the default storage (EXTENDED) for rows
-- written from now on; rows already written stay in line until rewritten, which search only gains by.
ALTER TABLE "knowledge_chunks" ALTER COLUMN "tsv" SET STORAGE EXTENDED;
