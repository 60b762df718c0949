-- The project a project-scoped key that started a run was limited to (src/models/run.ts:
-- runs.scope_project_id): the run's knowledge searches stay in it even once the key is deleted
-- (api_key_id set null). Existing runs still working take their key's project while the key still
-- exists (a run whose key is gone already has no scope left to recover); ended runs need none, and
-- with one the project's delete would take them (cascade) from a thread moved elsewhere since.
ALTER TABLE "runs" ADD COLUMN "scope_project_id" uuid;--> statement-breakpoint
ALTER TABLE "runs" ADD CONSTRAINT "runs_scope_project_id_projects_id_fk" FOREIGN KEY ("scope_project_id") REFERENCES "public"."projects"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
UPDATE "runs" SET "scope_project_id" = "api_keys"."project_id" FROM "api_keys" WHERE "runs"."api_key_id" = "api_keys"."id" AND "api_keys"."project_id" IS NOT NULL AND "runs"."status" IN ('queued', 'running');--> statement-breakpoint
CREATE INDEX "ix_runs_scope_project_id" ON "runs" USING btree ("scope_project_id");
