-- Reverts 0016_credit_accounts_entries.
DROP TRIGGER IF EXISTS "credit_transactions_count_entries" ON "credit_transactions";--> statement-breakpoint
DROP FUNCTION IF EXISTS "keel_count_ledger_entries"();--> statement-breakpoint
ALTER TABLE "credit_accounts" DROP COLUMN IF EXISTS "entries";
