-- Reverses 0004_billing.
ALTER TABLE "api_keys" DROP COLUMN "rpm";--> statement-breakpoint
ALTER TABLE "api_keys" DROP COLUMN "budget_reserved";--> statement-breakpoint
ALTER TABLE "api_keys" DROP COLUMN "spent";--> statement-breakpoint
ALTER TABLE "api_keys" DROP COLUMN "max_budget";--> statement-breakpoint
DROP TABLE "usage_records";--> statement-breakpoint
DROP TABLE "credit_transactions";--> statement-breakpoint
DROP TABLE "credit_reservations";--> statement-breakpoint
DROP TABLE "credit_accounts";--> statement-breakpoint
DROP TYPE "public"."credit_transaction_type";
