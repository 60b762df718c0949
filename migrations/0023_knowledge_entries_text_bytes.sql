-- What an entry's extracted text takes in its chunks (UTF-8 bytes, overlap included), counted by
-- the storage quota when more than its file (src/models/knowledge.ts: knowledge_entries.text_bytes).
-- A constant default: no table rewrite. The entries there count 0, so each counts for its file (at
-- least 4 KiB) as before, until its next indexing (a reindex) records its text; no backfill here,
-- which would read every chunk while the migration holds the table.
ALTER TABLE "knowledge_entries" ADD COLUMN "text_bytes" bigint DEFAULT 0 NOT NULL;
