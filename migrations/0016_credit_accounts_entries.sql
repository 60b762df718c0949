-- Each account's ledger entry count (the ledger list's total), kept by 0017's trigger. In a
-- migration of its own: ALTER TABLE locks credit_accounts whole, and a flush statement prepared on a
-- node still running takes credit_transactions' lock before it; 0017's lock of credit_transactions
-- taken in this transaction after it would close the cycle (a deadlock, one side aborted).
ALTER TABLE "credit_accounts" ADD COLUMN "entries" bigint DEFAULT 0 NOT NULL;
