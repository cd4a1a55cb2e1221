from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import main
from exporter.settings import Settings, default_config_dir, default_data_dir


def test_serve_prepares_the_database_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "nested" / "metrics.db"
    assert main(["serve", "--db", str(db)]) == 0
    out = capsys.readouterr()
    assert str(db) in out.out
    assert "001_initial_schema.sql" in out.err
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (3,)
    assert main(["--db", str(db), "db", "migrate"]) == 0
    assert "up to date" in capsys.readouterr().err


def test_the_console_entry_point_runs_as_a_module(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "--db", str(db), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert db.exists()


def test_default_paths_follow_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert default_data_dir() == tmp_path / "data" / "cco"
    assert default_config_dir() == tmp_path / "config" / "cco"
    assert Settings().db_path == str(tmp_path / "data" / "cco" / "metrics.db")


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_size", 0), ("max_queue", 0), ("flush_interval", 0.0), ("recent_size", 0)],
)
def test_settings_reject_nonsense(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_the_queue_bound_must_hold_a_batch() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        Settings(batch_size=100, max_queue=10)
