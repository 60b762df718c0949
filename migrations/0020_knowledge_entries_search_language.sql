-- The KB_SEARCH_LANGUAGE an entry's chunks were indexed under, written when an indexing ends
-- `ready` (src/services/knowledge/ingestion.ts: finishEntry); a reindex of a ready entry keeps its
-- chunks and embeddings, and redoes only their full-text vectors, when it names another language
-- (claim). Existing rows stay NULL: they were indexed by older code, whose vectors may be a
-- fallback model's stored under EMBEDDING_MODEL's id, so their next reindex clears and re-embeds
-- them, once, as before. (The language cannot be read back from the rows: a tsvector does not
-- record its configuration, and a chunk of numbers or names reads alike in every language.)
ALTER TABLE "knowledge_entries" ADD COLUMN "search_language" text;
