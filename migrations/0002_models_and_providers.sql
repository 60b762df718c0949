CREATE TABLE "model_overrides" (
	"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"model_id" text NOT NULL,
	"name" text,
	"provider" text,
	"aliases" text[],
	"context_window" integer,
	"capabilities" text[],
	"pricing" jsonb,
	"enabled" boolean,
	"recommended" boolean,
	"priority" integer,
	"fallbacks" text[],
	"deleted" boolean DEFAULT false NOT NULL,
	CONSTRAINT "model_overrides_model_id_unique" UNIQUE("model_id")
);
--> statement-breakpoint
CREATE TABLE "providers" (
	"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"owner_id" uuid,
	"name" varchar(64) NOT NULL,
	"kind" text NOT NULL,
	"base_url" text,
	"api_key_sealed" text,
	"headers_sealed" text,
	"enabled" boolean DEFAULT true NOT NULL,
	CONSTRAINT "providers_name_unique" UNIQUE("name")
);
--> statement-breakpoint
ALTER TABLE "providers" ADD CONSTRAINT "providers_owner_id_users_id_fk" FOREIGN KEY ("owner_id") REFERENCES "public"."users"("id") ON DELETE set null ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "ix_providers_owner_id" ON "providers" USING btree ("owner_id");