-- Reverses 0002_models_and_providers.
DROP TABLE IF EXISTS "providers";--> statement-breakpoint
DROP TABLE IF EXISTS "model_overrides";
