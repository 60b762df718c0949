-- One ledger usage entry per call. A second one can only have come from a settlement written twice
-- (a retry racing its first attempt): it stays in the ledger, whose balance_after chain it is part
-- of, but no longer names the call, and says why; the call's first entry keeps the link. The table
-- is locked against writes first, so a node still running the old code cannot add a duplicate
-- between the fix and the index.
LOCK TABLE "credit_transactions" IN SHARE ROW EXCLUSIVE MODE;--> statement-breakpoint
UPDATE "credit_transactions" SET "usage_record_id" = NULL,
  "description" = coalesce("description" || ' ', '') || '(a second charge for call ' || "usage_record_id" || ')'
WHERE "id" IN (
  SELECT "id" FROM (
    SELECT "id", row_number() OVER (PARTITION BY "usage_record_id" ORDER BY "created_at", "id") AS "n"
    FROM "credit_transactions" WHERE "type" = 'usage' AND "usage_record_id" IS NOT NULL
  ) AS "entries" WHERE "n" > 1
);--> statement-breakpoint
CREATE UNIQUE INDEX "ux_credit_transactions_usage_record_id" ON "credit_transactions" USING btree ("usage_record_id") WHERE "credit_transactions"."type" = 'usage';
