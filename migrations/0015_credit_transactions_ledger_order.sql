-- The ledger's list order (newest first, ties by id) as its index: a page is read off the index
-- instead of sorting every one of the account's entries. The old index is its prefix, so nothing
-- else loses it.
CREATE INDEX "ix_credit_transactions_owner_id_created_at_id" ON "credit_transactions" USING btree ("owner_id","created_at","id");--> statement-breakpoint
DROP INDEX "ix_credit_transactions_owner_id_created_at";
