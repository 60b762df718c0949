CREATE TYPE "public"."multitask_strategy" AS ENUM('reject', 'enqueue', 'interrupt');--> statement-breakpoint
CREATE TYPE "public"."run_status" AS ENUM('queued', 'running', 'completed', 'failed', 'cancelled');--> statement-breakpoint
CREATE TABLE "run_events" (
	"run_id" uuid NOT NULL,
	"seq" integer NOT NULL,
	"event" varchar(32) NOT NULL,
	"data" jsonb NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "run_events_pkey" PRIMARY KEY("run_id","seq")
);
--> statement-breakpoint
CREATE TABLE "runs" (
	"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"owner_id" uuid NOT NULL,
	"thread_id" uuid NOT NULL,
	"project_id" uuid,
	"api_key_id" uuid,
	"agent_id" uuid,
	"agent_version" integer NOT NULL,
	"model" varchar(255) NOT NULL,
	"status" "run_status" DEFAULT 'queued' NOT NULL,
	"waiting" boolean DEFAULT false NOT NULL,
	"multitask_strategy" "multitask_strategy" DEFAULT 'reject' NOT NULL,
	"input" text,
	"input_message_id" uuid,
	"error" text,
	"usage" jsonb DEFAULT '{"input_tokens":0,"output_tokens":0,"cached_input_tokens":0,"reasoning_tokens":0}'::jsonb NOT NULL,
	"cost" numeric(30, 12) DEFAULT '0' NOT NULL,
	"steps" integer DEFAULT 0 NOT NULL,
	"lease_owner" varchar(255),
	"lease_expires_at" timestamp with time zone,
	"attempts" integer DEFAULT 0 NOT NULL,
	"started_at" timestamp with time zone,
	"ended_at" timestamp with time zone,
	CONSTRAINT "ck_runs_waiting_queued" CHECK (not "runs"."waiting" or "runs"."status" = 'queued')
);
--> statement-breakpoint
ALTER TABLE "run_events" ADD CONSTRAINT "run_events_run_id_runs_id_fk" FOREIGN KEY ("run_id") REFERENCES "public"."runs"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "runs" ADD CONSTRAINT "runs_owner_id_users_id_fk" FOREIGN KEY ("owner_id") REFERENCES "public"."users"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "runs" ADD CONSTRAINT "runs_thread_id_threads_id_fk" FOREIGN KEY ("thread_id") REFERENCES "public"."threads"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "runs" ADD CONSTRAINT "runs_project_id_projects_id_fk" FOREIGN KEY ("project_id") REFERENCES "public"."projects"("id") ON DELETE set null ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "runs" ADD CONSTRAINT "runs_api_key_id_api_keys_id_fk" FOREIGN KEY ("api_key_id") REFERENCES "public"."api_keys"("id") ON DELETE set null ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "runs" ADD CONSTRAINT "runs_agent_id_agents_id_fk" FOREIGN KEY ("agent_id") REFERENCES "public"."agents"("id") ON DELETE set null ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "ix_runs_owner_id_created_at" ON "runs" USING btree ("owner_id","created_at");--> statement-breakpoint
CREATE INDEX "ix_runs_thread_id_created_at" ON "runs" USING btree ("thread_id","created_at");--> statement-breakpoint
CREATE INDEX "ix_runs_agent_id" ON "runs" USING btree ("agent_id");--> statement-breakpoint
CREATE INDEX "ix_runs_project_id" ON "runs" USING btree ("project_id");--> statement-breakpoint
CREATE INDEX "ix_runs_api_key_id" ON "runs" USING btree ("api_key_id");--> statement-breakpoint
CREATE UNIQUE INDEX "ux_runs_thread_id_active" ON "runs" USING btree ("thread_id") WHERE "runs"."status" in ('queued', 'running') and not "runs"."waiting";--> statement-breakpoint
CREATE INDEX "ix_runs_owner_id_active" ON "runs" USING btree ("owner_id") WHERE "runs"."status" in ('queued', 'running');--> statement-breakpoint
CREATE INDEX "ix_runs_status_lease" ON "runs" USING btree ("status","lease_expires_at") WHERE "runs"."status" in ('queued', 'running') or "runs"."lease_owner" is not null;--> statement-breakpoint
ALTER TABLE "messages" ADD CONSTRAINT "messages_run_id_runs_id_fk" FOREIGN KEY ("run_id") REFERENCES "public"."runs"("id") ON DELETE set null ON UPDATE no action;