CREATE TYPE "public"."credit_transaction_type" AS ENUM('grant', 'usage', 'refund', 'adjustment');--> statement-breakpoint
CREATE TABLE "credit_accounts" (
	"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"user_id" uuid NOT NULL,
	"balance" numeric(30, 12) DEFAULT '0' NOT NULL,
	"reserved" numeric(30, 12) DEFAULT '0' NOT NULL,
	CONSTRAINT "uq_credit_accounts_user_id" UNIQUE("user_id"),
	CONSTRAINT "ck_credit_accounts_reserved" CHECK ("credit_accounts"."reserved" >= 0)
);
--> statement-breakpoint
CREATE TABLE "credit_reservations" (
	"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"expires_at" timestamp with time zone NOT NULL,
	"user_id" uuid,
	"api_key_id" uuid,
	"account_amount" numeric(30, 12) NOT NULL,
	"key_amount" numeric(30, 12) NOT NULL
);
--> statement-breakpoint
CREATE TABLE "credit_transactions" (
	"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"owner_id" uuid NOT NULL,
	"type" "credit_transaction_type" NOT NULL,
	"amount" numeric(30, 12) NOT NULL,
	"balance_after" numeric(30, 12) NOT NULL,
	"description" text,
	"usage_record_id" uuid,
	"api_key_id" uuid,
	"project_id" uuid,
	"created_by" uuid
);
--> statement-breakpoint
CREATE TABLE "usage_records" (
	"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"owner_id" uuid,
	"api_key_id" uuid,
	"project_id" uuid,
	"agent_id" uuid,
	"run_id" uuid,
	"model" text NOT NULL,
	"provider" text NOT NULL,
	"operation" varchar(16) NOT NULL,
	"input_tokens" integer NOT NULL,
	"cached_input_tokens" integer NOT NULL,
	"cache_write_tokens" integer NOT NULL,
	"output_tokens" integer NOT NULL,
	"reasoning_tokens" integer NOT NULL,
	"cost" numeric(30, 12) NOT NULL,
	"latency_ms" integer NOT NULL,
	"time_to_first_token_ms" integer,
	"status" varchar(16) NOT NULL,
	"error" text,
	"estimated" boolean NOT NULL,
	"attempts" integer NOT NULL,
	"started_at" timestamp with time zone NOT NULL
);
--> statement-breakpoint
ALTER TABLE "api_keys" ADD COLUMN "max_budget" numeric(30, 12);--> statement-breakpoint
ALTER TABLE "api_keys" ADD COLUMN "spent" numeric(30, 12) DEFAULT '0' NOT NULL;--> statement-breakpoint
ALTER TABLE "api_keys" ADD COLUMN "budget_reserved" numeric(30, 12) DEFAULT '0' NOT NULL;--> statement-breakpoint
ALTER TABLE "api_keys" ADD COLUMN "rpm" integer;--> statement-breakpoint
ALTER TABLE "credit_accounts" ADD CONSTRAINT "credit_accounts_user_id_users_id_fk" FOREIGN KEY ("user_id") REFERENCES "public"."users"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "credit_reservations" ADD CONSTRAINT "credit_reservations_user_id_users_id_fk" FOREIGN KEY ("user_id") REFERENCES "public"."users"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "credit_reservations" ADD CONSTRAINT "credit_reservations_api_key_id_api_keys_id_fk" FOREIGN KEY ("api_key_id") REFERENCES "public"."api_keys"("id") ON DELETE set null ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "credit_transactions" ADD CONSTRAINT "credit_transactions_owner_id_users_id_fk" FOREIGN KEY ("owner_id") REFERENCES "public"."users"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "credit_transactions" ADD CONSTRAINT "credit_transactions_created_by_users_id_fk" FOREIGN KEY ("created_by") REFERENCES "public"."users"("id") ON DELETE set null ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "usage_records" ADD CONSTRAINT "usage_records_owner_id_users_id_fk" FOREIGN KEY ("owner_id") REFERENCES "public"."users"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "ix_credit_reservations_expires_at" ON "credit_reservations" USING btree ("expires_at");--> statement-breakpoint
CREATE INDEX "ix_credit_reservations_user_id" ON "credit_reservations" USING btree ("user_id");--> statement-breakpoint
CREATE INDEX "ix_credit_reservations_api_key_id" ON "credit_reservations" USING btree ("api_key_id");--> statement-breakpoint
CREATE INDEX "ix_credit_transactions_owner_id_created_at" ON "credit_transactions" USING btree ("owner_id","created_at");--> statement-breakpoint
CREATE INDEX "ix_credit_transactions_created_by" ON "credit_transactions" USING btree ("created_by");--> statement-breakpoint
CREATE INDEX "ix_usage_records_owner_id_created_at" ON "usage_records" USING btree ("owner_id","created_at");--> statement-breakpoint
CREATE INDEX "ix_usage_records_api_key_id_created_at" ON "usage_records" USING btree ("api_key_id","created_at");--> statement-breakpoint
CREATE INDEX "ix_usage_records_project_id_created_at" ON "usage_records" USING btree ("project_id","created_at");