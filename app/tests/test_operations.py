"""What operators rely on: the health endpoint runs a real computation, every computation reaches syslog
(local3) with its origin, and systemd hears READY=1 and watchdog pings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellserver.service import HEALTH_TIMEOUT_SECONDS, PROBE_PATIENCE_SECONDS
from conftest import Service, compute_server, descendants, free_port, only_child, sage_python

LOCAL3_INFO = 19 * 8 + 6  # syslog priority: facility local3 (19), severity info (6)


def bound_unix_socket(path: Path, kind: socket.SocketKind) -> socket.socket:
    """A Unix socket of kind bound at path; the tests' waits on it give up after 30 s."""
    bound = socket.socket(socket.AF_UNIX, kind)
    bound.bind(str(path))
    bound.settimeout(30)
    return bound


@pytest.fixture
def datagram_sink(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "sink.sock"
    sink = bound_unix_socket(path, socket.SOCK_DGRAM)
    yield sink, path
    sink.close()


def test_health_runs_a_computation(compute: Service) -> None:
    status, headers, body = compute.request("GET", "/health")
    assert status == 200, body
    assert json.loads(body)["healthy"] is True
    assert headers["Cache-Control"] == "no-store"


def test_every_computation_is_logged_to_local3_with_its_origin(
    tmp_path: Path, datagram_sink: tuple[socket.socket, Path]
) -> None:
    sink, path = datagram_sink
    server = compute_server(tmp_path, "--max-kernels", "2", "--syslog-socket", str(path))
    server.start()
    try:
        request_headers = {"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}
        status, _headers, _body = server.request(
            "POST", "/service", {"code": "print('logged')"}, headers=request_headers
        )
        assert status == 200
        message = sink.recv(65536).decode()
    finally:
        server.stop()
    assert message.startswith(f"<{LOCAL3_INFO}>cellserver: ")
    entry = json.loads(message.split("cellserver: ", 1)[1].rstrip("\0"))
    assert entry["type"] == "service" and entry["origin"] == "203.0.113.7"
    assert entry["code"] == "print('logged')" and entry["kernel"] and entry["seconds"] >= 0


def test_systemd_hears_ready_and_watchdog_pings(tmp_path: Path, datagram_sink: tuple[socket.socket, Path]) -> None:
    sink, path = datagram_sink
    server = compute_server(tmp_path, "--max-kernels", "1", "--preforked", "0")
    os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"] = str(path), "1000000"
    try:
        server.start()
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
    try:
        received, deadline = [], time.monotonic() + 10
        while received.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            received.append(sink.recv(1024).decode())
    finally:
        server.stop()
    assert received[0] == "READY=1"
    assert received.count("WATCHDOG=1") >= 3


def seconds_for_ten_health_probes(tmp_path: Path, *settings: str) -> float:
    """After a first healthy probe, how long ten more take, on a server with no kernel reserve: each
    computation there waits for a kernel start, so probes that each waited for one would take seconds."""
    server = compute_server(tmp_path, *settings, "--max-kernels", "1", "--preforked", "0")
    server.start()
    try:
        assert server.request("GET", "/health")[0] == 200
        started = time.monotonic()
        for _ in range(10):
            assert server.request("GET", "/health")[0] == 200
        return time.monotonic() - started
    finally:
        server.stop()


def test_health_probes_share_one_recent_computation(tmp_path: Path) -> None:
    assert seconds_for_ten_health_probes(tmp_path) < 1.0, "each probe ran its own computation"


def test_health_probes_do_not_wait_for_a_refresh(tmp_path: Path) -> None:
    # Every result is stale at once (max age 0): each probe starts a refresh, and gets the previous result.
    settings = tmp_path / "cellserver.toml"
    settings.write_text("health_max_age = 0\n")
    seconds = seconds_for_ten_health_probes(tmp_path, "--config", str(settings))
    assert seconds < 1.0, "probes waited for the refreshing computation"


def freshly_probed_server(tmp_path: Path, max_kernels: int) -> Service:
    """No kernel reserve and a fresh health computation for every probe (max age 0)."""
    settings = tmp_path / "cellserver.toml"
    settings.write_text("health_max_age = 0\n")
    return compute_server(tmp_path, "--config", str(settings), "--max-kernels", str(max_kernels), "--preforked", "0")


def saturated_server(tmp_path: Path) -> Service:
    """One kernel slot, no reserve, a fresh health computation for every probe."""
    return freshly_probed_server(tmp_path, max_kernels=1)


def hold_the_only_kernel(server: Service) -> None:
    status, _headers, body = server.request("POST", "/kernel", {"accepted_tos": "true", "timeout": "60"})
    assert status == 200, body


def test_a_saturated_cell_stays_healthy_on_its_last_success(tmp_path: Path) -> None:
    # Every kernel busy is saturation, not breakage: a load balancer that took the cell out for it would send
    # its load to the peers, which then saturate in turn.
    server = saturated_server(tmp_path)
    server.start()
    try:
        assert server.request("POST", "/service", {"code": "print(1)"})[0] == 200
        hold_the_only_kernel(server)
        # Probes for longer than a health computation may wait for a kernel: several of them conclude that every
        # kernel is busy, and the probes after them read that.
        answers = []
        until = time.monotonic() + HEALTH_TIMEOUT_SECONDS + 5
        while time.monotonic() < until:
            answers.append(server.request("GET", "/health", timeout=15)[:3:2])
            time.sleep(0.5)
    finally:
        server.stop()
    assert all(status == 200 for status, _body in answers), answers


def test_a_cell_that_never_computed_is_not_healthy_while_saturated(tmp_path: Path) -> None:
    server = saturated_server(tmp_path)
    server.start()
    try:
        hold_the_only_kernel(server)
        status, _headers, body = server.request("GET", "/health", timeout=15)
    finally:
        server.stop()
    assert status == 503 and "every kernel is busy, and no computation has succeeded" in json.loads(body)["error"]


def test_a_starved_cell_answers_its_probes_within_a_check_timeout(tmp_path: Path) -> None:
    # A frozen provider stands for a cell too starved to start a kernel: with no reserve, the refreshing
    # computation waits for one past HEALTH_TIMEOUT_SECONDS. Probes that waited on it timed out in HAProxy
    # (10 s), which took every starved cell out at once.
    server = freshly_probed_server(tmp_path, max_kernels=2)
    server.start()
    try:
        with provider_frozen_after_a_success(server):
            answers = []
            until = time.monotonic() + HEALTH_TIMEOUT_SECONDS + 10
            while time.monotonic() < until:
                answers.append(server.request("GET", "/health", timeout=PROBE_PATIENCE_SECONDS + 2)[:3:2])
    finally:
        server.stop()
    assert all(status == 200 for status, _body in answers), answers


def provider_of(server: Service) -> int:
    """Pid of the kernel provider a server without a worker pool spawns (its only child between computations)."""
    assert server.process is not None
    [child] = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    return int(child)


@contextlib.contextmanager
def provider_frozen_after_a_success(server: Service) -> Iterator[None]:
    """The server has computed once; its provider is stopped meanwhile, as on a cell too starved to run it."""
    assert server.request("POST", "/service", {"code": "print(1)"})[0] == 200
    provider = provider_of(server)
    os.kill(provider, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(provider, signal.SIGCONT)


def test_a_successful_computation_is_the_health_evidence(tmp_path: Path) -> None:
    # No kernel reserve and a frozen provider: a probe that needed its own computation could not be answered.
    server = compute_server(tmp_path, "--max-kernels", "1", "--preforked", "0")
    server.start()
    try:
        with provider_frozen_after_a_success(server):
            status, _headers, body = server.request("GET", "/health", timeout=5)
    finally:
        server.stop()
    assert status == 200 and json.loads(body) == {"healthy": True}


@pytest.mark.parametrize("kernel", ["python3", "sage"])
def test_health_computations_start_no_kernel_while_the_reserve_has_one(tmp_path: Path, kernel: str) -> None:
    # An idle cell spent a kernel start on every refresh: on an emulated cell that was most of its CPU.
    # Every probe starts a refresh here (max age 0); a refresh whose answer was wrong would not give the
    # kernel back, and its replacement would show as a start too.
    settings = tmp_path / "cellserver.toml"
    settings.write_text(f'kernel = "{kernel}"\nmax_kernels = 2\npreforked = 1\nhealth_max_age = 0\n')
    python = sage_python() if kernel == "sage" else sys.executable
    server = compute_server(tmp_path, "--config", str(settings), python=python)
    server.start()
    try:
        provider = provider_of(server)
        reserve = only_child(provider, patience=60)  # the reserve's kernel, once the provider runs nothing else
        kernels = {reserve}
        for _ in range(200):
            status, _headers, body = server.request("GET", "/health")
            assert status == 200, body
            kernels.update(descendants(provider))
    finally:
        server.stop()
    assert kernels == {reserve}, f"the probes started {len(kernels) - 1} kernels"


@pytest.fixture
def silent_provider(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    """A provider socket that takes connections and never answers, as a stopped or hung provider does."""
    path = tmp_path / "provider.sock"
    listener = bound_unix_socket(path, socket.SOCK_STREAM)
    listener.listen(4)
    yield listener, path
    listener.close()


def test_a_server_told_to_stop_while_its_provider_is_silent_stops_at_once(
    tmp_path: Path, silent_provider: tuple[socket.socket, Path]
) -> None:
    # systemd stops a server whose start hangs: one that ignored SIGTERM there held its unit for the whole
    # stop timeout, and the health check's restart with it.
    listener, path = silent_provider
    settings = tmp_path / "cellserver.toml"
    settings.write_text(f'provider_socket = "{path}"\n')
    server = subprocess.Popen(
        [sys.executable, "-m", "cellserver", "serve", "--config", str(settings), "--port", str(free_port())],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        connection, _ = listener.accept()  # the server is waiting for the provider's hello now
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=10)
        connection.close()
    finally:
        server.kill()
    assert code == 0, server.stderr.read() if server.stderr else code


def test_a_provider_that_never_says_hello_fails_the_start(
    silent_provider: tuple[socket.socket, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cellserver import kernels

    monkeypatch.setattr(kernels, "HELLO_PATIENCE_SECONDS", 0.5)
    _listener, path = silent_provider

    async def open_link() -> None:
        await asyncio.wait_for(kernels.ProviderLink(str(path)).open(), 10)

    with pytest.raises(kernels.ProviderError, match=r"did not answer within 0\.5 s"):
        asyncio.run(open_link())


def test_a_spawned_provider_slow_to_load_its_kernel_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The provider a server without a provider socket spawns says hello after importing its kernel's library,
    # which for Sage on a starved machine takes longer than a hung provider service is given.
    from cellserver import kernels

    monkeypatch.setattr(kernels, "HELLO_PATIENCE_SECONDS", 0.5)
    slow_python = tmp_path / "slow-python"
    slow_python.write_text(f'#!/bin/sh\nsleep 2\nexec {sys.executable} "$@"\n')
    slow_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(slow_python))

    async def open_and_close() -> int | None:
        link = kernels.ProviderLink("")
        await asyncio.wait_for(link.open(), 60)
        assert link.process is not None
        link.process.kill()
        await link.process.wait()
        return link.workers

    assert asyncio.run(open_and_close()) is None  # no worker pool: kernels run as this user
