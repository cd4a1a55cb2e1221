"""Settings (a msgspec Struct) and the platform's default paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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

    @property
    def spill_path(self) -> Path:
        """The spill file beside the database."""
        return Path(self.db_path + ".spill.jsonl")
