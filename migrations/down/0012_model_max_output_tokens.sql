-- Reverts 0012_model_max_output_tokens.
ALTER TABLE "model_overrides" DROP COLUMN IF EXISTS "max_output_tokens";
