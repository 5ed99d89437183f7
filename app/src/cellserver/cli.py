"""`cellserver`: the console script. `cellserver permalink` runs the permalink service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from cellserver import __version__


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cellserver", description="cellfleet's SageMathCell-compatible server")
    parser.add_argument("--version", action="version", version=f"cellserver {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    permalink = commands.add_parser("permalink", help="run the permalink service")
    permalink.add_argument("--port", type=int, default=8889, help="TCP port (default 8889)")
    permalink.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback)")
    permalink.add_argument("--db", type=Path, default=Path("permalinks.sqlite3"), help="SQLite database file")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be 1-65535, got {args.port}")
    return args


async def run_permalink(args: argparse.Namespace) -> None:
    from cellserver.permalink_service import make_app
    from cellserver.permalinks import SQLiteStore

    store = SQLiteStore(args.db)
    make_app(store).listen(args.port, address=args.bind)
    print(f"cellserver permalink: listening on {args.bind}:{args.port}, SQLite {args.db}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Ctrl-C is how a developer stops it: no traceback for that.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_permalink(args))
