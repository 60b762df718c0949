-- Reverts 0006_knowledge_base: the deletion trigger, the embeddings (where pgvector made them,
-- with their HNSW indexes), chunks, entries, folders and pending file deletions; indexes and
-- foreign keys go with the tables; then the status type.
DROP TRIGGER IF EXISTS "knowledge_entries_file_deletion" ON "knowledge_entries";--> statement-breakpoint
DROP FUNCTION IF EXISTS "keel_knowledge_entry_deleted"();--> statement-breakpoint
DROP TABLE IF EXISTS "knowledge_chunk_embeddings";--> statement-breakpoint
DROP TABLE IF EXISTS "knowledge_chunks";--> statement-breakpoint
DROP TABLE IF EXISTS "knowledge_entries";--> statement-breakpoint
DROP TABLE IF EXISTS "knowledge_folders";--> statement-breakpoint
DROP TABLE IF EXISTS "knowledge_file_deletions";--> statement-breakpoint
DROP TYPE IF EXISTS "public"."knowledge_entry_status";
