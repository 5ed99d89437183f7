"""Fresh TLS connections, one GET each, from THREADS threads for SECONDS: prints every outcome counted as JSON,
{"200": n, "503": n, "ConnectionResetError: ...": n}.

Usage: steady_client.py URL SECONDS THREADS. Certificates are not checked: the lab's are self-signed.
Standard library only: it runs on the lab's VMs with their python3.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter


def outcome_of(url: str, context: ssl.SSLContext) -> str:
    try:
        with urllib.request.urlopen(url, timeout=30, context=context) as answer:
            answer.read()
            return str(answer.status)
    except urllib.error.HTTPError as error:
        return str(error.code)
    except Exception as error:  # every failure is an outcome to count, whatever it is
        return f"{type(error).__name__}: {str(error)[:80]}"


def main(url: str, seconds: str, threads: str) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + float(seconds)

    def client() -> None:
        while time.monotonic() < deadline:
            outcome = outcome_of(url, context)
            with lock:
                outcomes[outcome] += 1

    workers = [threading.Thread(target=client) for _ in range(int(threads))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main(*sys.argv[1:4])
