"""A drain, as a rolling update or a removal starts it (SIGUSR1): no new sessions, the open ones keep working
and may end by themselves for a while, then the rest are ended with a reason their pages show; SIGUSR2
takes sessions again. `/service` keeps serving throughout."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from http.client import HTTPMessage

import pytest
from test_sessions import connect, new_kernel, run_to_idle, stdout_of, until_closed

from cellserver.sessions import DRAINED
from conftest import Service, serving_with_settings

DRAIN_SECONDS = 3


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    settings = f"max_kernels = 4\npreforked = 2\nsession_drain_seconds = {DRAIN_SECONDS}\n"
    yield from serving_with_settings(tmp_path_factory.mktemp("drain"), settings)


def signal_server(server: Service, signum: signal.Signals) -> None:
    assert server.process is not None
    server.process.send_signal(signum)


def until_draining(server: Service, patience: float = 10) -> tuple[int, HTTPMessage, dict]:
    """The answer to POST /kernel once the server has taken the signal (a 503)."""
    deadline = time.monotonic() + patience
    while True:
        status, headers, answer = new_kernel(server, timeout="60")
        if status == 503 or time.monotonic() > deadline:
            return status, headers, answer
        server.request("DELETE", f"/kernel/{answer['id']}")
        time.sleep(0.1)


def test_a_drain_ends_open_sessions_with_the_reason_after_its_patience(server: Service) -> None:
    _status, _headers, answer = new_kernel(server, timeout="600")

    async def page() -> tuple[str, float, list[dict], tuple[int, dict, dict], dict]:
        connection = await connect(server, answer["id"])
        await run_to_idle(connection, "kept = 6 * 7")
        signal_server(server, signal.SIGUSR1)
        refused = await asyncio.to_thread(until_draining, server)
        drained_at = time.monotonic()
        # The open session still computes while the drain waits for it.
        during = stdout_of(await run_to_idle(connection, "print(kept)"))
        service = json.loads(server.request("POST", "/service", {"code": "print(1 + 1)"})[2])
        last = await until_closed(connection, timeout=4 * DRAIN_SECONDS)
        return during, time.monotonic() - drained_at, last, refused, service

    during, took, last, refused, service = asyncio.run(page())
    assert during == "42\n"
    assert service["stdout"] == "2\n"  # /service is not drained: the load balancer stops sending it
    status, headers, body = refused
    assert status == 503 and "draining" in body["error"] and headers["Retry-After"], refused
    assert last[-1]["content"] == {"execution_state": "dead", "reason": DRAINED}, last
    assert DRAIN_SECONDS - 1 <= took <= DRAIN_SECONDS + 3, took  # not at once: the sessions had their time


def test_a_drain_ends_at_once_when_no_session_is_open_and_resume_takes_sessions_again(server: Service) -> None:
    signal_server(server, signal.SIGUSR1)
    assert until_draining(server)[0] == 503
    signal_server(server, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while (status := new_kernel(server, timeout="0")[0]) != 200:
        assert time.monotonic() < deadline, f"still {status} after SIGUSR2"
        time.sleep(0.1)


def test_sessions_that_end_by_themselves_during_a_drain_are_not_told_anything(server: Service) -> None:
    _status, _headers, answer = new_kernel(server, timeout="0")  # ends once its computation is done

    async def page() -> list[dict]:
        connection = await connect(server, answer["id"])
        signal_server(server, signal.SIGUSR1)
        await asyncio.to_thread(until_draining, server)
        await run_to_idle(connection, "print(1)")
        return await until_closed(connection)

    assert asyncio.run(page())[-1]["content"] == {"execution_state": "dead", "reason": "its computations are done"}
