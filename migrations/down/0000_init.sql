-- Reverses 0000_init: drops every table it created, dependants first.
DROP TABLE IF EXISTS "api_keys";--> statement-breakpoint
DROP TABLE IF EXISTS "projects";--> statement-breakpoint
DROP TABLE IF EXISTS "users";--> statement-breakpoint
DROP TYPE IF EXISTS "public"."api_key_status";
