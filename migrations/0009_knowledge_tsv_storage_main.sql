-- 0008 meant to keep each chunk's tsvector in the row (STORAGE MAIN) but set the storage before
-- its type change, and a type change resets a column's storage to the type's default (EXTENDED):
-- the tsvectors stayed in the TOAST table, and every match test outside the GIN index and every
-- ts_rank_cd paid a TOAST index lookup and chunk reads (4 buffer reads per row; a full-text search
-- at 100k chunks on PGlite ran 2× slower at the median). In one ALTER TABLE the type change and the
-- storage are both set before the table is rewritten, so the rewrite writes the tsvectors in line.
ALTER TABLE "knowledge_chunks" ALTER COLUMN "tsv" TYPE tsvector USING "tsv" || ''::tsvector, ALTER COLUMN "tsv" SET STORAGE MAIN;--> statement-breakpoint
-- The rewrite drops the column's statistics, whose lexeme frequencies search reads: gather them again.
ANALYZE "knowledge_chunks";
