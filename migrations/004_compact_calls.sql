-- 004: smaller call rows. A request id moves into api_calls, under a unique partial index: the
-- request_ids table and its call_id index cost ~77 B per call that carried one, the column and
-- its index ~60 B. Session ids are interned in `sessions`: a call stores the session's integer
-- id (1-3 B) instead of the id as text (a UUID: 37 B). The writer hands SQLite a batch as one
-- JSON array, where an integer past 64 bits would become a REAL: CHECKs refuse that.

CREATE TABLE sessions_new (
    id INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL UNIQUE,
    project TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    calls INTEGER NOT NULL DEFAULT 0,
    cost_nanos INTEGER NOT NULL DEFAULT 0
);
INSERT INTO sessions_new (session_id, project, first_seen, last_seen, calls, cost_nanos)
SELECT session_id, project, first_seen, last_seen, calls, cost_nanos FROM sessions
ORDER BY first_seen, session_id;

CREATE TABLE api_calls_new (
    id INTEGER PRIMARY KEY,
    timestamp INTEGER NOT NULL,              -- ms since epoch
    series_id INTEGER NOT NULL REFERENCES series (id),
    session INTEGER REFERENCES sessions (id), -- NULL when the client sent no session id
    input_tokens INTEGER NOT NULL CHECK (typeof(input_tokens) = 'integer'),
    output_tokens INTEGER NOT NULL CHECK (typeof(output_tokens) = 'integer'),
    cache_creation_tokens INTEGER NOT NULL CHECK (typeof(cache_creation_tokens) = 'integer'),
    cache_creation_1h_tokens INTEGER NOT NULL CHECK (typeof(cache_creation_1h_tokens) = 'integer'),
    cache_read_tokens INTEGER NOT NULL CHECK (typeof(cache_read_tokens) = 'integer'),
    latency_us INTEGER CHECK (typeof(latency_us) IN ('integer', 'null')), -- NULL: not reported
    cost_nanos INTEGER NOT NULL CHECK (typeof(cost_nanos) = 'integer'),
    savings_nanos INTEGER NOT NULL CHECK (typeof(savings_nanos) = 'integer'),
    status INTEGER NOT NULL,                 -- 0 ok, 1 error
    error_type TEXT,
    request_id TEXT                          -- the idempotency key, NULL when none was sent
);
INSERT INTO api_calls_new (
    id, timestamp, series_id, session, input_tokens, output_tokens, cache_creation_tokens,
    cache_creation_1h_tokens, cache_read_tokens, latency_us, cost_nanos, savings_nanos, status,
    error_type, request_id
)
SELECT c.id, c.timestamp, c.series_id, x.id, c.input_tokens, c.output_tokens,
       c.cache_creation_tokens, c.cache_creation_1h_tokens, c.cache_read_tokens, c.latency_us,
       c.cost_nanos, c.savings_nanos, c.status, c.error_type, r.request_id
FROM api_calls c
LEFT JOIN sessions_new x ON x.session_id = c.session_id
LEFT JOIN request_ids r ON r.call_id = c.id
ORDER BY c.id;

DROP VIEW calls;
DROP TABLE request_ids;
DROP TABLE api_calls;
DROP TABLE sessions;
ALTER TABLE api_calls_new RENAME TO api_calls;
ALTER TABLE sessions_new RENAME TO sessions;

CREATE INDEX idx_api_calls_timestamp ON api_calls (timestamp);
CREATE UNIQUE INDEX idx_api_calls_request ON api_calls (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX idx_sessions_last_seen ON sessions (last_seen);

CREATE VIEW calls AS
SELECT c.id, c.timestamp, s.provider, s.model, s.tier, s.project, NULLIF(s.agent, '') AS agent,
       x.session_id, c.request_id, c.input_tokens, c.output_tokens, c.cache_creation_tokens,
       c.cache_creation_1h_tokens, c.cache_read_tokens, c.latency_us / 1000.0 AS latency_ms,
       c.cost_nanos / 1e9 AS cost_usd, c.savings_nanos / 1e9 AS savings_usd,
       CASE c.status WHEN 0 THEN 'ok' ELSE 'error' END AS status, c.error_type
FROM api_calls c
JOIN series s ON s.id = c.series_id
LEFT JOIN sessions x ON x.id = c.session;
