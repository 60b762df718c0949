-- Whether search leaves an entry's chunks out (src/services/knowledge/search.ts: hiddenChunks). A
-- failed indexing keeps the chunks it embedded and paid for, for the next one to resume from;
-- search left them out by the entry's status, so a reindex (`pending`, then `processing`) showed
-- them again before its job had checked them (another cutting's, or a document's that then failed
-- again). Set when an indexing fails, kept by a reindex, cleared when an indexing ends `ready`.
ALTER TABLE "knowledge_entries" ADD COLUMN "chunks_hidden" boolean DEFAULT false NOT NULL;--> statement-breakpoint
-- The entries failed now, and the reindexes of failed ones: not `ready`, nothing indexed
-- (`chunk_count` 0, as a failure leaves it and a reindex keeps it), yet an indexing has ended
-- (`processed_at`). A ready entry's reindex keeps its `chunk_count`; an upload has no `processed_at`.
-- A node still on the old code during an upgrade writes the status alone: its fail() would leave a
-- failed entry's chunks shown, and its finishing a reindex of an entry marked here would leave the
-- entry ready with its chunks hidden for good. A trigger keeps the flag in step with the status
-- then (as 0017's count is kept for every writer): an update of the status to `failed` sets it, to
-- `ready` clears it, whatever the statement wrote; any other status keeps it (a reindex, a claim).
-- Entries are inserted `pending`, so inserts need nothing.
CREATE FUNCTION "keel_knowledge_chunks_hidden"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW."chunks_hidden" := NEW."status" = 'failed';
  RETURN NEW;
END;
$$;--> statement-breakpoint
CREATE TRIGGER "knowledge_entries_chunks_hidden" BEFORE UPDATE OF "status" ON "knowledge_entries"
  FOR EACH ROW WHEN (NEW."status" IN ('failed', 'ready')) EXECUTE FUNCTION "keel_knowledge_chunks_hidden"();--> statement-breakpoint
UPDATE "knowledge_entries" SET "chunks_hidden" = true WHERE "status" <> 'ready' AND "chunk_count" = 0 AND "processed_at" IS NOT NULL;--> statement-breakpoint
-- The look-up of an owner's entries whose chunks are hidden, as 0018's of its failed ones (a few
-- rows read, not every entry the owner has), which it replaces.
DROP INDEX IF EXISTS "ix_knowledge_entries_owner_id_failed";--> statement-breakpoint
CREATE INDEX "ix_knowledge_entries_owner_id_chunks_hidden" ON "knowledge_entries" USING btree ("owner_id") WHERE "knowledge_entries"."chunks_hidden";
