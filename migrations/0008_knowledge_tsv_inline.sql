-- Search ranks chunks with ts_rank_cd, which reads the whole tsvector of each candidate. A chunk of
-- ~400 tokens has a ~2.3 kB tsvector, which the default storage (EXTENDED) moved out of line into
-- the TOAST table (pglz barely shrinks a tsvector): every match test outside the index and every
-- rank paid a TOAST index lookup and two chunk reads. MAIN keeps it in the row (the chunk's text,
-- EXTENDED, goes out of line first; MAIN moves out only when the row would not fit a page).
ALTER TABLE "knowledge_chunks" ALTER COLUMN "tsv" SET STORAGE MAIN;--> statement-breakpoint
-- Existing rows keep their storage until rewritten: rewrite them (and rebuild the indexes) now.
ALTER TABLE "knowledge_chunks" ALTER COLUMN "tsv" TYPE tsvector USING "tsv" || ''::tsvector;--> statement-breakpoint
-- The type change drops the column's statistics, whose lexeme frequencies search reads: gather them again.
ANALYZE "knowledge_chunks";
