"""`cellserver`: the console script. `cellserver permalink` runs the permalink service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cellserver import __version__
from cellserver import config as config_module
from cellserver.config import ServerConfig

DEFAULTS = ServerConfig()  # what a setting is when neither the file nor a flag gives it

if TYPE_CHECKING:
    from cellserver.kernel_box import BoxLimits
    from cellserver.kernels import KernelPool, PoolSettings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cellserver", description="cellfleet's SageMathCell-compatible server")
    parser.add_argument("--version", action="version", version=f"cellserver {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the compute server (kernels as the current user)")
    serve.add_argument("--config", type=Path, help="TOML file of settings (flags given here override it)")
    serve.add_argument("--port", type=int, help=f"TCP port (default {DEFAULTS.port})")
    serve.add_argument("--bind", help="address to listen on (default loopback)")
    serve.add_argument("--max-kernels", type=int, help=f"kernels alive at once (default {DEFAULTS.max_kernels})")
    serve.add_argument("--preforked", type=int, help=f"ready kernels kept in reserve (default {DEFAULTS.preforked})")
    serve.add_argument("--timeout", type=float, help=f"wall seconds per computation (default {DEFAULTS.timeout:g})")
    serve.add_argument("--permalink-url", help="the permalink service, e.g. http://127.0.0.1:8889")
    serve.add_argument("--syslog-socket", help="computation log socket, local3 (default /dev/log; no socket: no log)")
    serve.add_argument("--check", action="store_true", help="check the settings, print them, start nothing")
    serve.add_argument("--provider-socket", help="socket of the root kernel provider that runs pooled workers")
    serve.add_argument("--kernel", choices=["python3", "sage"],
                       help=f"kernel to run (default {DEFAULTS.kernel}; sage needs passagemath)")  # fmt: skip
    provider = commands.add_parser("kernel-provider", help="run the kernel provider (as root: for pooled workers)")
    provider.add_argument("--socket", type=Path, help="listen here for the cell server (root service mode)")
    provider.add_argument("--worker-pool", type=Path, help="pool description written by the worker_pool role")
    provider.add_argument("--server-group", default="cellserver", help="group allowed to use the socket")
    provider.add_argument("--runtime-dir", type=Path, required=True, help="directory for kernel sockets")
    provider.add_argument("--reset-command", default="/usr/local/sbin/cellfleet-worker-reset",
                          help="run with a worker's name after each kernel")  # fmt: skip
    provider.add_argument("--max-processes", type=int, default=128, help="processes per worker (RLIMIT_NPROC)")
    provider.add_argument("--kernel", choices=["python3", "sage"], default="python3",
                          help="kernel to fork (sage needs passagemath)")  # fmt: skip
    provider.add_argument("--parent-pid", type=int, help="spawned mode: exit with this process")
    provider.add_argument("--box", action="store_true",
                          help="service mode: a cgroup, mount, IPC and network namespace per kernel (cgroup v2, "
                               "Delegate=yes)")  # fmt: skip
    provider.add_argument("--box-memory-mib", type=int, default=1024, help="memory.max of one kernel's box")
    provider.add_argument("--box-tasks", type=int, default=128, help="pids.max of one kernel's box")
    provider.add_argument("--box-cpu-weight", type=int, default=100, help="cpu.weight of one kernel's box")
    provider.add_argument("--box-tmpfs-mib", type=int, default=64,
                          help="size of each of the box's tmpfs: /tmp, /var/tmp, /dev/shm, the home")  # fmt: skip
    permalink = commands.add_parser("permalink", help="run the permalink service")
    permalink.add_argument("--port", type=int, default=8889, help="TCP port (default 8889)")
    permalink.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback)")
    permalink.add_argument("--allowed-origins", default="",
                           help="pages (space-separated origins) allowed credentialed calls; default: any")  # fmt: skip
    storage = permalink.add_mutually_exclusive_group()
    storage.add_argument("--db", type=Path, default=Path("permalinks.sqlite3"), help="SQLite database file")
    storage.add_argument("--postgres", metavar="CONNINFO",
                         help="PostgreSQL connection string, no password: libpq reads it from PGPASSFILE")  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "permalink" and not 1 <= args.port <= 65535:
        parser.error(f"--port must be 1-65535, got {args.port}")
    if args.command == "permalink":
        bad = [origin for origin in args.allowed_origins.split() if not config_module.ORIGIN.match(origin)]
        if bad:
            parser.error(f"--allowed-origins: {bad[0]!r} is not an origin like https://example.org")
    if args.command == "kernel-provider" and (args.socket is None) == (args.parent_pid is None):
        parser.error("give either --socket (service mode) or --parent-pid (spawned by cellserver serve)")
    if args.command == "kernel-provider" and (args.socket is None) != (args.worker_pool is None):
        parser.error("--socket and --worker-pool go together: the service mode runs pooled workers")
    if args.command == "kernel-provider":
        check_box_arguments(parser, args)
    return args


BOX_BOUNDS = {"box_memory_mib": (16, 1 << 20), "box_tasks": (8, 1 << 16), "box_cpu_weight": (1, 10000),
              "box_tmpfs_mib": (1, 1 << 16)}  # fmt: skip


def check_box_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.box and args.socket is None:
        parser.error("--box needs the service mode (--socket): only root can make a kernel's box")
    for name, (low, high) in BOX_BOUNDS.items():
        value = getattr(args, name)
        if not low <= value <= high:
            parser.error(f"--{name.replace('_', '-')} must be {low}-{high}, got {value}")


def serve_config(args: argparse.Namespace) -> ServerConfig:
    overrides = {
        "port": args.port,
        "bind": args.bind,
        "max_kernels": args.max_kernels,
        "preforked": args.preforked,
        "timeout": args.timeout,
        "syslog_socket": args.syslog_socket,
        "provider_socket": args.provider_socket,
        "permalink_url": args.permalink_url,
        "kernel": args.kernel,
    }
    return config_module.load(args.config, overrides)


def pool_settings(config: ServerConfig) -> PoolSettings:
    """The kernel pool's settings from the server's: the kernels module (and zmq) load only to serve."""
    from cellserver.kernels import PoolSettings

    return PoolSettings(
        max_kernels=config.max_kernels,
        preforked=config.preforked,
        cpu_seconds=config.cpu_seconds,
        memory_bytes=config.kernel_memory_mb() << 20,
        idle_seconds=config.idle_seconds,
        start_timeout=config.kernel_start_timeout,
        provider_socket=config.provider_socket,
        kernel=config.kernel,
    )


async def run_serve(config: ServerConfig) -> None:
    from cellserver import computation_log, systemd
    from cellserver.kernels import KernelPool
    from cellserver.service import make_app
    from cellserver.sessions import SessionManager

    # SIGTERM (systemd, tests) stops cleanly: kernels, the provider and their sockets go with the server.
    # Installed first, so a stop that comes while kernels are starting is not lost.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        loop.add_signal_handler(signum, lambda: None)  # a drain before sessions exist has nothing to drain
    computation_log.setup(config.syslog_socket)
    pool = KernelPool(pool_settings(config))
    if not await started_unless_stopped(pool, stopping):
        await pool.stop()
        return
    store = None
    if not config.permalink_url:
        from cellserver.permalinks import SQLiteStore

        store = SQLiteStore(Path(config.permalink_db or ":memory:"))
    sessions = SessionManager(
        pool, config.session_idle_seconds, config.session_lifetime_seconds, config.sessions_per_client
    )
    sessions.start()
    loop.add_signal_handler(signal.SIGUSR1, sessions.drain, config.session_drain_seconds)
    loop.add_signal_handler(signal.SIGUSR2, sessions.resume)
    app = make_app(pool, config, store, sessions)
    http_server = app.listen(config.port, address=config.bind)
    systemd.notify("READY=1")
    interval = systemd.watchdog_interval()
    watchdog = asyncio.create_task(systemd.keep_watchdog_fed(interval)) if interval else None
    if pool.pooled:
        where = f"kernels run as {pool.provider.workers} pooled workers ({config.provider_socket})"
    else:
        # Say so: kernels then run with this process's own rights.
        where = f"no worker pool configured, kernels run as the current user (uid {os.getuid()})"
    permalinks = config.permalink_url or config.permalink_db or "in memory (lost at exit)"
    print(f"cellserver serve: listening on {config.bind}:{config.port}; {where}; permalinks {permalinks}", flush=True)
    lost = asyncio.create_task(pool.provider.lost.wait())
    stop = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({lost, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if watchdog:
            watchdog.cancel()
        # No new computations while the running ones finish (a load balancer sends the next ones elsewhere).
        http_server.stop()
        await sessions.stop()
        await pool.stop()
    if not stopping.is_set():
        # No kernel can start without a provider: exit, so systemd restarts the server and it reconnects.
        sys.exit("cellserver serve: the kernel provider went away")


async def started_unless_stopped(pool: KernelPool, stopping: asyncio.Event) -> bool:
    """Start the pool; False when a stop came first (a provider slow to answer must not keep systemd waiting
    for the server to stop)."""
    from cellserver.kernels import ProviderError

    starting = asyncio.ensure_future(pool.start())
    stop = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if starting.done():
        try:
            starting.result()
        except (ProviderError, OSError) as error:
            # No kernel can start: exit with the reason, and systemd starts the server again.
            sys.exit(f"cellserver serve: no kernel provider: {error}")
        return True
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    return False


async def run_permalink(args: argparse.Namespace) -> None:
    from cellserver import systemd
    from cellserver.permalink_service import make_app
    from cellserver.permalinks import PermalinkStore, PostgresStore, SQLiteStore

    store: PermalinkStore = PostgresStore(args.postgres) if args.postgres else SQLiteStore(args.db)
    make_app(store, tuple(args.allowed_origins.split())).listen(args.port, address=args.bind)
    where = f"PostgreSQL {args.postgres}" if args.postgres else f"SQLite {args.db}"
    systemd.notify("READY=1")
    print(f"cellserver permalink: listening on {args.bind}:{args.port}, {where}", flush=True)
    await asyncio.Event().wait()


def box_limits(args: argparse.Namespace) -> BoxLimits | None:
    if not args.box:
        return None
    from cellserver.kernel_box import BoxLimits

    return BoxLimits(memory_bytes=args.box_memory_mib << 20, tasks=args.box_tasks, cpu_weight=args.box_cpu_weight,
                     tmpfs_bytes=args.box_tmpfs_mib << 20)  # fmt: skip


def run_kernel_provider(args: argparse.Namespace) -> None:
    import logging

    from cellserver import kernel_provider
    from cellserver.kernel_box import WorkerPoolError, load_worker_pool

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.parent_pid is not None:
        settings = kernel_provider.ProviderSettings(
            runtime_dir=args.runtime_dir, kernel_arguments=tuple(kernel_provider.kernel_arguments(args.kernel))
        )
        kernel_provider.serve_parent(settings, args.parent_pid)
        return
    if os.geteuid() != 0:
        sys.exit("cellserver kernel-provider: the service mode changes uids and must run as root")
    if args.kernel == "sage":
        from cellserver.sage_environment import keep_state_in

        keep_state_in(args.socket.parent / "sage")
    try:
        pool = load_worker_pool(args.worker_pool)
    except WorkerPoolError as error:
        sys.exit(f"cellserver kernel-provider: {error}")
    box = box_limits(args)
    places = kernel_provider.make_box_places(box)  # before the kernel's library loads: see its docstring
    settings = kernel_provider.ProviderSettings(
        runtime_dir=args.runtime_dir, pool=pool, server_gid=kernel_provider.group_id(args.server_group),
        reset_command=(args.reset_command,), max_processes=args.max_processes,
        kernel_arguments=tuple(kernel_provider.kernel_arguments(args.kernel)), box=box,
    )  # fmt: skip
    kernel_provider.serve_pool(settings, args.socket, places)


def log_to_stderr() -> None:
    """What the servers tell the operator (sessions opening and ending, kernels failing) goes to stderr, the
    unit's journal. Not tornado's line per request: the load balancers' health probes alone are one a second."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "kernel-provider":
        run_kernel_provider(args)
        return
    if args.command == "serve":
        try:
            config = serve_config(args)
            config_module.check_kernel_installed(config)
        except config_module.ConfigError as error:
            # One line, no traceback: the operator fixes the value and starts again.
            print(f"cellserver: {error}", file=sys.stderr)
            sys.exit(2)
        if args.check:
            print(f"cellserver: settings are valid: {config}")
            return
    log_to_stderr()
    # Ctrl-C is how a developer stops it: no traceback for that.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_serve(config) if args.command == "serve" else run_permalink(args))
