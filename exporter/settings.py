"""Settings (a msgspec Struct) and the platform's default paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

import msgspec

__all__ = ["Settings", "default_config_dir", "default_data_dir"]


def default_data_dir() -> Path:
    """Where the database lives: XDG on Linux, Application Support on macOS, LOCALAPPDATA."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "cco"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "cco"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cco"


def default_config_dir() -> Path:
    """Where config.toml and pricing.toml live."""
    if sys.platform in ("darwin", "win32"):
        return default_data_dir()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cco"


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything the exporter can be told. Defaults are what a local install wants."""

    db_path: str = ""
    """SQLite file; empty means `<data dir>/metrics.db`."""
    batch_size: int = 100
    """Flush when this many events are pending..."""
    flush_interval: float = 5.0
    """...or when this many seconds have passed since the last flush."""
    max_queue: int = 100_000
    """Events that may wait for the writer; beyond it ingest waits (back-pressure)."""
    recent_size: int = 1000
    """Events kept in memory for the recent/activity views."""
    dedup_memory: int = 200_000
    """Request ids remembered in memory (loaded from SQLite at start) to count retries once."""
    retention_days: int = 30
    """Raw calls and activity are purged after this many days."""
    rollup_retention_days: int = 400
    """Per-minute rollups (history) are purged after this many days."""

    # -- the HTTP service ------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Address to bind; loopback by default so nothing outside the machine can write."""
    port: int = 9469
    """TCP port of the REST API, /metrics and the SSE stream."""
    token: str = ""
    """Bearer token required for ingest and admin routes when set (`CCO_EXPORTER_TOKEN`)."""
    auth_reads: bool = False
    """Require the token for read endpoints too (reads are open by default)."""
    body_limit: int = 10 * 1024 * 1024
    """Largest accepted request body in bytes (after gzip decompression); larger gets 413."""
    cors_origins: list[str] = msgspec.field(default_factory=list)
    """Origins allowed by CORS; empty means CORS is off."""
    cache_ttl: float = 1.0
    """Seconds a heavy read endpoint's answer is reused."""
    machine: str = ""
    """Name of this machine in views; empty means the host name."""

    # -- label bounds for /metrics and OTLP (REST and SQLite keep every real name) -------------
    max_models: int = 200
    """Distinct `model` values (also from_model/to_model) before folding into `__other__`."""
    max_projects: int = 500
    """Distinct `project` values before folding into `__other__`."""
    max_agents: int = 200
    """Distinct `agent` values before folding into `__other__`."""
    max_label_values: int = 100
    """Distinct values of any other label (reason, error_type, ...) before folding."""

    # -- OTLP push -----------------------------------------------------------------------------
    otlp_endpoint: str = ""
    """Collector URL; empty means the standard OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT, else off."""
    otlp_protocol: Literal["", "http/protobuf", "grpc"] = ""
    """Empty means OTEL_EXPORTER_OTLP_(METRICS_)PROTOCOL, else http/protobuf."""
    otlp_interval: float = 0.0
    """Seconds between exports; 0 means OTEL_METRIC_EXPORT_INTERVAL (ms), else 60 s."""
    otlp_timeout: float = 10.0
    """Seconds one export may take before it counts as failed."""
    otlp_temporality: Literal["cumulative", "delta"] = "cumulative"
    """Aggregation temporality of exported sums and histograms."""

    # -- logging -------------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe level written."""
    log_format: Literal["text", "json"] = "text"
    """`json` writes one JSON object a line, for log shippers."""
    log_file: str = ""
    """Also write logs here, rotated daily, 10 files kept; empty means stderr only."""
    heartbeat_interval: float = 60.0
    """Seconds between heartbeat log lines with the 1-minute summary; 0 turns them off."""

    def __post_init__(self) -> None:
        if not self.db_path:
            self.db_path = str(default_data_dir() / "metrics.db")
        for name in ("batch_size", "max_queue", "recent_size", "dedup_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1")
        if not self.flush_interval > 0:
            raise ValueError("`flush_interval` must be positive")
        if self.max_queue < self.batch_size:
            raise ValueError("`max_queue` must be at least `batch_size`")
        if not 0 < self.port < 65536:
            raise ValueError("`port` must be between 1 and 65535")
        for name in ("body_limit", "max_models", "max_projects", "max_agents", "max_label_values"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1")
        if self.cache_ttl < 0 or self.otlp_interval < 0 or self.heartbeat_interval < 0:
            raise ValueError("intervals must not be negative")
        if not self.otlp_timeout > 0:
            raise ValueError("`otlp_timeout` must be positive")

    @property
    def spill_path(self) -> Path:
        """The spill file beside the database."""
        return Path(self.db_path + ".spill.jsonl")
