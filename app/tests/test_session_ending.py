"""When a session with no idle timeout ends: after every computation's reply *and* all its outputs, whatever
order the server reads its kernel's two channels in. A starved server may read the shell's reply before the
iopub messages that came first from the kernel; the page must still get them all before the session ends."""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from cellserver.sessions import KernelSession, SessionManager

EXECUTE_ID = "page-execute-1"
READINESS_ID = "pool-readiness-check"


@dataclass
class FakeShell:
    sent: list[dict[str, Any]] = field(default_factory=list)

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


@dataclass
class FakeClient:
    shell_channel: FakeShell = field(default_factory=FakeShell)


@dataclass
class FakeKernel:
    kernel_id: str = "kernel-1"
    client: FakeClient = field(default_factory=FakeClient)


@dataclass
class FakePool:
    released: list[FakeKernel] = field(default_factory=list)

    def release(self, kernel: FakeKernel, retain_as: str | None = None) -> asyncio.Task[None]:
        self.released.append(kernel)
        return asyncio.ensure_future(asyncio.sleep(0))


@dataclass
class FakePage:
    delivered: list[dict[str, Any]] = field(default_factory=list)
    gone: bool = False

    def deliver(self, text: str) -> None:
        assert not self.gone, "a message reached the page after the session ended"
        self.delivered.append(json.loads(text))

    def kernel_gone(self, last_message: str) -> None:
        self.gone = True

    def replaced(self) -> None:
        raise AssertionError("no other connection was opened")


def kernel_message(kind: str, parent: str, channel: str, **content: Any) -> tuple[dict[str, Any], str]:
    message = {
        "header": {"msg_id": f"{kind}-{parent}", "msg_type": kind},
        "msg_id": f"{kind}-{parent}", "msg_type": kind,
        "parent_header": {"msg_id": parent}, "metadata": {}, "content": content,
    }  # fmt: skip
    return message, channel


# What the kernel sends for one execute_request, in its own order, each channel in order.
IOPUB = [
    kernel_message("status", EXECUTE_ID, "iopub", execution_state="busy"),
    kernel_message("execute_input", EXECUTE_ID, "iopub", code="print(2^10)", execution_count=1),
    kernel_message("stream", EXECUTE_ID, "iopub", name="stdout", text="1024\n"),
    kernel_message("status", EXECUTE_ID, "iopub", execution_state="idle"),
]
SHELL = [kernel_message("execute_reply", EXECUTE_ID, "shell", status="ok", execution_count=1)]


def interleavings(first: list[Any], second: list[Any]) -> list[list[Any]]:
    """Every merge of two sequences that keeps each one's own order: how two channels can be read."""
    merges = []
    for places in itertools.combinations(range(len(first) + len(second)), len(second)):
        rest, others = iter(first), iter(second)
        merges.append([next(others) if index in places else next(rest) for index in range(len(first) + len(second))])
    return merges


def run_session(order: list[tuple[dict[str, Any], str]]) -> tuple[FakePage, FakePool]:
    async def scenario() -> tuple[FakePage, FakePool]:
        pool = FakePool()
        manager = SessionManager(pool, idle_limit=900, lifetime=1800, per_client=5)  # type: ignore[arg-type]
        session = KernelSession("session-1", FakeKernel(), "client", timeout=0)  # type: ignore[arg-type]
        manager.sessions[session.session_id] = session
        page = FakePage()
        manager.attach(session, page)
        # The pool's readiness check left the kernel idle before the page had it.
        manager._from_kernel(session, *kernel_message("status", READINESS_ID, "iopub", execution_state="idle"))
        manager.send(session, {"header": {"msg_id": EXECUTE_ID, "msg_type": "execute_request"}, "content": {}})
        for message, channel in order:
            if session.ended:
                break
            manager._from_kernel(session, message, channel)
        await asyncio.sleep(0)
        return page, pool

    return asyncio.run(scenario())


def reading_order(order: list[tuple[dict[str, Any], str]]) -> str:
    return "-".join(message["msg_type"] for message, _channel in order)


@pytest.mark.parametrize("order", interleavings(IOPUB, SHELL), ids=reading_order)
def test_the_page_gets_every_output_and_the_reply_before_the_session_ends(order: list[Any]) -> None:
    page, pool = run_session(order)
    kinds = [message["msg_type"] for message in page.delivered]
    assert sorted(kinds) == sorted(message["msg_type"] for message, _ in IOPUB + SHELL), kinds
    assert page.gone and len(pool.released) == 1, "the session did not end once its computation was done"


def test_a_session_waiting_for_outputs_stays_open() -> None:
    page, pool = run_session([*SHELL, *IOPUB[:-1]])
    assert not page.gone and not pool.released, "the session ended before the computation's idle status"
