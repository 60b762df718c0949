-- Reverts 0014_credit_usage_entry_once (entries it unlinked stay unlinked: which call they charged twice is in their description).
DROP INDEX IF EXISTS "ux_credit_transactions_usage_record_id";
