"""Shared pieces of the HTTP benchmarks: start a `cellserver` command, drive it with concurrent clients."""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tornado.httpclient import AsyncHTTPClient, HTTPRequest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_load_arguments(description: str) -> argparse.Namespace:
    """The options every laptop-server benchmark takes: seconds per load, the server's kernels and reserve."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--max-kernels", type=int, default=16)
    parser.add_argument("--preforked", type=int, default=8)
    return parser.parse_args()


@contextmanager
def cellserver(*arguments: str, startup_seconds: float = 60, python: str = sys.executable) -> Iterator[str]:
    """Run `cellserver ARGUMENTS --port P` with python until the block ends; yields its base URL."""
    with running_cellserver(*arguments, startup_seconds=startup_seconds, python=python) as (url, _server):
        yield url


@contextmanager
def running_cellserver(
    *arguments: str, startup_seconds: float = 60, python: str = sys.executable
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Like cellserver, and the server's process too (for its CPU time and memory)."""
    port = free_port()
    command = [python, "-m", "cellserver", *arguments, "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + startup_seconds
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.terminate()
        server.wait()


async def drive(
    make_request: Callable[[], HTTPRequest], concurrency: int, seconds: float, refusals: list[float] | None = None
) -> list[float]:
    """Latencies of every request concurrency clients complete in seconds; any non-200 answer aborts, except a
    503 when refusals is a list (overload is refused by design): its latency goes there."""
    client = AsyncHTTPClient(max_clients=concurrency)
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def one_client() -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            response = await client.fetch(make_request(), raise_error=False)
            if response.code == 503 and refusals is not None:
                refusals.append(time.monotonic() - started)
                continue
            if response.code != 200:
                raise RuntimeError(f"HTTP {response.code}: {response.body[:200]!r}")
            latencies.append(time.monotonic() - started)

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return latencies
