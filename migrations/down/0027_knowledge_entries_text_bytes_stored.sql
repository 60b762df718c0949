-- Reverts 0027_knowledge_entries_text_bytes_stored: a killed worker's last reservation counts until the entry's next indexing ends again.
DROP TRIGGER IF EXISTS "knowledge_entries_text_bytes_stored" ON "knowledge_entries";--> statement-breakpoint
DROP FUNCTION IF EXISTS "keel_knowledge_text_bytes_stored"();--> statement-breakpoint
ALTER TABLE "knowledge_entries" DROP COLUMN IF EXISTS "text_bytes_stored";
