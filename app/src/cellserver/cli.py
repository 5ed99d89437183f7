"""`cellserver`: the console script. `cellserver permalink` runs the permalink service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from cellserver import __version__


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cellserver", description="cellfleet's SageMathCell-compatible server")
    parser.add_argument("--version", action="version", version=f"cellserver {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the compute server (kernels as the current user)")
    serve.add_argument("--port", type=int, default=8888, help="TCP port (default 8888)")
    serve.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback)")
    serve.add_argument("--max-kernels", type=int, default=8, help="kernels alive at once (default 8)")
    serve.add_argument("--preforked", type=int, default=2, help="ready kernels kept in reserve (default 2)")
    serve.add_argument("--timeout", type=float, default=30.0, help="wall seconds per computation (default 30)")
    serve.add_argument("--syslog-socket", default="/dev/log", help="where the computation log goes (local3)")
    permalink = commands.add_parser("permalink", help="run the permalink service")
    permalink.add_argument("--port", type=int, default=8889, help="TCP port (default 8889)")
    permalink.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback)")
    permalink.add_argument("--db", type=Path, default=Path("permalinks.sqlite3"), help="SQLite database file")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be 1-65535, got {args.port}")
    if args.command == "serve":
        if args.max_kernels < 1 or not 0 <= args.preforked <= args.max_kernels:
            parser.error("--max-kernels must be at least 1 and --preforked between 0 and --max-kernels")
        if args.timeout <= 0:
            parser.error("--timeout must be positive")
    return args


async def run_serve(args: argparse.Namespace) -> None:
    from cellserver import computation_log, systemd
    from cellserver.kernels import KernelPool, PoolSettings
    from cellserver.service import make_app

    computation_log.setup(args.syslog_socket)
    pool = KernelPool(PoolSettings(max_kernels=args.max_kernels, preforked=args.preforked))
    await pool.start()
    make_app(pool, args.timeout).listen(args.port, address=args.bind)
    systemd.notify("READY=1")
    interval = systemd.watchdog_interval()
    watchdog = asyncio.create_task(systemd.keep_watchdog_fed(interval)) if interval else None
    # No worker pool is configured in this mode: say so, since kernels then run with this process's rights.
    print(
        f"cellserver serve: listening on {args.bind}:{args.port}; no worker pool configured, "
        f"kernels run as the current user (uid {os.getuid()})",
        flush=True,
    )
    # SIGTERM (systemd, tests) stops cleanly: kernels, the provider and their sockets go with the server.
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
    finally:
        if watchdog:
            watchdog.cancel()
        await pool.stop()


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
        asyncio.run(run_serve(args) if args.command == "serve" else run_permalink(args))
