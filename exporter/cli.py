"""The `cco-exporter` command: argument parsing and sub-commands, no business logic."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from exporter.settings import Settings
from exporter.store.db import connect, migrate

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cco-exporter", description="Live and historical cost of LLM API calls."
    )
    # --db is accepted before or after the sub-command (`make run ARGS="--db x.db"`).
    db_option = argparse.ArgumentParser(add_help=False)
    db_option.add_argument(
        "--db", default=argparse.SUPPRESS, help="SQLite database file (default: platform data dir)"
    )
    parser.add_argument("--db", help="SQLite database file (default: the platform data dir)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve",
        parents=[db_option],
        help="open the database, apply migrations and report (the HTTP server comes next)",
    )
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("migrate", parents=[db_option], help="apply pending migrations, exit")
    args = parser.parse_args(argv)
    settings = Settings(db_path=args.db or "")
    applied = asyncio.run(_migrate(settings.db_path))
    if args.command == "serve":
        # Until the HTTP service exists, `serve` prepares the database and says where it is.
        print(f"cco-exporter: database ready at {settings.db_path}")
    print(
        f"migrations applied: {', '.join(applied)}" if applied else "migrations: up to date",
        file=sys.stderr,
    )
    return 0


async def _migrate(path: str) -> list[str]:
    conn = await connect(path)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
