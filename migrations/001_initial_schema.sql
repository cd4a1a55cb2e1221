-- 001: tables of SPEC section 7. Money is INTEGER nano-dollars (1e-9 USD) so sums are exact;
-- the `calls` view shows it as cost_usd. Label sets are interned in `series` to keep rows small.

CREATE TABLE series (
    id INTEGER PRIMARY KEY,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    tier TEXT NOT NULL,
    project TEXT NOT NULL,
    agent TEXT NOT NULL DEFAULT '',
    -- Cumulative totals, updated in the same transaction as the calls they count, so a
    -- restart restores every counter from one small table.
    calls INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
    cost_nanos INTEGER NOT NULL DEFAULT 0,
    savings_nanos INTEGER NOT NULL DEFAULT 0,
    latency_us_sum INTEGER NOT NULL DEFAULT 0,
    latency_count INTEGER NOT NULL DEFAULT 0,
    -- Latency histogram: counts per bucket (OTel GenAI bounds, seconds), not cumulative.
    h0 INTEGER NOT NULL DEFAULT 0, h1 INTEGER NOT NULL DEFAULT 0, h2 INTEGER NOT NULL DEFAULT 0,
    h3 INTEGER NOT NULL DEFAULT 0, h4 INTEGER NOT NULL DEFAULT 0, h5 INTEGER NOT NULL DEFAULT 0,
    h6 INTEGER NOT NULL DEFAULT 0, h7 INTEGER NOT NULL DEFAULT 0, h8 INTEGER NOT NULL DEFAULT 0,
    h9 INTEGER NOT NULL DEFAULT 0, h10 INTEGER NOT NULL DEFAULT 0, h11 INTEGER NOT NULL DEFAULT 0,
    h12 INTEGER NOT NULL DEFAULT 0, h13 INTEGER NOT NULL DEFAULT 0, h14 INTEGER NOT NULL DEFAULT 0,
    UNIQUE (provider, model, tier, project, agent)
);

CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    calls INTEGER NOT NULL DEFAULT 0,
    cost_nanos INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE api_calls (
    id INTEGER PRIMARY KEY,
    timestamp INTEGER NOT NULL,              -- ms since epoch
    series_id INTEGER NOT NULL REFERENCES series (id),
    session_id TEXT,                         -- NULL when the client sent none
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_creation_tokens INTEGER NOT NULL,
    cache_creation_1h_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    latency_us INTEGER,                      -- NULL when the client did not report it
    cost_nanos INTEGER NOT NULL,
    savings_nanos INTEGER NOT NULL,
    status INTEGER NOT NULL,                 -- 0 ok, 1 error
    error_type TEXT
);

-- Idempotency keys, one row each (the key is stored once, as this table's primary key).
CREATE TABLE request_ids (
    request_id TEXT PRIMARY KEY,
    call_id INTEGER NOT NULL
) WITHOUT ROWID;

-- Every event that is not an api_call (cache_hit/miss, error, model_override, system).
CREATE TABLE activity_events (
    id INTEGER PRIMARY KEY,
    timestamp INTEGER NOT NULL,
    type TEXT NOT NULL,
    project TEXT NOT NULL,
    model TEXT,
    request_id TEXT,
    payload TEXT NOT NULL                    -- the event as JSON
);

-- Per-minute rollups per label set; kept long (400 days), read by history queries.
CREATE TABLE metrics_aggregated (
    minute INTEGER NOT NULL,                 -- ms since epoch of the minute's start
    series_id INTEGER NOT NULL REFERENCES series (id),
    calls INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cache_creation_tokens INTEGER NOT NULL,
    cost_nanos INTEGER NOT NULL,
    savings_nanos INTEGER NOT NULL,
    latency_us_sum INTEGER NOT NULL,
    latency_count INTEGER NOT NULL,
    PRIMARY KEY (minute, series_id)
) WITHOUT ROWID;

-- Cumulative counts of non-call events ({"result": "hit"}, overrides, errors, ...).
CREATE TABLE event_counters (
    name TEXT NOT NULL,
    labels TEXT NOT NULL,                    -- JSON array of label values
    value INTEGER NOT NULL,
    PRIMARY KEY (name, labels)
) WITHOUT ROWID;

CREATE TABLE model_tiers (
    model TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    tier TEXT NOT NULL,
    input_cost_per_1m REAL NOT NULL CHECK (input_cost_per_1m >= 0),
    output_cost_per_1m REAL NOT NULL CHECK (output_cost_per_1m >= 0),
    cache_write_5m_cost_per_1m REAL CHECK (cache_write_5m_cost_per_1m >= 0),
    cache_write_1h_cost_per_1m REAL CHECK (cache_write_1h_cost_per_1m >= 0),
    cache_read_cost_per_1m REAL CHECK (cache_read_cost_per_1m >= 0),
    long_context_threshold INTEGER,
    long_input_cost_per_1m REAL,
    long_output_cost_per_1m REAL,
    long_cache_write_5m_cost_per_1m REAL,
    long_cache_write_1h_cost_per_1m REAL,
    long_cache_read_cost_per_1m REAL,
    source TEXT NOT NULL DEFAULT 'seed'      -- seed | user
);

CREATE TABLE config (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE VIEW calls AS
SELECT c.id, c.timestamp, s.provider, s.model, s.tier, s.project, NULLIF(s.agent, '') AS agent,
       c.session_id, r.request_id, c.input_tokens, c.output_tokens, c.cache_creation_tokens,
       c.cache_creation_1h_tokens, c.cache_read_tokens, c.latency_us / 1000.0 AS latency_ms,
       c.cost_nanos / 1e9 AS cost_usd, c.savings_nanos / 1e9 AS savings_usd,
       CASE c.status WHEN 0 THEN 'ok' ELSE 'error' END AS status, c.error_type
FROM api_calls c
JOIN series s ON s.id = c.series_id
LEFT JOIN request_ids r ON r.call_id = c.id;
