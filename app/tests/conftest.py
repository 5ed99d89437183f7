"""Start the permalink service as a real process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Service:
    port: int
    database: Path
    process: subprocess.Popen[bytes] | None = None
    arguments: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "cellserver", *self.arguments, "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the permalink service did not start")

    def kill_hard(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def request(
        self,
        method: str,
        path: str,
        fields: dict[str, str] | None = None,
        timeout: float = 60,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], str]:
        data = urllib.parse.urlencode(fields).encode() if fields is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read().decode()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    database = tmp_path / "permalinks.sqlite3"
    running = Service(port=free_port(), database=database, arguments=("permalink", "--db", str(database)))
    running.start()
    yield running
    running.stop()


def compute_server(tmp_path: Path, *options: str) -> Service:
    return Service(port=free_port(), database=tmp_path / "unused", arguments=("serve", *options))


@pytest.fixture
def compute(tmp_path: Path) -> Iterator[Service]:
    """A compute server with two kernel slots and a 5 s computation limit."""
    running = compute_server(tmp_path, "--max-kernels", "2", "--preforked", "1", "--timeout", "5")
    running.start()
    yield running
    running.stop()
