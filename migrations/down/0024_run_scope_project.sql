-- Reverts 0024_run_scope_project: a run's scope is read from its API key's row again.
DROP INDEX IF EXISTS "ix_runs_scope_project_id";
ALTER TABLE "runs" DROP CONSTRAINT IF EXISTS "runs_scope_project_id_projects_id_fk";
ALTER TABLE "runs" DROP COLUMN IF EXISTS "scope_project_id";
