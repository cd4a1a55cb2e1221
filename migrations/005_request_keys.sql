-- 005: a request id is looked up through a 31-bit key, not through its text. The unique index
-- on the text cost ~39 B per call that carried an id (a 27-character id, inserted in random
-- order into pages left part-empty); the key costs 5 B in the row and ~14 B in its index. The
-- key is the CRC-32 of the id's UTF-8 bytes with the top bit cleared
-- (`exporter.store.db.request_key`, registered on the connection as cco_request_key for this
-- backfill). Keys are not unique: the writer compares the ids of the rows a key finds before
-- it stores a call, and it is the only writer.

ALTER TABLE api_calls ADD COLUMN request_key INTEGER;
UPDATE api_calls SET request_key = cco_request_key(request_id) WHERE request_id IS NOT NULL;
DROP INDEX idx_api_calls_request;
CREATE INDEX idx_api_calls_request_key ON api_calls (request_key) WHERE request_key IS NOT NULL;
