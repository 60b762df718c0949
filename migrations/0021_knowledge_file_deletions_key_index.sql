-- A deleting request purges the files its own deletion recorded, found by their keys (src/services/
-- knowledge/files.ts: purgeFilesOf); without this index each look-up read every deletion still
-- waiting for the sweeper, everyone's, however long that backlog.
CREATE INDEX "ix_knowledge_file_deletions_storage_key" ON "knowledge_file_deletions" USING btree ("storage_key");
