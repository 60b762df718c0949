-- Reverts 0026_run_event_seq_ceiling: a run taken up goes on after its stream's top alone again.
ALTER TABLE "runs" DROP COLUMN IF EXISTS "event_seq_ceiling";
