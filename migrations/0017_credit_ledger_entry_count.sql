-- The ledger list's total (GET /billing/transactions) as a count each account keeps
-- (credit_accounts.entries, 0016), so that a page of a long history is one row read instead of a
-- count of it (300,000 entries: 0.4 s on PGlite, whose one thread every request waits for; 0.16 s
-- on PostgreSQL). A trigger keeps it, not the statements that write entries: so does every writer,
-- a node still on the old code during an upgrade included. The ledger is append-only (a balance is
-- the sum of its entries), so inserts are all it counts; entries go only with their user, whose
-- account goes with them. It runs once per statement (a usage flush writes a batch's entries in
-- one) and upserts the count only, never `updated_at`, which is the time of the account's last
-- entry: the accounts it updates are those the statement has just updated (and locked) itself.
CREATE FUNCTION "keel_count_ledger_entries"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO "credit_accounts" ("user_id", "entries")
  SELECT "owner_id", count(*) FROM "new_entries" GROUP BY "owner_id"
  ON CONFLICT ("user_id") DO UPDATE SET "entries" = "credit_accounts"."entries" + "excluded"."entries";
  RETURN NULL;
END;
$$;--> statement-breakpoint
-- Locked against writes from here to the count, so that no entry is counted twice or missed. Only
-- credit_transactions' lock: credit_accounts' rows are updated, the table is not locked whole.
LOCK TABLE "credit_transactions" IN SHARE ROW EXCLUSIVE MODE;--> statement-breakpoint
CREATE TRIGGER "credit_transactions_count_entries" AFTER INSERT ON "credit_transactions"
  REFERENCING NEW TABLE AS "new_entries" FOR EACH STATEMENT EXECUTE FUNCTION "keel_count_ledger_entries"();--> statement-breakpoint
INSERT INTO "credit_accounts" ("user_id", "entries")
SELECT "owner_id", count(*) FROM "credit_transactions" GROUP BY "owner_id"
ON CONFLICT ("user_id") DO UPDATE SET "entries" = "excluded"."entries";
