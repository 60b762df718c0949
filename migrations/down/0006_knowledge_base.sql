-- Reverts 0006_knowledge_base: the embeddings (where pgvector made them, with their HNSW indexes),
-- chunks, entries and folders; indexes and foreign keys go with the tables; then the status type.
DROP TABLE IF EXISTS "knowledge_chunk_embeddings";--> statement-breakpoint
DROP TABLE IF EXISTS "knowledge_chunks";--> statement-breakpoint
DROP TABLE IF EXISTS "knowledge_entries";--> statement-breakpoint
DROP TABLE IF EXISTS "knowledge_folders";--> statement-breakpoint
DROP TYPE IF EXISTS "public"."knowledge_entry_status";
