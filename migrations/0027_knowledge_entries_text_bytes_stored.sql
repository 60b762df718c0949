-- What an entry's stored chunks hold of its text, apart from what an indexing has reserved ahead
-- (src/models/knowledge.ts: knowledge_entries.text_bytes_stored): a worker killed between a batch's
-- reservation and its write left `text_bytes` a batch over its chunks, counted against the owner's
-- quota until the entry's next indexing ended; the next claim now sets it back to this.
ALTER TABLE "knowledge_entries" ADD COLUMN "text_bytes_stored" bigint DEFAULT 0 NOT NULL;--> statement-breakpoint
-- An entry no indexing holds has `text_bytes` exact (an ended indexing writes what its chunks
-- hold), with one exception: a pending one that older code's sweep handed back after its worker was
-- killed still counts that worker's last reservation (a batch at most), copied here with the rest
-- and counted until its indexing ends. One being indexed now keeps its count, reservation included,
-- until its indexing ends. Entries rows only (no chunk is read), and only those whose text was
-- counted (0023 on).
UPDATE "knowledge_entries" SET "text_bytes_stored" = "text_bytes" WHERE "text_bytes" <> 0;--> statement-breakpoint
-- A node still on the old code during an upgrade writes `text_bytes` alone: an indexing it ends
-- (ready, or failed keeping its chunks) would leave the column 0, and the next claim or sweep, which
-- set `text_bytes` back to it, would count the entry for its file alone while its chunks stay. A
-- trigger keeps it in step for every writer (as 0019's flag): an indexing that ends, or a write of
-- `text_bytes` to 0 (the old claim dropping the chunks), sets it to `text_bytes`. The new code
-- writes the two equal there already; inserts are 0 and 0.
CREATE FUNCTION "keel_knowledge_text_bytes_stored"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW."text_bytes_stored" := NEW."text_bytes";
  RETURN NEW;
END;
$$;--> statement-breakpoint
CREATE TRIGGER "knowledge_entries_text_bytes_stored" BEFORE UPDATE OF "status", "text_bytes" ON "knowledge_entries"
  FOR EACH ROW WHEN (NEW."status" IN ('ready', 'failed') OR NEW."text_bytes" = 0) EXECUTE FUNCTION "keel_knowledge_text_bytes_stored"();
