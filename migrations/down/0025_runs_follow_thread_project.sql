-- Reverts 0025_runs_follow_thread_project: nothing to undo. The projects the repaired runs were
-- left in are not recorded, and putting runs back out of their thread's project would reopen them
-- to the old project's keys; the code before it reads runs.project_id as it is.
SELECT 1
