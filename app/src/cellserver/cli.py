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
from cellserver import config as config_module
from cellserver.config import ServerConfig


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cellserver", description="cellfleet's SageMathCell-compatible server")
    parser.add_argument("--version", action="version", version=f"cellserver {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the compute server (kernels as the current user)")
    serve.add_argument("--config", type=Path, help="TOML file of settings (flags given here override it)")
    serve.add_argument("--port", type=int, help="TCP port (default 8888)")
    serve.add_argument("--bind", help="address to listen on (default loopback)")
    serve.add_argument("--max-kernels", type=int, help="kernels alive at once (default 8)")
    serve.add_argument("--preforked", type=int, help="ready kernels kept in reserve (default 2)")
    serve.add_argument("--timeout", type=float, help="wall seconds per computation (default 30)")
    serve.add_argument("--syslog-socket", help="where the computation log goes, facility local3 (default /dev/log)")
    permalink = commands.add_parser("permalink", help="run the permalink service")
    permalink.add_argument("--port", type=int, default=8889, help="TCP port (default 8889)")
    permalink.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback)")
    permalink.add_argument("--db", type=Path, default=Path("permalinks.sqlite3"), help="SQLite database file")
    args = parser.parse_args(argv)
    if args.command == "permalink" and not 1 <= args.port <= 65535:
        parser.error(f"--port must be 1-65535, got {args.port}")
    return args


def serve_config(args: argparse.Namespace) -> ServerConfig:
    overrides = {
        "port": args.port,
        "bind": args.bind,
        "max_kernels": args.max_kernels,
        "preforked": args.preforked,
        "timeout": args.timeout,
        "syslog_socket": args.syslog_socket,
    }
    return config_module.load(args.config, overrides)


async def run_serve(config: ServerConfig) -> None:
    from cellserver import computation_log, systemd
    from cellserver.kernels import KernelPool, PoolSettings
    from cellserver.service import make_app

    # SIGTERM (systemd, tests) stops cleanly: kernels, the provider and their sockets go with the server.
    # Installed first, so a stop that comes while kernels are starting is not lost.
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    computation_log.setup(config.syslog_socket)
    settings = PoolSettings(
        max_kernels=config.max_kernels,
        preforked=config.preforked,
        cpu_seconds=config.cpu_seconds,
        memory_bytes=config.memory_mb << 20,
        idle_seconds=config.idle_seconds,
    )
    pool = KernelPool(settings)
    await pool.start()
    make_app(pool, config.timeout).listen(config.port, address=config.bind)
    systemd.notify("READY=1")
    interval = systemd.watchdog_interval()
    watchdog = asyncio.create_task(systemd.keep_watchdog_fed(interval)) if interval else None
    # No worker pool is configured in this mode: say so, since kernels then run with this process's rights.
    print(
        f"cellserver serve: listening on {config.bind}:{config.port}; no worker pool configured, "
        f"kernels run as the current user (uid {os.getuid()})",
        flush=True,
    )
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
    if args.command == "serve":
        try:
            config = serve_config(args)
        except config_module.ConfigError as error:
            # One line, no traceback: the operator fixes the value and starts again.
            print(f"cellserver: {error}", file=sys.stderr)
            sys.exit(2)
    # Ctrl-C is how a developer stops it: no traceback for that.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_serve(config) if args.command == "serve" else run_permalink(args))
