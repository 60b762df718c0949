-- Reverts 0003_agents_threads_messages: drops the agents, their versions, threads and messages
-- (their indexes and foreign keys go with the tables), then the two enum types.
DROP TABLE IF EXISTS "messages";--> statement-breakpoint
DROP TABLE IF EXISTS "threads";--> statement-breakpoint
DROP TABLE IF EXISTS "agent_versions";--> statement-breakpoint
DROP TABLE IF EXISTS "agents";--> statement-breakpoint
DROP TYPE IF EXISTS "public"."message_role";--> statement-breakpoint
DROP TYPE IF EXISTS "public"."thread_status";
