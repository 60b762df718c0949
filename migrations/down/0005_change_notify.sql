-- Reverses 0005_change_notify.
DROP TRIGGER IF EXISTS "api_keys_notify_changed" ON "api_keys";--> statement-breakpoint
DROP FUNCTION IF EXISTS "keel_notify_api_key_changed"();--> statement-breakpoint
DROP TRIGGER IF EXISTS "providers_notify_changed" ON "providers";--> statement-breakpoint
DROP TRIGGER IF EXISTS "model_overrides_notify_changed" ON "model_overrides";--> statement-breakpoint
DROP FUNCTION IF EXISTS "keel_notify_models_changed"();
