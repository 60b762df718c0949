-- How far a run's event log (scaled mode: its Redis stream) may be numbered, recorded beside the run
-- (src/models/run.ts: runs.event_seq_ceiling), so a worker taking up a run whose stream Redis lost
-- numbers past anything a client saw. Existing runs get 1, which promises nothing past run.queued:
-- one still working when this is applied is taken up as before, after the stream's top.
ALTER TABLE "runs" ADD COLUMN "event_seq_ceiling" integer DEFAULT 1 NOT NULL;
