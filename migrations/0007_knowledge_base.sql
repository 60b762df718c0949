CREATE TYPE "public"."knowledge_entry_status" AS ENUM('pending', 'processing', 'ready', 'failed');--> statement-breakpoint
CREATE TABLE "knowledge_chunks" (
	"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"entry_id" uuid NOT NULL,
	"owner_id" uuid NOT NULL,
	"chunk_index" integer NOT NULL,
	"text" text NOT NULL,
	"heading_path" text[] DEFAULT '{}'::text[] NOT NULL,
	"token_count" integer NOT NULL,
	"tsv" "tsvector" NOT NULL
);
--> statement-breakpoint
CREATE TABLE "knowledge_entries" (
	"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"owner_id" uuid NOT NULL,
	"folder_id" uuid NOT NULL,
	"project_id" uuid,
	"filename" varchar(255) NOT NULL,
	"mime_type" varchar(255) NOT NULL,
	"format" varchar(32),
	"size_bytes" bigint NOT NULL,
	"sha256" varchar(64) NOT NULL,
	"storage_key" text NOT NULL,
	"status" "knowledge_entry_status" DEFAULT 'pending' NOT NULL,
	"error" text,
	"chunk_count" integer DEFAULT 0 NOT NULL,
	"token_count" integer DEFAULT 0 NOT NULL,
	"attempts" integer DEFAULT 0 NOT NULL,
	"lease_token" uuid,
	"lease_expires_at" timestamp with time zone,
	"processing_started_at" timestamp with time zone,
	"processed_at" timestamp with time zone
);
--> statement-breakpoint
CREATE TABLE "knowledge_file_deletions" (
	"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"storage_key" text NOT NULL
);
--> statement-breakpoint
CREATE TABLE "knowledge_folders" (
	"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"owner_id" uuid NOT NULL,
	"project_id" uuid,
	"name" varchar(255) NOT NULL,
	"description" text DEFAULT '' NOT NULL
);
--> statement-breakpoint
ALTER TABLE "knowledge_chunks" ADD CONSTRAINT "knowledge_chunks_entry_id_knowledge_entries_id_fk" FOREIGN KEY ("entry_id") REFERENCES "public"."knowledge_entries"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "knowledge_chunks" ADD CONSTRAINT "knowledge_chunks_owner_id_users_id_fk" FOREIGN KEY ("owner_id") REFERENCES "public"."users"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "knowledge_entries" ADD CONSTRAINT "knowledge_entries_owner_id_users_id_fk" FOREIGN KEY ("owner_id") REFERENCES "public"."users"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "knowledge_entries" ADD CONSTRAINT "knowledge_entries_folder_id_knowledge_folders_id_fk" FOREIGN KEY ("folder_id") REFERENCES "public"."knowledge_folders"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "knowledge_entries" ADD CONSTRAINT "knowledge_entries_project_id_projects_id_fk" FOREIGN KEY ("project_id") REFERENCES "public"."projects"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "knowledge_folders" ADD CONSTRAINT "knowledge_folders_owner_id_users_id_fk" FOREIGN KEY ("owner_id") REFERENCES "public"."users"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "knowledge_folders" ADD CONSTRAINT "knowledge_folders_project_id_projects_id_fk" FOREIGN KEY ("project_id") REFERENCES "public"."projects"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
CREATE UNIQUE INDEX "ux_knowledge_chunks_entry_id_chunk_index" ON "knowledge_chunks" USING btree ("entry_id","chunk_index");--> statement-breakpoint
CREATE INDEX "ix_knowledge_chunks_owner_id" ON "knowledge_chunks" USING btree ("owner_id");--> statement-breakpoint
CREATE INDEX "ix_knowledge_chunks_tsv" ON "knowledge_chunks" USING gin ("tsv");--> statement-breakpoint
CREATE UNIQUE INDEX "ux_knowledge_entries_folder_id_filename" ON "knowledge_entries" USING btree ("folder_id","filename");--> statement-breakpoint
CREATE INDEX "ix_knowledge_entries_owner_id_created_at" ON "knowledge_entries" USING btree ("owner_id","created_at");--> statement-breakpoint
CREATE INDEX "ix_knowledge_entries_folder_id_created_at" ON "knowledge_entries" USING btree ("folder_id","created_at");--> statement-breakpoint
CREATE INDEX "ix_knowledge_entries_project_id_created_at" ON "knowledge_entries" USING btree ("project_id","created_at");--> statement-breakpoint
CREATE INDEX "ix_knowledge_entries_unfinished" ON "knowledge_entries" USING btree ("status","lease_expires_at") WHERE "knowledge_entries"."status" in ('pending', 'processing');--> statement-breakpoint
CREATE UNIQUE INDEX "ux_knowledge_folders_owner_id_name" ON "knowledge_folders" USING btree ("owner_id","name");--> statement-breakpoint
CREATE INDEX "ix_knowledge_folders_owner_id_created_at" ON "knowledge_folders" USING btree ("owner_id","created_at");--> statement-breakpoint
CREATE INDEX "ix_knowledge_folders_project_id_created_at" ON "knowledge_folders" USING btree ("project_id","created_at");
--> statement-breakpoint
-- Chunk embeddings, only where pgvector is enabled (`keel migrate` enables it where the server has
-- it; PGlite always has it). Not in the models: drizzle-kit would otherwise demand the table (and
-- the extension) everywhere. `embedding` has no fixed dimension, since that depends on
-- EMBEDDING_MODEL: ingestion adds one HNSW index per dimension it meets, on
-- `embedding::vector(n)` for the rows of that dimension (src/services/knowledge/embeddings.ts).
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN
    CREATE TABLE "knowledge_chunk_embeddings" (
      "id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
      "created_at" timestamp with time zone DEFAULT now() NOT NULL,
      "updated_at" timestamp with time zone DEFAULT now() NOT NULL,
      "chunk_id" uuid NOT NULL REFERENCES "knowledge_chunks"("id") ON DELETE CASCADE,
      "model" varchar(255) NOT NULL,
      "embedding" vector NOT NULL,
      CONSTRAINT "ux_knowledge_chunk_embeddings_chunk_id" UNIQUE ("chunk_id")
    );
  END IF;
END
$$;
--> statement-breakpoint
-- Every deleted entry leaves its stored file's key to be deleted (src/models/knowledge.ts:
-- knowledge_file_deletions), in the deleting transaction, whatever deleted it: cascades from a
-- folder, a project or a user included.
CREATE FUNCTION "keel_knowledge_entry_deleted"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO "knowledge_file_deletions" ("storage_key") VALUES (OLD."storage_key");
  RETURN NULL;
END;
$$;--> statement-breakpoint
CREATE TRIGGER "knowledge_entries_file_deletion" AFTER DELETE ON "knowledge_entries"
  FOR EACH ROW EXECUTE FUNCTION "keel_knowledge_entry_deleted"();
