"""The lab's load generator on a VM: CONCURRENCY threads, each with one keep-alive connection to its URL (round
robin over the URLs), sending the same request back to back for SECONDS. Prints JSON: {"latencies": sorted
seconds of the good answers, "outcomes": {status or error name: count}}.

Usage: http_load.py SPEC_JSON, where SPEC_JSON is {"urls": [...], "method": "GET" or "POST", "form": {field: value}
(the POST body), "expect": a text good answers contain or null for any 200, "concurrency": n, "seconds": s,
"fresh_connections": true for a new connection (a new TLS handshake) per request, as browsers arriving one after
another make; a server reload must then accept every one of them, "honour_retry_after": true for a client that,
refused as busy (503 with Retry-After), waits that long before it asks again}.
Certificates are not checked: the lab's are self-signed. Standard library only: it runs on the lab's VMs with
their python3.
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
import threading
import time
import urllib.parse
from collections import Counter
from typing import Any

ANSWER_TIMEOUT_SECONDS = 120


def connect(url: str, context: ssl.SSLContext) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=ANSWER_TIMEOUT_SECONDS,
                                           context=context)  # fmt: skip
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=ANSWER_TIMEOUT_SECONDS)


class Load:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.context = ssl.create_default_context()
        self.context.check_hostname, self.context.verify_mode = False, ssl.CERT_NONE
        form = spec.get("form") or {}
        self.body = urllib.parse.urlencode(form).encode() if form else None
        self.headers = {"Content-Type": "application/x-www-form-urlencoded"} if self.body else {}
        self.deadline = time.monotonic() + float(spec["seconds"])
        self.latencies: list[float] = []
        self.outcomes: Counter[str] = Counter()
        self.lock = threading.Lock()

    def good(self, status: int, data: bytes) -> bool:
        expect = self.spec.get("expect")
        return status == 200 and (expect is None or expect in data.decode(errors="replace"))

    def client(self, url: str) -> None:
        connection, target = connect(url, self.context), urllib.parse.urlsplit(url)
        path = target.path + ("?" + target.query if target.query else "")
        while time.monotonic() < self.deadline:
            started = time.monotonic()
            broken = False
            try:
                connection.request(self.spec["method"], path, body=self.body, headers=self.headers)
                answer = connection.getresponse()
                outcome, ok = str(answer.status), self.good(answer.status, answer.read())
                pause = self.pause_after(answer)
            except Exception as error:  # a refused or reset connection is an outcome to count
                outcome, ok, broken, pause = f"{type(error).__name__}: {str(error)[:80]}", False, True, 0.0
            if broken or self.spec.get("fresh_connections"):
                connection.close()
                connection = connect(url, self.context)
            with self.lock:
                self.outcomes[outcome] += 1
                if ok:
                    self.latencies.append(time.monotonic() - started)
            time.sleep(max(0.0, min(pause, self.deadline - time.monotonic())))

    def pause_after(self, answer: http.client.HTTPResponse) -> float:
        """Seconds to wait before the next request: what a busy server asked for, if the spec honours it."""
        retry_after = answer.getheader("Retry-After") or ""
        if answer.status == 503 and self.spec.get("honour_retry_after") and retry_after.isdigit():
            return float(retry_after)
        return 0.0

    def run(self) -> dict[str, Any]:
        urls = self.spec["urls"]
        threads = [threading.Thread(target=self.client, args=(urls[i % len(urls)],))
                   for i in range(int(self.spec["concurrency"]))]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {"latencies": sorted(self.latencies), "outcomes": dict(self.outcomes)}


if __name__ == "__main__":
    print(json.dumps(Load(json.loads(sys.argv[1])).run()))
