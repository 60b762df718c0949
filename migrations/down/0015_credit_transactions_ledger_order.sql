-- Reverts 0015_credit_transactions_ledger_order.
CREATE INDEX IF NOT EXISTS "ix_credit_transactions_owner_id_created_at" ON "credit_transactions" USING btree ("owner_id","created_at");
DROP INDEX IF EXISTS "ix_credit_transactions_owner_id_created_at_id";
