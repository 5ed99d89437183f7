"""A bounded, steady load through the lab's load balancer, counting every outcome, for the cluster tests.

Clients run in this process, in threads that enter the lab's network namespace (setns applies to the calling
thread only), so their traffic goes to the load balancer's address on the lab bridge and nowhere else. Each
client sends `print(1+1)` back to back over a fresh TLS connection per request, and records the time, the
outcome and the release that answered (the X-Cellserver-Version header).
"""

from __future__ import annotations

import ctypes
import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

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
