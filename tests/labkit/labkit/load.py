"""A bounded, steady load through the lab's load balancer, counting every outcome, for the cluster tests.

Clients run in this process, in threads that enter the lab's network namespace (setns applies to the calling
thread only), so their traffic goes to the load balancer's address on the lab bridge and nowhere else. Each
client sends `print(1+1)` back to back over a fresh TLS connection per request, and records the time, the
outcome and the release that answered (the X-Cellserver-Version header). Held sessions are pages that keep a
kernel session open over a WebSocket until the server ends it.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from labkit.waiting import until

NETNS = "cellfleet"
CLONE_NEWNET = 0x40000000


def enter_lab_namespace() -> None:
    """Move the calling thread into the lab's network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{NETNS}") as namespace:
        if libc.setns(namespace.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the lab namespace failed")


@dataclass
class Sample:
    started: float
    seconds: float
    outcome: str  # an HTTP status, or the exception's name
    release: str
    detail: str = ""  # what a wrong answer or an error answer said, for the report


@dataclass
class SteadyLoad:
    """Sends requests from `clients` threads until stopped or `limit_seconds` have passed."""

    url: str
    clients: int = 2
    limit_seconds: float = 1800
    pause_seconds: float = 2.0
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> SteadyLoad:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)

    def _client(self) -> None:
        enter_lab_namespace()
        context = ssl._create_unverified_context()
        body = urllib.parse.urlencode({"code": "print(1+1)"}).encode()
        deadline = time.monotonic() + self.limit_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            release, detail = "", ""
            try:
                with urllib.request.urlopen(self.url, body, timeout=120, context=context) as answer:
                    reply = json.load(answer)
                    ok = reply.get("stdout") == "2\n"
                    outcome = str(answer.status) if ok else "wrong answer"
                    release = answer.headers.get("X-Cellserver-Version", "")
                    detail = "" if ok else json.dumps(reply)[:300]
            except urllib.error.HTTPError as error:
                # The cell server names its release on every answer, errors too: without that header the
                # answer came from HAProxy or nginx (no server, server gone, timeout).
                release = error.headers.get("X-Cellserver-Version", "")
                outcome = f"{error.code} {'from the cell' if release else 'from the proxy'}"
                detail = error.read(300).decode(errors="replace")
            except (OSError, ValueError) as error:
                outcome = type(error).__name__
            with self._lock:
                self.samples.append(Sample(started, time.monotonic() - started, outcome, release, detail))
            time.sleep(self.pause_seconds)

    def answered_since(self, since: float) -> int:
        """How many requests sent at or after since (time.monotonic()) have their outcome."""
        with self._lock:
            return sum(1 for sample in self.samples if sample.started >= since)

    def wait_for_answers(self, count: int, since: float = 0.0, patience: float = 300) -> None:
        """Until count requests sent at or after since have their outcome, whatever it is: the load has been
        seen to run then, which a fixed pause only hopes."""
        assert until(lambda: self.answered_since(since) >= count, patience), (
            f"{self.answered_since(since)} of {count} answers within {patience:.0f} s: {self.outcomes()}"
        )

    def wrong_answers(self) -> list[str]:
        with self._lock:
            return [sample.detail for sample in self.samples if sample.outcome == "wrong answer"]

    def outcomes(self) -> Counter[str]:
        with self._lock:
            return Counter(sample.outcome for sample in self.samples)

    def releases(self, since: float = 0.0) -> Counter[str]:
        with self._lock:
            return Counter(sample.release for sample in self.samples if sample.started >= since and sample.release)


def in_lab_namespace_possible() -> bool:
    return os.geteuid() == 0 and os.path.exists(f"/run/netns/{NETNS}")


@dataclass
class HeldSession:
    """A page's kernel session held open through the load balancer, as a linked cell or an interact holds it."""

    kernel_id: str = ""
    opened: bool = False
    ended_after: float | None = None  # seconds from opening to the server's end of it
    last: dict[str, object] = field(default_factory=dict)  # the last message the page got
    error: str = ""


@dataclass
class HeldSessions:
    """`count` sessions, each from its own page (CellSessionID) in a thread inside the lab's namespace: each
    computes once, then waits, up to `limit_seconds`, for the server to end it."""

    root: str
    count: int = 4
    limit_seconds: float = 1800
    sessions: list[HeldSession] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> HeldSessions:
        for _ in range(self.count):
            held = HeldSession()
            self.sessions.append(held)
            thread = threading.Thread(target=self._page, args=(held,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_exc: object) -> None:
        for thread in self._threads:
            thread.join(timeout=1)

    def wait_open(self, patience: float) -> None:
        if not until(lambda: all(held.opened or held.error for held in self.sessions), patience):
            raise TimeoutError(f"sessions not open after {patience} s: {self.sessions}")
        errors = [held.error for held in self.sessions if held.error]
        if errors:
            raise RuntimeError(f"sessions failed to open: {errors}")

    def wait_ended(self, patience: float) -> None:
        for thread in self._threads:
            thread.join(timeout=patience)

    def _page(self, held: HeldSession) -> None:
        enter_lab_namespace()
        try:
            asyncio.run(self._hold(held))
        except Exception as error:  # the test reports what broke, the thread has no one else to tell
            held.error = f"{type(error).__name__}: {error}"

    async def _hold(self, held: HeldSession) -> None:
        fields = {"accepted_tos": "true", "timeout": "inf", "CellSessionID": str(uuid.uuid4())}
        request = HTTPRequest(f"{self.root}/kernel", method="POST", body=urllib.parse.urlencode(fields),
                              validate_cert=False, request_timeout=120)  # fmt: skip
        answer = json.loads((await AsyncHTTPClient().fetch(request)).body)
        held.kernel_id = answer["id"]
        channels = HTTPRequest(f"{answer['ws_url']}kernel/{answer['id']}/channels", validate_cert=False)
        connection = await websocket_connect(channels)
        execute = {
            "channel": "shell", "parent_header": {}, "metadata": {},
            "header": {"msg_type": "execute_request", "msg_id": str(uuid.uuid4()), "session": answer["id"]},
            "content": {"code": "kept = 6 * 7", "silent": False, "user_expressions": {}, "allow_stdin": False},
        }  # fmt: skip
        connection.write_message(json.dumps(execute))
        opened_at = time.monotonic()
        while (text := await asyncio.wait_for(connection.read_message(), self.limit_seconds)) is not None:
            message = json.loads(text)
            held.last = message
            if message.get("msg_type") == "execute_reply":
                held.opened = True
        held.ended_after = time.monotonic() - opened_at
