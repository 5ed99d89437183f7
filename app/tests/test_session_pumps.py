"""A session's readers of its kernel's two channels: a page gets its reply even when a wake-up is lost on the
server's side (a message queued on a socket whose wait was never woken) or on the kernel's (a reply the
kernel holds until its shell gets another message), and a channel that cannot be read ends the session with a
reason instead of leaving the page waiting."""

from __future__ import annotations

import asyncio
import json
import queue
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_session_ending import FakePool as ReleasingPool

from cellserver import sessions
from cellserver.sessions import SessionManager

EXECUTE_ID = "page-execute-1"
# Each test's bound: a lost reply makes it fail here instead of hanging.
PATIENCE_SECONDS = 8.0


def kernel_message(kind: str, parent: str, **content: Any) -> dict[str, Any]:
    return {
        "header": {"msg_id": f"{kind}-{parent}", "msg_type": kind},
        "msg_id": f"{kind}-{parent}", "msg_type": kind,
        "parent_header": {"msg_id": parent}, "metadata": {}, "content": content,
    }  # fmt: skip


OUTPUTS = [
    kernel_message("status", EXECUTE_ID, execution_state="busy"),
    kernel_message("stream", EXECUTE_ID, name="stdout", text="1024\n"),
    kernel_message("status", EXECUTE_ID, execution_state="idle"),
]
REPLY = kernel_message("execute_reply", EXECUTE_ID, status="ok", execution_count=1)


class LostWakeUpChannel:
    """A kernel channel whose messages a waiting reader is never woken for: only a reader that looks (when
    it comes, or when its wait ends) finds them, as with a zmq socket whose edge-triggered wake-up was lost."""

    def __init__(self) -> None:
        self.queued: list[dict[str, Any]] = []
        self.spurious_empties = 0
        self.failure: Exception | None = None

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        if self.spurious_empties:
            self.spurious_empties -= 1
            raise queue.Empty  # what jupyter_client raises when its poll wakes up to nothing
        if self.queued:
            return self.queued.pop(0)
        if timeout is None:
            await asyncio.Event().wait()
        await asyncio.sleep(timeout)  # type: ignore[arg-type]
        if self.queued:
            return self.queued.pop(0)
        raise queue.Empty


@dataclass
class FakeShell:
    kernel: FakeKernelClient

    def send(self, message: dict[str, Any]) -> None:
        self.kernel.requests.append(message["header"]["msg_type"])
        self.kernel.requested()


@dataclass
class FakeKernelClient:
    """Answers an execute_request with its outputs and its reply; holding_reply keeps the reply back until
    the shell gets another message."""

    holding_reply: bool = False
    iopub: LostWakeUpChannel = field(default_factory=LostWakeUpChannel)
    shell: LostWakeUpChannel = field(default_factory=LostWakeUpChannel)
    requests: list[str] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shell_channel(self) -> FakeShell:
        return FakeShell(self)

    def requested(self) -> None:
        self.shell.queued.extend(self.held)
        self.held.clear()
        if self.requests[-1] != "execute_request":
            return
        self.iopub.queued.extend(OUTPUTS)
        (self.held if self.holding_reply else self.shell.queued).append(REPLY)

    def kernel_info(self) -> None:
        self.requests.append("kernel_info_request")
        self.requested()

    async def get_iopub_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.iopub.receive(timeout)

    async def get_shell_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.shell.receive(timeout)


@dataclass
class FakeKernel:
    client: FakeKernelClient
    kernel_id: str = "kernel-1"
    died: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class FakePool(ReleasingPool):
    kernel: FakeKernel | None = None

    async def acquire(self) -> FakeKernel | None:
        return self.kernel


@dataclass
class FakePage:
    delivered: list[dict[str, Any]] = field(default_factory=list)
    last_message: dict[str, Any] | None = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, text: str) -> None:
        self.delivered.append(json.loads(text))

    def kernel_gone(self, last_message: str) -> None:
        self.last_message = json.loads(last_message)
        self.gone.set()

    def replaced(self) -> None:
        raise AssertionError("no other connection was opened")


async def one_computation(client: FakeKernelClient, timeout: float = 0, linger: float = 0) -> tuple[FakePage, float]:
    """A session computes once: what its page got, and how long until the session ended (with no idle timeout)
    or until the page had every message (with one, the session then stays open for linger seconds)."""
    manager = SessionManager(FakePool(kernel=FakeKernel(client)), idle_limit=900, lifetime=1800, per_client=5)  # type: ignore[arg-type]
    manager.start()
    try:
        session = await manager.open("client", timeout=timeout)
        page = FakePage()
        manager.attach(session, page)
        started = time.monotonic()
        manager.send(session, {"header": {"msg_id": EXECUTE_ID, "msg_type": "execute_request"}, "content": {}})
        if timeout == 0:
            await asyncio.wait_for(page.gone.wait(), PATIENCE_SECONDS)
            return page, time.monotonic() - started
        while len(page.delivered) < len(OUTPUTS) + 1 and time.monotonic() - started < PATIENCE_SECONDS:
            await asyncio.sleep(0.05)
        took = time.monotonic() - started
        await asyncio.sleep(linger)
        return page, took
    finally:
        await manager.stop()


def kinds(page: FakePage) -> list[str]:
    return [message["msg_type"] for message in page.delivered]


def test_messages_whose_wake_up_was_lost_still_reach_the_page() -> None:
    page, took = asyncio.run(one_computation(FakeKernelClient()))
    assert sorted(kinds(page)) == sorted(["status", "stream", "status", "execute_reply"])
    assert page.last_message["content"]["reason"] == "its computations are done"
    assert took < sessions.RECEIVE_WAIT_SECONDS * 2 + 1, took


def test_a_reader_woken_for_nothing_keeps_reading() -> None:
    client = FakeKernelClient()
    client.shell.spurious_empties = client.iopub.spurious_empties = 3
    page, _took = asyncio.run(one_computation(client))
    assert "execute_reply" in kinds(page)


def test_a_reply_the_kernel_holds_is_asked_for_after_its_idle_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "REPLY_PATIENCE_SECONDS", 1.0)
    client = FakeKernelClient(holding_reply=True)
    page, took = asyncio.run(one_computation(client))
    assert "execute_reply" in kinds(page)
    assert client.requests == ["execute_request", "kernel_info_request"]
    # The kernel's answer to the server's own request is not the page's.
    assert all(message["parent_header"].get("msg_id") == EXECUTE_ID for message in page.delivered)
    assert took >= 1.0


def test_a_kernel_that_sent_its_reply_is_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # A session with an idle timeout stays open after its computation: long enough to be asked wrongly.
    monkeypatch.setattr(sessions, "REPLY_PATIENCE_SECONDS", 0.5)
    client = FakeKernelClient()
    linger = sessions.REPLY_PATIENCE_SECONDS + 2 * sessions.REAP_INTERVAL_SECONDS
    page, _took = asyncio.run(one_computation(client, timeout=60, linger=linger))
    assert "execute_reply" in kinds(page)
    assert client.requests == ["execute_request"]


def test_a_channel_that_cannot_be_read_ends_the_session_with_a_reason() -> None:
    client = FakeKernelClient()
    client.shell.failure = ValueError("Invalid Signature")
    page, _took = asyncio.run(one_computation(client))
    assert page.last_message["content"]["execution_state"] == "dead"
    assert page.last_message["content"]["reason"] == "the server could not read its kernel's shell messages"
