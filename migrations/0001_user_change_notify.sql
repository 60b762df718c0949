-- Tells every Keel node when a user row changes or goes, so caches of authenticated users
-- (src/crud/user.ts) drop it at once: a password change, deactivation or deletion takes effect
-- on all nodes, not only on the one that made it. The payload is the user id.
CREATE FUNCTION "keel_notify_user_changed"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('keel_user_changed', OLD.id::text);
  RETURN NULL;
END;
$$;--> statement-breakpoint
CREATE TRIGGER "users_notify_changed" AFTER UPDATE OR DELETE ON "users"
  FOR EACH ROW EXECUTE FUNCTION "keel_notify_user_changed"();
