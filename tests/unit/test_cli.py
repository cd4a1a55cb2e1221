"""The `cco-exporter` command, run in-process on real SQLite files (and a real server for the
commands that talk to one)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter import ApiCall, CacheHit, Exporter, Settings
from exporter.cli import main
from exporter.store.db import MIGRATIONS_DIR
from tests.e2e.conftest import Server

DAY_MS = 86_400_000
MIGRATIONS = sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))
TABLES_WITH_ROWS = ("api_calls", "activity_events", "series", "metrics_aggregated", "model_tiers")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # main() reads os.environ: no CCO_EXPORTER_* of the developer's shell and no config.toml of
    # the machine may change what a test sees.
    for name in list(os.environ):
        if name.startswith("CCO_EXPORTER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "metrics.db"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def fill(db: Path, *, now_ms: int, old_days: int = 0) -> None:
    """Write calls (some `old_days` old) and other events through the real engine."""
    exporter = await Exporter.start(Settings(db_path=str(db)))
    try:
        for i in range(20):
            age = old_days * DAY_MS if i % 2 and old_days else 0
            exporter.record(
                ApiCall(
                    model="claude-sonnet-4-5",
                    timestamp=now_ms - age - i,
                    project="web",
                    request_id=f"req-{i}",
                    input_tokens=1000 + i,
                    output_tokens=100,
                    latency_ms=500.0,
                )
            )
        exporter.record(CacheHit(model="gpt-4o", timestamp=now_ms, savings_usd=0.01))
    finally:
        await exporter.close()


def row_counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES_WITH_ROWS
        }


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["send"],
        ["simulate"],
        ["pricing"],
        ["pricing", "list"],
        ["pricing", "set"],
        ["pricing", "reset"],
        ["db"],
        ["db", "migrate"],
        ["db", "backup"],
        ["db", "vacuum"],
        ["db", "purge"],
        ["config"],
        ["config", "show"],
    ],
)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: cco-exporter {' '.join(command)}".strip())


@pytest.mark.parametrize(
    "argv",
    [[], ["db"], ["pricing", "set", "m"], ["send", "--model", "m"], ["serve", "--port", "x"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


# -- db ------------------------------------------------------------------------------------------


def test_db_migrate_applies_each_migration_once(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "db", "migrate", "--db", str(db))
    assert code == 0
    assert out == f"database: {db}\nmigrations applied: {', '.join(MIGRATIONS)}\n"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (
            len(MIGRATIONS),
        )
    # --db before the sub-command works as well.
    code, out, _ = run(capsys, "--db", str(db), "db", "migrate")
    assert (code, out.splitlines()[-1]) == (0, "migrations: up to date")


def test_the_console_entry_point_runs_as_a_module(db: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "--db", str(db), "db", "migrate"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert db.exists()


def test_db_backup_copies_every_table_and_row(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(fill(db, now_ms=int(time.time() * 1000)))
    dest = tmp_path / "backups" / "copy.db"
    code, out, _ = run(capsys, "db", "backup", str(dest), "--db", str(db))
    assert code == 0
    assert out.startswith(f"backed up {db} to {dest} (")
    assert row_counts(dest) == row_counts(db)
    assert row_counts(dest)["api_calls"] == 20
    with sqlite3.connect(dest) as copy, sqlite3.connect(db) as original:
        tables = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        assert copy.execute(tables).fetchall() == original.execute(tables).fetchall()
        # A backup is one self-contained file, not a WAL database.
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.db"]


def test_db_backup_refuses_to_overwrite_without_force(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(fill(db, now_ms=int(time.time() * 1000)))
    dest = tmp_path / "copy.db"
    dest.write_bytes(b"precious")
    code, _, err = run(capsys, "--db", str(db), "db", "backup", str(dest))
    assert code == 1
    assert "exists; add --force" in err
    assert dest.read_bytes() == b"precious"
    code, _, _ = run(capsys, "--db", str(db), "db", "backup", str(dest), "--force")
    assert code == 0
    assert row_counts(dest)["api_calls"] == 20


def test_db_backup_of_a_missing_database_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--db", str(tmp_path / "none.db"), "db", "backup", "x.db")
    assert code == 1
    assert "no database at" in err
    assert not (tmp_path / "none.db").exists()


async def test_db_backup_is_consistent_while_the_engine_writes(db: Path, tmp_path: Path) -> None:
    exporter = await Exporter.start(Settings(db_path=str(db)))
    try:
        for i in range(50):
            exporter.record(ApiCall(model="gpt-4o", input_tokens=i, output_tokens=1))
        await exporter.flush()
        # The engine keeps its connection (and a pending batch) open during the backup.
        exporter.record(ApiCall(model="gpt-4o", input_tokens=1, output_tokens=1))
        dest = tmp_path / "live.db"
        code = await asyncio.to_thread(main, ["--db", str(db), "db", "backup", str(dest)])
    finally:
        await exporter.close()
    assert code == 0
    assert row_counts(dest)["api_calls"] in (50, 51)


def test_db_purge_removes_what_is_past_retention(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now_ms = int(time.time() * 1000)
    asyncio.run(fill(db, now_ms=now_ms, old_days=20))
    code, out, _ = run(capsys, "--db", str(db), "db", "purge", "--days", "10")
    assert code == 0
    assert out.splitlines()[0] == (
        "purged raw calls older than 10 days and rollups older than 400 days:"
    )
    assert "  api_calls: 10" in out.splitlines()
    assert "  request_ids: 10" in out.splitlines()
    assert row_counts(db)["api_calls"] == 10
    # The default retention (30 days) keeps everything left.
    code, out, _ = run(capsys, "--db", str(db), "db", "purge")
    assert "  api_calls: 0" in out.splitlines()


def test_db_vacuum_reports_the_size_before_and_after(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(fill(db, now_ms=int(time.time() * 1000), old_days=60))
    assert run(capsys, "--db", str(db), "db", "purge")[0] == 0
    code, out, _ = run(capsys, "--db", str(db), "db", "vacuum")
    assert code == 0
    sizes = re.fullmatch(
        r"size before: (\d+) bytes, after: (\d+) bytes \(database \+ WAL\)", out.splitlines()[0]
    )
    assert sizes is not None
    before, after = int(sizes[1]), int(sizes[2])
    assert 0 < after <= before
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0


# -- pricing -------------------------------------------------------------------------------------


def prices(capsys: pytest.CaptureFixture[str], db: Path) -> dict[str, dict[str, object]]:
    code, out, _ = run(capsys, "--db", str(db), "pricing", "list", "--json")
    assert code == 0
    return {row["model"]: row for row in json.loads(out)}


def test_pricing_list_prints_the_shipped_table(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--db", str(db), "pricing", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "model", "provider", "tier", "input", "output", "write", "5m", "write", "1h", "read",
    ]  # fmt: skip
    sonnet = next(line for line in lines if line.startswith("claude-sonnet-4-5 "))
    assert sonnet.split() == [
        "claude-sonnet-4-5",
        "anthropic",
        "sonnet",
        "3",
        "15",
        "3.75",
        "6",
        "0.3",
    ]


def test_pricing_set_and_reset_round_trip(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shipped = prices(capsys, db)
    code, out, _ = run(
        capsys, "--db", str(db), "pricing", "set", "my-model", "--input", "1", "--output", "2.5"
    )
    assert code == 0
    assert out.startswith("my-model (other, other): input $1, output $2.5 per million tokens.")
    assert "restart" in out
    code, _, _ = run(
        capsys,
        "--db", str(db), "pricing", "set", "claude-sonnet-4-5", "--input", "4", "--output", "20",
        "--cache-read", "0.4",
    )  # fmt: skip
    assert code == 0
    changed = prices(capsys, db)
    assert changed["my-model"]["input"] == 1.0
    assert changed["my-model"]["output"] == 2.5
    assert changed["my-model"]["cache_read"] is None
    sonnet = changed["claude-sonnet-4-5"]
    assert (sonnet["provider"], sonnet["tier"], sonnet["input"]) == ("anthropic", "sonnet", 4.0)
    assert (sonnet["cache_read"], sonnet["cache_write_5m"]) == (0.4, None)

    code, out, _ = run(capsys, "--db", str(db), "pricing", "reset")
    assert (code, out) == (0, f"price table reset to the shipped prices ({len(shipped)} models)\n")
    assert prices(capsys, db) == shipped


@pytest.mark.parametrize(
    ("model", "provider", "tier"),
    [
        ("gpt-4o-2024-11-20", "openai", "gpt"),  # the table's row for gpt-4o
        ("llama3.1:70b", "ollama", "local"),  # the table's row for llama3.1
        ("claude-opus-9", "anthropic", "opus"),  # unknown: inferred from the name
        ("o4-turbo", "openai", "other"),  # unknown: o4* is OpenAI, no tier by name
    ],
)
def test_pricing_set_infers_provider_and_tier(
    db: Path, capsys: pytest.CaptureFixture[str], model: str, provider: str, tier: str
) -> None:
    code, _, _ = run(
        capsys, "--db", str(db), "pricing", "set", model, "--input", "1", "--output", "1"
    )
    assert code == 0
    row = prices(capsys, db)[model]
    assert (row["provider"], row["tier"]) == (provider, tier)


def test_pricing_set_keeps_a_given_provider_and_tier(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["pricing", "set", "mine", "--input", "1", "--output", "1", "--provider", "vllm"]
    assert run(capsys, "--db", str(db), *argv, "--tier", "local")[0] == 0
    row = prices(capsys, db)["mine"]
    assert (row["provider"], row["tier"]) == ("vllm", "local")


def test_pricing_set_refuses_a_negative_price(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "--db", str(db), "pricing", "set", "m", "--input", "-1", "--output", "1"
    )
    assert code == 2
    assert "`input` must be a finite, non-negative number" in err
    assert "m" not in prices(capsys, db)


# -- config --------------------------------------------------------------------------------------


def test_config_show_prints_effective_settings_with_the_token_masked(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('port = 1000\nmachine = "box"\nretention_days = 7\n', encoding="utf-8")
    monkeypatch.setenv("CCO_EXPORTER_PORT", "2000")
    monkeypatch.setenv("CCO_EXPORTER_TOKEN", "s3cret-token")
    code, out, _ = run(capsys, "--config", str(config), "config", "show", "--db", str(db))
    assert code == 0
    assert "s3cret-token" not in out
    shown = tomllib.loads(out)
    assert shown["token"] == "***"
    assert (shown["port"], shown["machine"], shown["retention_days"]) == (2000, "box", 7)
    assert shown["db_path"] == str(db)
    assert shown["log_level"] == "info"

    code, out, _ = run(capsys, "--config", str(config), "config", "show", "--json")
    assert code == 0
    assert json.loads(out)["token"] == "***"
    assert json.loads(out)["port"] == 2000


def test_config_show_reads_the_default_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "config" / "cco"
    directory.mkdir(parents=True)
    (directory / "config.toml").write_text('log_format = "json"\n', encoding="utf-8")
    code, out, _ = run(capsys, "config", "show", "--log-level", "debug")
    assert code == 0
    shown = tomllib.loads(out)
    assert (shown["log_format"], shown["log_level"], shown["token"]) == ("json", "debug", "")
    assert shown["db_path"] == str(tmp_path / "data" / "cco" / "metrics.db")


def test_bad_settings_exit_2_naming_their_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CCO_EXPORTER_PORT", "ninety")
    code, out, err = run(capsys, "config", "show")
    assert (code, out) == (2, "")
    assert err == "cco-exporter: CCO_EXPORTER_PORT: Expected `int`, got `str`\n"

    monkeypatch.delenv("CCO_EXPORTER_PORT")
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'blue'\n", encoding="utf-8")
    code, _, err = run(capsys, "--config", str(bad), "config", "show")
    assert (code, err) == (2, f"cco-exporter: {bad}: unknown setting `colour`\n")

    code, _, err = run(capsys, "--config", str(tmp_path / "none.toml"), "db", "migrate")
    assert code == 2
    assert "config file not found" in err


# -- send and simulate ---------------------------------------------------------------------------


def test_send_refuses_an_invalid_event_before_any_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(
        capsys,
        "send", "--model", "claude-sonnet-4-5", "--input", "-5", "--output", "1",
        "--url", f"http://127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert (code, out) == (2, "")
    assert err.startswith("cco-exporter: invalid event: Expected `int` >= 0")
    assert "input_tokens" in err


def test_send_says_so_when_no_server_listens(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(
        capsys, "send", "--model", "gpt-4o", "--input", "1", "--output", "1", "--url", url
    )
    assert (code, out) == (1, "")
    assert err == (
        f"cco-exporter: cannot connect to the exporter at {url}"
        " (is `cco-exporter serve` running?)\n"
    )


def test_simulate_refuses_a_nonsense_rate(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "simulate", "--rate", "0")
    assert code == 2
    assert "--rate must be positive" in err


def test_simulate_says_so_when_no_server_listens(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "simulate", "--rate", "50", "--duration", "1", "--url", url)
    assert code == 1
    assert out.startswith("sent 0 events in 0 requests")
    assert "cannot connect to the exporter" in err


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path / "served.db", env={"CCO_EXPORTER_TOKEN": "t0ken"}).start()
    yield running
    running.kill()


def test_send_posts_one_event_to_the_real_server(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CCO_EXPORTER_TOKEN", "t0ken")
    monkeypatch.setenv("CCO_EXPORTER_PORT", str(server.port))
    code, out, err = run(
        capsys,
        "send", "--model", "claude-sonnet-4-5", "--input", "1000", "--output", "200",
        "--cache-read", "5000", "--project", "cli-test", "--agent", "planner",
        "--request-id", "cli-1", "--latency-ms", "1234.5", "--durable",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out) | {"duplicates": 0} == {"accepted": 1, "durable": True, "duplicates": 0}
    rows = server.query(
        "SELECT input_tokens, output_tokens, cache_read_tokens, latency_us FROM api_calls"
    )
    assert rows == [(1000, 200, 5000, 1_234_500)]


def test_send_without_the_token_is_refused_by_the_server(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "send", "--model", "gpt-4o", "--input", "1", "--output", "1", "--url", server.url
    )
    assert (code, out) == (1, "")
    assert err.startswith("cco-exporter: HTTP 401: ")


def test_simulate_posts_the_planned_events_to_the_real_server(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CCO_EXPORTER_TOKEN", "t0ken")
    code, out, err = run(
        capsys,
        "simulate", "--rate", "200", "--duration", "1", "--batch", "50", "--seed", "4",
        "--url", server.url,
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("sent 200 events in 4 requests over ")
    assert out.rstrip().endswith("rejected 0")
    assert server.stop() == 0  # SIGTERM commits everything still queued
    stored = server.query("SELECT (SELECT count(*) FROM api_calls) + count(*) FROM activity_events")
    assert stored == [(200,)]
