"""Opening the SQLite database: pragmas, numbered migrations, the price table."""

from __future__ import annotations

import re
import time
import zlib
from pathlib import Path
from typing import Any, Final

import aiosqlite

from exporter.pricing import Price, PricingTable

__all__ = [
    "MIGRATIONS_DIR",
    "MigrationError",
    "connect",
    "load_pricing",
    "migrate",
    "request_key",
    "reset_pricing",
    "save_price",
]

MIGRATIONS_DIR: Final = Path(__file__).resolve().parents[2] / "migrations"
_MIGRATION_NAME: Final = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_PRICE_COLUMNS: Final = (
    "model, provider, tier, input_cost_per_1m, output_cost_per_1m, cache_write_5m_cost_per_1m,"
    " cache_write_1h_cost_per_1m, cache_read_cost_per_1m, long_context_threshold,"
    " long_input_cost_per_1m, long_output_cost_per_1m, long_cache_write_5m_cost_per_1m,"
    " long_cache_write_1h_cost_per_1m, long_cache_read_cost_per_1m"
)


def request_key(request_id: str) -> int:
    """The key a stored request id is found by (api_calls.request_key, indexed): the CRC-32 of
    its UTF-8 bytes, top bit cleared so SQLite stores it in 4 bytes. Not unique: a lookup
    compares the ids of the rows it finds."""
    return zlib.crc32(request_id.encode()) & 0x7FFF_FFFF


#: Every connection's settings (the server's and the writer process's).
CONNECTION_PRAGMAS: Final = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA temp_store = MEMORY",
)


class MigrationError(RuntimeError):
    """A migration file failed; the database is left at the previous version."""


async def connect(path: str | Path) -> aiosqlite.Connection:
    """Open (creating if needed) the database in WAL mode with synchronous=NORMAL.

    The connection is in autocommit mode: the store opens its own transactions, one per flush.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = await aiosqlite.connect(path, isolation_level=None)
    # auto_vacuum only takes effect before the first table exists; later it is a no-op.
    for pragma in ("PRAGMA auto_vacuum = INCREMENTAL", *CONNECTION_PRAGMAS):
        await conn.execute(pragma)
    return conn


async def migrate(conn: aiosqlite.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every pending `NNN_name.sql` in order, each in its own transaction; returns names."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    # Migration 005 fills api_calls.request_key with it.
    await conn.create_function("cco_request_key", 1, request_key, deterministic=True)
    async with conn.execute("SELECT version FROM schema_migrations") as cursor:
        applied = {row[0] for row in await cursor.fetchall()}
    done: list[str] = []
    for file in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(file.name)
        if match is None:
            raise MigrationError(f"{file.name}: migration files are named NNN_name.sql")
        version = int(match.group(1))
        if version in applied:
            continue
        script = file.read_text(encoding="utf-8")
        record = (
            "INSERT INTO schema_migrations (version, name, applied_at) "
            f"VALUES ({version}, '{match.group(2)}', {int(time.time() * 1000)});"
        )
        try:
            await conn.executescript(f"BEGIN;\n{script}\n{record}\nCOMMIT;")
        except Exception as exc:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise MigrationError(f"{file.name}: {exc}") from exc
        done.append(file.name)
    return done


async def load_pricing(conn: aiosqlite.Connection) -> PricingTable:
    """The price table as stored in `model_tiers` (seeded by migration 002)."""
    async with conn.execute(f"SELECT {_PRICE_COLUMNS} FROM model_tiers") as cursor:
        rows = await cursor.fetchall()
    return PricingTable([_price(row) for row in rows])


async def save_price(conn: aiosqlite.Connection, price: Price) -> None:
    """Insert or replace one model's prices (committed at once)."""
    placeholders = ", ".join("?" * len(_PRICE_COLUMNS.split(",")))
    values = (
        price.model,
        price.provider,
        price.tier,
        price.input,
        price.output,
        price.cache_write_5m,
        price.cache_write_1h,
        price.cache_read,
        price.long_context_threshold,
        price.long_input,
        price.long_output,
        price.long_cache_write_5m,
        price.long_cache_write_1h,
        price.long_cache_read,
    )
    await conn.execute(
        f"INSERT OR REPLACE INTO model_tiers ({_PRICE_COLUMNS}) VALUES ({placeholders})", values
    )


async def reset_pricing(conn: aiosqlite.Connection, directory: Path = MIGRATIONS_DIR) -> None:
    """Put the shipped price table back (the seed migration's rows), dropping local changes."""
    seed = (directory / "002_seed_pricing.sql").read_text(encoding="utf-8")
    try:
        await conn.executescript(f"BEGIN;\nDELETE FROM model_tiers;\n{seed}\nCOMMIT;")
    except Exception:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
        raise


def _price(row: Any) -> Price:
    names = [name.strip() for name in _PRICE_COLUMNS.split(",")]
    values: dict[str, Any] = dict(zip(names, row, strict=True))
    return Price(
        model=str(values["model"]),
        provider=str(values["provider"]),
        tier=str(values["tier"]),
        input=float(values["input_cost_per_1m"]),
        output=float(values["output_cost_per_1m"]),
        cache_write_5m=_opt(values["cache_write_5m_cost_per_1m"]),
        cache_write_1h=_opt(values["cache_write_1h_cost_per_1m"]),
        cache_read=_opt(values["cache_read_cost_per_1m"]),
        long_context_threshold=_opt_int(values["long_context_threshold"]),
        long_input=_opt(values["long_input_cost_per_1m"]),
        long_output=_opt(values["long_output_cost_per_1m"]),
        long_cache_write_5m=_opt(values["long_cache_write_5m_cost_per_1m"]),
        long_cache_write_1h=_opt(values["long_cache_write_1h_cost_per_1m"]),
        long_cache_read=_opt(values["long_cache_read_cost_per_1m"]),
    )


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
