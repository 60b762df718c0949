-- The API key whose request asked for an entry's current indexing (null: a signed-in user):
-- ingestion charges its embedding calls to that key's max_budget. No foreign key, as in
-- usage_records: a deleted key neither blocks nor cascades.
ALTER TABLE "knowledge_entries" ADD COLUMN "api_key_id" uuid;
