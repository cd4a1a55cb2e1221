-- 003: indexes for the queries the exporter runs: time ranges (activity, purge, the restart
-- refill of the 10-minute window), history by label set, sessions by recency.
CREATE INDEX idx_api_calls_timestamp ON api_calls (timestamp);
CREATE INDEX idx_request_ids_call ON request_ids (call_id);
CREATE INDEX idx_activity_timestamp ON activity_events (timestamp);
CREATE INDEX idx_activity_type_timestamp ON activity_events (type, timestamp);
CREATE UNIQUE INDEX idx_activity_request ON activity_events (type, request_id)
    WHERE request_id IS NOT NULL;
CREATE INDEX idx_aggregated_series ON metrics_aggregated (series_id, minute);
CREATE INDEX idx_sessions_last_seen ON sessions (last_seen);
