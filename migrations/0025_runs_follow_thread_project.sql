-- A run's project (runs.project_id, what a project-scoped key's access to the run reads) follows its
-- thread's since an idle thread's move takes its runs along (src/crud/run.ts: setThreadRunsProject).
-- Runs of threads moved before that stayed in the old project, where its keys still read them (and
-- their events) and the new project's could not: they join their thread's project now.
-- Only idle threads move, so those runs have ended: their scope_project_id (what limited a working
-- run's reads) goes, as a move clears it now; the usage and ledger rows stay as they were recorded.
UPDATE "runs" SET "project_id" = "threads"."project_id", "scope_project_id" = NULL, "updated_at" = now() FROM "threads" WHERE "runs"."thread_id" = "threads"."id" AND "runs"."project_id" IS DISTINCT FROM "threads"."project_id";
