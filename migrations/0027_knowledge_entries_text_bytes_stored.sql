-- What an entry's stored chunks hold of its text, apart from what an indexing has reserved ahead
-- (src/models/knowledge.ts: knowledge_entries.text_bytes_stored): a worker killed between a batch's
-- reservation and its write left `text_bytes` a batch over its chunks, counted against the owner's
-- quota until the entry's next indexing ended; the next claim now sets it back to this.
ALTER TABLE "knowledge_entries" ADD COLUMN "text_bytes_stored" bigint DEFAULT 0 NOT NULL;--> statement-breakpoint
-- Every entry no indexing holds has `text_bytes` exact (an ended indexing writes what its chunks
-- hold), so it is what they store. One being indexed now keeps its count, reservation included, as
-- before this column, until its indexing ends. Entries rows only (no chunk is read), and only those
-- whose text was counted (0023 on).
UPDATE "knowledge_entries" SET "text_bytes_stored" = "text_bytes" WHERE "text_bytes" <> 0;
