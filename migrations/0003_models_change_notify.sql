-- Tells every Keel node when a superuser changes the model catalog (model_overrides) or the
-- providers, so each reloads its model manager at once (src/services/model-sync.ts). One
-- notification per statement; PostgreSQL folds identical ones within a transaction.
CREATE FUNCTION "keel_notify_models_changed"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('keel_models_changed', TG_TABLE_NAME);
  RETURN NULL;
END;
$$;--> statement-breakpoint
CREATE TRIGGER "model_overrides_notify_changed" AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON "model_overrides"
  FOR EACH STATEMENT EXECUTE FUNCTION "keel_notify_models_changed"();--> statement-breakpoint
CREATE TRIGGER "providers_notify_changed" AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON "providers"
  FOR EACH STATEMENT EXECUTE FUNCTION "keel_notify_models_changed"();
