-- The owner's failed entries, whose chunks every search statement leaves out (src/services/
-- knowledge/search.ts: notFailed, a look-up per place the scope appears in a statement — up to a
-- dozen). Without it each look-up read every entry the owner has (the owner's index, then a status
-- filter): with 50,000 entries, 10 failed, a look-up took 4.3 ms on PostgreSQL and 14.5 ms on
-- PGlite (0.5 and 0.4 ms with it), and a search falling back to one-word queries 72.7 ms on PGlite
-- (9.9 ms with it). Partial: only failed entries are in it, few and small.
CREATE INDEX "ix_knowledge_entries_owner_id_failed" ON "knowledge_entries" USING btree ("owner_id") WHERE "knowledge_entries"."status" = 'failed';
