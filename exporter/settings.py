"""Settings (a msgspec Struct) and the platform's default paths."""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

import msgspec

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "ProjectBudget",
    "Settings",
    "SettingsError",
    "default_config_dir",
    "default_data_dir",
    "env_name",
    "load_settings",
    "render_toml",
    "settings_report",
]

#: Every field can be set from the environment as `CCO_EXPORTER_<FIELD>` (see `env_name`).
ENV_PREFIX: Final = "CCO_EXPORTER_"
#: Names the config file to read instead of `<config dir>/config.toml`.
CONFIG_ENV: Final = "CCO_EXPORTER_CONFIG"
#: Fields whose environment name is not simply the upper-cased field name.
_ENV_ALIASES: Final = {"db_path": "CCO_EXPORTER_DB"}
#: Fields whose value must never be printed.
_SECRET_FIELDS: Final = frozenset({"token"})
_MASK: Final = "***"


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


class ProjectBudget(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One project's budgets in US dollars (`[project_budgets.web]` in config.toml)."""

    daily_usd: float = 0.0
    """Spend allowed per day in the budget time zone; 0 means no daily budget."""
    monthly_usd: float = 0.0
    """Spend allowed per calendar month in the budget time zone; 0 means no monthly budget."""

    def __post_init__(self) -> None:
        for name in ("daily_usd", "monthly_usd"):
            _check_amount(name, getattr(self, name))


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
    writer_process: bool = True
    """Batches of calls are committed to SQLite by a child process of the exporter's own (so
    writing runs beside ingest on another core); false writes them from a thread of the
    exporter's process."""
    recent_size: int = 1000
    """Events kept in memory for the recent/activity views."""
    dedup_memory: int = 200_000
    """Request ids remembered in memory (loaded from SQLite at start) to count retries once."""
    retention_days: int = 30
    """Raw calls and activity are purged after this many days."""
    rollup_retention_days: int = 400
    """Per-minute rollups (history) are purged after this many days."""
    maintenance: bool = True
    """The server keeps the database itself: a daily purge (the two retentions above), a weekly
    incremental vacuum, an hourly WAL checkpoint and an archive of each finished month."""
    maintenance_delay: float = 30.0
    """Seconds after start before the first maintenance pass (then it checks every minute)."""
    archive_dir: str = ""
    """Where monthly summaries go as `YYYY-MM.json`; empty means `archive/` beside the database."""

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
    cache_ttl: int = 1
    """Whole seconds a heavy read endpoint's answer is reused; 0 turns the cache off."""
    machine: str = ""
    """Name of this machine in views; empty means the host name."""
    switch_interval: float = 0.0005
    """Seconds a thread of the server runs before handing over Python's interpreter lock
    (`sys.setswitchinterval`; CPython's default is 0.005). The SQLite connection's thread needs
    the lock to bind every statement it runs (all of a batch's when `writer_process` is false);
    behind a busy event loop it waits up to this long each time."""

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

    # -- budgets -------------------------------------------------------------------------------
    budget_daily_usd: float = 0.0
    """Spend allowed per day over every project, US dollars; 0 means no daily budget."""
    budget_monthly_usd: float = 0.0
    """Spend allowed per calendar month over every project; 0 means no monthly budget."""
    project_budgets: dict[str, ProjectBudget] = msgspec.field(default_factory=dict)
    """Budgets of single projects, by project name; config.toml only (`[project_budgets.web]`,
    `daily_usd = 5`)."""
    budget_timezone: str = ""
    """IANA time zone whose midnights start budget days and months (`Europe/Berlin`); empty
    means this machine's zone."""

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
        if not self.otlp_timeout > 0:
            raise ValueError("`otlp_timeout` must be positive")
        if not 0 < self.switch_interval <= 1:
            raise ValueError("`switch_interval` must be more than 0 and at most 1 (seconds)")
        # A negative retention would put the purge cut-off in the future: everything would go.
        for name in (
            "cache_ttl",
            "otlp_interval",
            "heartbeat_interval",
            "retention_days",
            "rollup_retention_days",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must not be negative")
        for name in ("budget_daily_usd", "budget_monthly_usd"):
            _check_amount(name, getattr(self, name))
        for project in self.project_budgets:
            # `__all__` names the budgets over every project in metrics and the REST answer.
            if not project or project == "__all__":
                raise ValueError(f"`project_budgets` may not name the project {project!r}")
        if self.budget_timezone:
            _check_zone(self.budget_timezone)

    @property
    def spill_path(self) -> Path:
        """The spill file beside the database."""
        return Path(self.db_path + ".spill.jsonl")


def _check_amount(name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite amount of dollars, 0 or more")


def _check_zone(name: str) -> None:
    try:
        ZoneInfo(name)
    except (KeyError, ValueError, OSError):
        # KeyError: no such zone; ValueError: not a key at all (an absolute or ../ path).
        raise ValueError(
            f"`budget_timezone` must be an IANA time zone name such as Europe/Berlin or UTC,"
            f" got {name[:60]!r}"
        ) from None


class SettingsError(ValueError):
    """A setting has a bad value or an unknown name; the message names the field and its source
    (a flag, an environment variable or the config file)."""


def env_name(field: str) -> str:
    """The environment variable that sets `field` (`port` -> `CCO_EXPORTER_PORT`)."""
    return _ENV_ALIASES.get(field, ENV_PREFIX + field.upper())


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] = os.environ,
    config_file: Path | None = None,
) -> Settings:
    """Effective settings: flags > `CCO_EXPORTER_*` environment > config.toml > defaults.

    Flags whose value is None were not given. An empty environment variable counts as unset, so
    `CCO_EXPORTER_TOKEN=${TOKEN:-}` in a compose file does not override the config file. The
    config file is `config_file`, else `$CCO_EXPORTER_CONFIG`, else `<config dir>/config.toml`;
    only the last may be missing. Raises SettingsError naming the field and where it came from.
    """
    types = {field.name: field.type for field in msgspec.structs.fields(Settings)}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    path, required = _config_path(config_file, environ)
    for name, raw in _read_config(path, required, types).items():
        where = f"{path}: {name}"
        values[name] = _convert(raw, types[name], where, strict=True)
        sources[name] = where

    for name, kind in types.items():
        variable = env_name(name)
        text = environ.get(variable, "")
        if not text:
            continue
        # A list comes from the environment comma-separated (CCO_EXPORTER_CORS_ORIGINS=a,b).
        parsed: Any = (
            [part.strip() for part in text.split(",") if part.strip()]
            if kind == list[str]
            else text
        )
        values[name] = _convert(parsed, kind, variable, strict=False)
        sources[name] = variable

    for name, raw in (flags or {}).items():
        if raw is None:
            continue
        where = "--" + name.replace("_", "-")
        if name not in types:
            raise SettingsError(f"{where}: unknown setting{_did_you_mean(name, types)}")
        values[name] = _convert(raw, types[name], where, strict=False)
        sources[name] = where

    for name in ("db_path", "log_file"):
        if values.get(name):
            values[name] = os.path.expanduser(values[name])
    try:
        return Settings(**values)
    except ValueError as exc:
        raise SettingsError(_with_source(str(exc), sources)) from None


def settings_report(settings: Settings) -> dict[str, Any]:
    """Every effective setting by name, as plain values, with secrets masked (`***` when set)."""
    report: dict[str, Any] = msgspec.to_builtins(settings)
    for name in _SECRET_FIELDS:
        if report.get(name):
            report[name] = _MASK
    return report


def render_toml(values: Mapping[str, Any]) -> str:
    """Settings as `key = value` lines that config.toml accepts back.

    tomli_w is not a dependency; strings, numbers, booleans, lists and tables (as inline tables)
    are all a settings file holds, and JSON's spelling of the scalars is valid TOML.
    """
    return "".join(f"{name} = {_toml_value(value)}\n" for name, value in values.items())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        items = ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(value)


def _config_path(config_file: Path | None, environ: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file to read and whether it must exist (it must when someone named it)."""
    if config_file is not None:
        return config_file, True
    named = environ.get(CONFIG_ENV, "")
    if named:
        return Path(named).expanduser(), True
    return default_config_dir() / "config.toml", False


def _read_config(path: Path, required: bool, types: Mapping[str, Any]) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise SettingsError(f"{path}: config file not found") from None
        return {}
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        table = msgspec.toml.decode(data)
    except msgspec.DecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    for name in table:
        if name not in types:
            raise SettingsError(f"{path}: unknown setting `{name}`{_did_you_mean(name, types)}")
    return dict(table)


def _convert(raw: Any, kind: Any, where: str, *, strict: bool) -> Any:
    # strict=False lets the environment's strings become ints, floats and booleans; the config
    # file is typed already, so a string there where a number belongs is an error.
    try:
        return msgspec.convert(raw, kind, strict=strict)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"{where}: {exc}") from None


def _did_you_mean(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _with_source(message: str, sources: Mapping[str, str]) -> str:
    """Settings' own checks name fields in backticks; say where the first one named was set."""
    for name in re.findall(r"`([a-z_0-9]+)`", message):
        if name in sources:
            return f"{sources[name]}: {message}"
    return message
