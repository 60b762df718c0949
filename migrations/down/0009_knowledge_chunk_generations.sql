-- Reverts 0009_knowledge_chunk_generations: chunks not shown (an ingestion in progress or one that
-- stopped midway) go, so that what is left is one set of chunk numbers per entry again.
DELETE FROM "knowledge_chunks" USING "knowledge_entries"
  WHERE "knowledge_entries"."id" = "knowledge_chunks"."entry_id"
    AND "knowledge_chunks"."generation" IS DISTINCT FROM "knowledge_entries"."chunk_generation";--> statement-breakpoint
DROP INDEX "ux_knowledge_chunks_entry_id_generation_chunk_index";--> statement-breakpoint
ALTER TABLE "knowledge_chunks" DROP COLUMN "generation";--> statement-breakpoint
ALTER TABLE "knowledge_entries" DROP COLUMN "chunk_generation";--> statement-breakpoint
CREATE UNIQUE INDEX "ux_knowledge_chunks_entry_id_chunk_index" ON "knowledge_chunks" USING btree ("entry_id","chunk_index");
