-- Reverts 0015_usage_records_run_id.
DROP INDEX IF EXISTS "ix_usage_records_run_id";
