-- Reverts 0017_credit_ledger_entry_count (0016's count stays, no longer kept).
DROP TRIGGER IF EXISTS "credit_transactions_count_entries" ON "credit_transactions";--> statement-breakpoint
DROP FUNCTION IF EXISTS "keel_count_ledger_entries"();
