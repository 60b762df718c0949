-- Reverses 0001_user_change_notify.
DROP TRIGGER IF EXISTS "users_notify_changed" ON "users";--> statement-breakpoint
DROP FUNCTION IF EXISTS "keel_notify_user_changed"();
