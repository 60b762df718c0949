-- A model's own output limit (null: unknown). A call that sets no maximum sends the smaller of it
-- and MODEL_DEFAULT_MAX_OUTPUT_TOKENS upstream, the same number its credit hold assumed.
ALTER TABLE "model_overrides" ADD COLUMN "max_output_tokens" integer;
