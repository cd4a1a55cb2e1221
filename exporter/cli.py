"""The `cco-exporter` command: argument parsing and sub-commands, no business logic."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import aiosqlite
import httpx
import msgspec

from exporter.events import event_from_dict
from exporter.logs import setup_logging
from exporter.pricing import Price
from exporter.settings import Settings, SettingsError, load_settings, render_toml, settings_report
from exporter.simulate import (
    SimulationStats,
    auto_batch,
    local_url,
    post_events,
    run_simulation,
)
from exporter.store import maintenance
from exporter.store.db import MigrationError, connect, load_pricing, migrate, reset_pricing
from exporter.store.db import save_price as store_price
from exporter.store.queries import purge

__all__ = ["main"]

T = TypeVar("T")
_DAY_MS: Final = 86_400_000
#: How long `send` waits for an answer: a durable request waits for the next flush (5 s).
_HTTP_TIMEOUT: Final = 30.0
Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 runtime failure, 2 usage or bad input)."""
    args = build_parser().parse_args(argv)
    command: Command = args.run
    try:
        return command(args)
    except SettingsError as exc:
        return _fail(str(exc), code=2)
    except (sqlite3.Error, MigrationError, OSError) as exc:
        return _fail(str(exc))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cco-exporter",
        description="Live and historical cost of LLM API calls.",
        epilog="Settings come from flags > CCO_EXPORTER_* environment > config.toml > defaults.",
    )
    _global_options(parser)
    # The same options after the sub-command (`cco-exporter serve --db x.db`): SUPPRESS keeps a
    # value given before the sub-command when it is not repeated after it.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", parents=[common], help="run the exporter (HTTP API, /metrics, OTLP push)"
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 9469)")
    serve.set_defaults(run=_serve)

    _send_parser(commands, common)
    _simulate_parser(commands, common)
    _pricing_parser(commands, common)
    _db_parser(commands, common)

    config = commands.add_parser("config", help="show the effective configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser(
        "show", parents=[common], help="print the effective settings (token masked) as TOML"
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    show.set_defaults(run=_config_show)
    return parser


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="PATH",
        help="config file (default: <config dir>/config.toml)",
    )
    parser.add_argument(
        "--db",
        default=default,
        metavar="PATH",
        help="SQLite database file (default: <data dir>/metrics.db)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=default,
        help="least severe level logged by serve (default info)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=default,
        help="serve's log lines: text, or one JSON object a line",
    )
    parser.add_argument(
        "--log-file",
        default=default,
        metavar="PATH",
        help="serve also logs here, rotated daily, 10 files kept",
    )


def _send_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    send = commands.add_parser(
        "send",
        parents=[common],
        help="post one api_call event to a running exporter",
        description="Validate one api_call event locally and POST it to /api/events.",
    )
    send.add_argument("--model", required=True, help="model id, e.g. claude-sonnet-4-5")
    send.add_argument("--input", type=int, required=True, dest="input_tokens", metavar="N")
    send.add_argument("--output", type=int, required=True, dest="output_tokens", metavar="N")
    send.add_argument("--cache-read", type=int, dest="cache_read_tokens", metavar="N")
    send.add_argument("--cache-creation", type=int, dest="cache_creation_tokens", metavar="N")
    send.add_argument(
        "--cache-creation-1h",
        type=int,
        dest="cache_creation_1h_tokens",
        metavar="N",
        help="the part of --cache-creation written with a 1-hour TTL",
    )
    send.add_argument("--latency-ms", type=float, metavar="MS")
    send.add_argument("--project", help="project name (default: default)")
    send.add_argument("--agent")
    send.add_argument("--session", dest="session_id")
    send.add_argument("--request-id", help="idempotency key: a repeated id is counted once")
    send.add_argument("--provider", help="default: inferred from the model")
    send.add_argument("--status", choices=("ok", "error"))
    send.add_argument("--error-type", help="e.g. rate_limit, with --status error")
    send.add_argument("--cost-usd", type=float, help="default: computed from the price table")
    send.add_argument("--url", help="exporter base URL (default http://<host>:<port>)")
    send.add_argument(
        "--durable", action="store_true", help="answer only once the event is stored in SQLite"
    )
    send.set_defaults(run=_send)


def _simulate_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    simulate = commands.add_parser(
        "simulate",
        parents=[common],
        help="post synthetic, realistic load to a running exporter",
        description="Post a realistic mix of events (Anthropic, OpenAI and Ollama models, "
        "several projects and agents, cache use, about 2 % errors) at a steady rate.",
    )
    simulate.add_argument("--rate", type=float, default=10.0, help="events per second (10)")
    simulate.add_argument(
        "--duration", type=float, default=60.0, help="seconds to run; 0 runs until Ctrl-C (60)"
    )
    simulate.add_argument("--batch", type=int, help="events per request (default: rate / 10)")
    simulate.add_argument("--seed", type=int, help="random seed, for a repeatable run")
    simulate.add_argument("--url", help="exporter base URL (default http://<host>:<port>)")
    simulate.set_defaults(run=_simulate)


def _pricing_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    pricing = commands.add_parser("pricing", help="show or change the price table in the database")
    actions = pricing.add_subparsers(dest="pricing_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="print the price table")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=_pricing_list)
    restart_note = (
        "A running server reads the table at start: restart it to apply the change, or use "
        "`PUT /api/pricing/{model}`, which changes a running server at once."
    )
    setting = actions.add_parser(
        "set",
        parents=[common],
        help="add or replace one model's prices (USD per million tokens)",
        description="Add or replace one model's prices, in USD per million tokens. "
        "Missing cache rates follow Anthropic's multipliers of the input rate. " + restart_note,
    )
    setting.add_argument("model", help="model id as clients send it, without a date suffix")
    setting.add_argument("--input", type=float, required=True, metavar="USD")
    setting.add_argument("--output", type=float, required=True, metavar="USD")
    setting.add_argument("--provider", help="default: the table's, else inferred from the id")
    setting.add_argument("--tier", help="default: the table's, else opus/sonnet/haiku by name")
    setting.add_argument(
        "--cache-write-5m", type=float, metavar="USD", help="default: 1.25 x input"
    )
    setting.add_argument("--cache-write-1h", type=float, metavar="USD", help="default: 2 x input")
    setting.add_argument("--cache-read", type=float, metavar="USD", help="default: 0.1 x input")
    setting.set_defaults(run=_pricing_set)
    reset = actions.add_parser(
        "reset",
        parents=[common],
        help="put the shipped price table back, dropping local changes",
        description="Put the shipped price table back, dropping local changes. " + restart_note,
    )
    reset.set_defaults(run=_pricing_reset)


def _db_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    db = commands.add_parser("db", help="database maintenance")
    actions = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    actions.add_parser(
        "migrate", parents=[common], help="apply pending migrations, then exit"
    ).set_defaults(run=_db_migrate)
    backup = actions.add_parser(
        "backup",
        parents=[common],
        help="copy the database to DEST (safe while the server writes)",
        description="Copy the database with SQLite's online backup API into a single file.",
    )
    backup.add_argument("dest", type=Path, metavar="DEST")
    backup.add_argument("--force", action="store_true", help="replace DEST if it exists")
    backup.set_defaults(run=_db_backup)
    actions.add_parser(
        "vacuum",
        parents=[common],
        help="return free pages to the file system and truncate the WAL",
    ).set_defaults(run=_db_vacuum)
    purging = actions.add_parser(
        "purge",
        parents=[common],
        help="delete raw calls and rollups older than the retention",
        description="Delete raw calls and activity older than retention_days, and per-minute "
        "rollups older than rollup_retention_days. Cumulative totals are kept.",
    )
    purging.add_argument(
        "--days", type=int, help="keep raw calls this many days (sets retention_days)"
    )
    purging.set_defaults(run=_db_purge)


# -- commands ------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args, host=args.host, port=args.port)
    setup_logging(settings)
    # Imported here: the web stack is heavy and no other command needs it.
    from exporter.app import serve

    serve(settings)
    return 0


def _send(args: argparse.Namespace) -> int:
    settings = _settings(args)
    names = (
        "model", "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens",
        "cache_creation_1h_tokens", "latency_ms", "project", "agent", "session_id", "request_id",
        "provider", "status", "error_type", "cost_usd",
    )  # fmt: skip
    event = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    try:
        event_from_dict(event)
    except msgspec.ValidationError as exc:
        return _fail(f"invalid event: {exc}", code=2)
    url = args.url or local_url(settings.host, settings.port)
    try:
        with httpx.Client(timeout=_HTTP_TIMEOUT) as client:
            response = post_events(client, url, event, token=settings.token, durable=args.durable)
    except httpx.HTTPError as exc:
        return _fail(_unreachable(url, exc))
    if not response.is_success:
        return _fail(f"HTTP {response.status_code}: {response.text}")
    print(response.text)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.rate <= 0 or args.duration < 0 or (args.batch is not None and args.batch < 1):
        return _fail("--rate must be positive, --duration not negative, --batch at least 1", 2)
    url = args.url or local_url(settings.host, settings.port)
    stats = SimulationStats()
    try:
        with httpx.Client(timeout=_HTTP_TIMEOUT) as client:
            run_simulation(
                client,
                url,
                rate=args.rate,
                duration=args.duration,
                batch=args.batch or auto_batch(args.rate),
                # Synthetic load, not secrets: a seedable generator is the point.
                rng=random.Random(args.seed),  # noqa: S311
                stats=stats,
                token=settings.token,
            )
    except KeyboardInterrupt:
        pass
    except httpx.HTTPError as exc:
        print(stats.summary())
        return _fail(_unreachable(url, exc))
    print(stats.summary())
    return 0 if stats.sent or not stats.requests else 1


def _pricing_list(args: argparse.Namespace) -> int:
    prices = _with_db(_settings(args), lambda conn, _: load_pricing(conn)).prices()
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(prices), indent=2).decode())
        return 0
    header = ("model", "provider", "tier", "input", "output", "write 5m", "write 1h", "read")
    rows = [
        (
            p.model,
            p.provider,
            p.tier,
            _usd(p.input),
            _usd(p.output),
            _usd(p.cache_write_5m),
            _usd(p.cache_write_1h),
            _usd(p.cache_read),
        )
        for p in prices
    ]
    print(_table(header, rows))
    print("USD per million tokens; '-' = the default multiple of the input rate.")
    return 0


def _pricing_set(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def save(conn: aiosqlite.Connection, _applied: list[str]) -> Price:
        provider, tier, _ = (await load_pricing(conn)).classify(args.model)
        price = Price(
            model=args.model,
            provider=args.provider or provider,
            tier=args.tier or tier,
            input=args.input,
            output=args.output,
            cache_write_5m=args.cache_write_5m,
            cache_write_1h=args.cache_write_1h,
            cache_read=args.cache_read,
        )
        await store_price(conn, price)
        return price

    try:
        price = _with_db(settings, save)
    except ValueError as exc:  # Price's own checks: negative or non-finite rates
        return _fail(str(exc), code=2)
    print(
        f"{price.model} ({price.provider}, {price.tier}): input ${_usd(price.input)},"
        f" output ${_usd(price.output)} per million tokens."
        " A running server applies it after a restart (or use PUT /api/pricing/{model})."
    )
    return 0


def _pricing_reset(args: argparse.Namespace) -> int:
    async def reset(conn: aiosqlite.Connection, _applied: list[str]) -> int:
        await reset_pricing(conn)
        return len(await load_pricing(conn))

    count = _with_db(_settings(args), reset)
    print(f"price table reset to the shipped prices ({count} models)")
    return 0


def _db_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    applied = _with_db(settings, _no_action)
    print(f"database: {settings.db_path}")
    print(f"migrations applied: {', '.join(applied)}" if applied else "migrations: up to date")
    return 0


def _db_backup(args: argparse.Namespace) -> int:
    settings = _settings(args)
    dest: Path = args.dest
    if not Path(settings.db_path).exists():
        return _fail(f"no database at {settings.db_path}")
    if dest.exists() and not args.force:
        return _fail(f"{dest} exists; add --force to replace it")
    size = asyncio.run(maintenance.backup(settings.db_path, dest))
    print(f"backed up {settings.db_path} to {dest} ({size} bytes)")
    return 0


def _db_vacuum(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not Path(settings.db_path).exists():
        return _fail(f"no database at {settings.db_path}")
    before = maintenance.disk_bytes(settings.db_path)
    incremental, busy = asyncio.run(maintenance.vacuum(settings.db_path))
    after = maintenance.disk_bytes(settings.db_path)
    print(f"size before: {before} bytes, after: {after} bytes (database + WAL)")
    if not incremental:
        print("note: this database was created without incremental auto-vacuum; free pages stay")
    if busy:
        print("note: a reader kept the WAL from being truncated; run again when it is idle")
    return 0


def _db_purge(args: argparse.Namespace) -> int:
    settings = _settings(args, retention_days=args.days)
    if not Path(settings.db_path).exists():
        return _fail(f"no database at {settings.db_path}")
    now_ms = time.time_ns() // 1_000_000
    result = _with_db(
        settings,
        lambda conn, _: purge(
            conn,
            calls_before_ms=now_ms - settings.retention_days * _DAY_MS,
            rollups_before_ms=now_ms - settings.rollup_retention_days * _DAY_MS,
        ),
    )
    print(
        f"purged raw calls older than {settings.retention_days} days and rollups older than"
        f" {settings.rollup_retention_days} days:"
    )
    for table, count in msgspec.structs.asdict(result).items():
        print(f"  {table}: {count}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    report = settings_report(_settings(args))
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
    else:
        print(render_toml(report), end="")
    return 0


# -- helpers -------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, **flags: Any) -> Settings:
    given = {
        "db_path": args.db,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "log_file": args.log_file,
        **flags,
    }
    return load_settings(given, os.environ, args.config)


def _with_db(
    settings: Settings,
    action: Callable[[aiosqlite.Connection, list[str]], Awaitable[T]],
) -> T:
    """Open the database, apply pending migrations, run `action(conn, applied)`, close it."""

    async def run() -> T:
        conn = await connect(settings.db_path)
        try:
            return await action(conn, await migrate(conn))
        finally:
            await conn.close()

    return asyncio.run(run())


async def _no_action(_conn: aiosqlite.Connection, applied: list[str]) -> list[str]:
    return applied


def _unreachable(url: str, exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to the exporter at {url} (is `cco-exporter serve` running?)"
    return f"request to {url} failed: {exc!r}"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _fail(message: str, code: int = 1) -> int:
    print(f"cco-exporter: {message}", file=sys.stderr)
    return code
