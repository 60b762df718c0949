-- Search asks first whether any of the caller's chunks has an embedding by EMBEDDING_MODEL
-- (src/services/knowledge/embeddings.ts: anyEmbedded). Without an index on the model, a model no
-- row has (EMBEDDING_MODEL just changed, the documents not yet reindexed) made that question read
-- every embedding in the table: ~1.2 s per search at 100k embeddings on PGlite. anyEmbedded's
-- one-time check orders by chunk_id, so the index (model, chunk_id) answers it even in a generic
-- plan. The table exists only where pgvector is enabled (0007).
DO $$
BEGIN
  IF to_regclass('knowledge_chunk_embeddings') IS NOT NULL THEN
    CREATE INDEX IF NOT EXISTS "ix_knowledge_chunk_embeddings_model" ON "knowledge_chunk_embeddings" ("model", "chunk_id");
  END IF;
END
$$;
