-- Reverts 0011_knowledge_embedding_model_index.
DROP INDEX IF EXISTS "ix_knowledge_chunk_embeddings_model";
