-- Reverts 0016_credit_accounts_entries.
ALTER TABLE "credit_accounts" DROP COLUMN IF EXISTS "entries";
