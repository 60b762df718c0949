-- Ingestion stores a document's chunks while it is still reading the document, each batch in a
-- short transaction, beside the chunks search shows until it switches the entry over: chunks carry
-- the generation (the ingestion's claim) that stored them, and the entry the generation shown.
-- Chunks stored before this have no generation, as their entries: null matches null in search.
DROP INDEX "ux_knowledge_chunks_entry_id_chunk_index";--> statement-breakpoint
ALTER TABLE "knowledge_chunks" ADD COLUMN "generation" uuid;--> statement-breakpoint
ALTER TABLE "knowledge_entries" ADD COLUMN "chunk_generation" uuid;--> statement-breakpoint
CREATE UNIQUE INDEX "ux_knowledge_chunks_entry_id_generation_chunk_index" ON "knowledge_chunks" USING btree ("entry_id","generation","chunk_index");