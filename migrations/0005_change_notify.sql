-- Tells every Keel node about changes it keeps in memory:
--  * the model catalog (model_overrides) and the providers: each node reloads its model manager
--    (src/services/model-sync.ts); one notification per statement, folded within a transaction;
--  * an API key changed or deleted (a cascade from a deleted project or user included): each
--    node drops it from its key cache (src/crud/api-key.ts). The payload is the key's hash.
CREATE FUNCTION "keel_notify_models_changed"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('keel_models_changed', TG_TABLE_NAME);
  RETURN NULL;
END;
$$;--> statement-breakpoint
CREATE TRIGGER "model_overrides_notify_changed" AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON "model_overrides"
  FOR EACH STATEMENT EXECUTE FUNCTION "keel_notify_models_changed"();--> statement-breakpoint
CREATE TRIGGER "providers_notify_changed" AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON "providers"
  FOR EACH STATEMENT EXECUTE FUNCTION "keel_notify_models_changed"();--> statement-breakpoint
CREATE FUNCTION "keel_notify_api_key_changed"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('keel_api_key_changed', OLD.key_hash);
  RETURN NULL;
END;
$$;--> statement-breakpoint
-- Only columns a cached key is judged by: the per-call writes of billing (spent, budget_reserved)
-- and of authentication (last_used_at) would otherwise evict the key on every node at every call.
CREATE TRIGGER "api_keys_notify_changed"
  AFTER UPDATE OF "owner_id", "project_id", "name", "key_hash", "status", "expires_at", "max_budget", "rpm" OR DELETE ON "api_keys"
  FOR EACH ROW EXECUTE FUNCTION "keel_notify_api_key_changed"();
