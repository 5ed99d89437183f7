#!/usr/bin/env python3
"""SageMathCell's own monitoring request, as its contrib/sagecell-client/sagecell-service.py sends it.

Usage: sagecell_service_probe.py BASE_URL [--insecure] [--timeout SECONDS]. Posts `show(plot(sin)); print(a + b)`
with two random integers and accepted_tos=true to BASE_URL/service, 15 s timeout, up to 3 tries half a second
apart; exits 0 when an answer is successful and its stdout, stripped, is the sum, else 1. Same request, same
check as upstream's script, written with the standard library so the tests need no extra package. --insecure
accepts the lab's self-signed certificate; --timeout lengthens the wait for the lab's emulated cells, where a
plot takes seconds of emulated CPU that a real server spends in milliseconds.
"""

from __future__ import annotations

import json
import random
import ssl
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime

TRIES = 3
TIMEOUT_SECONDS = 15
PAUSE_SECONDS = 0.5


def probe(base_url: str, context: ssl.SSLContext | None, timeout: float) -> str | None:
    """None when the server computed the sum, otherwise what it answered."""
    a, b = random.randint(-(2**31), 2**31), random.randint(-(2**31), 2**31)
    body = urllib.parse.urlencode({"code": f"show(plot(sin)); print({a} + {b})", "accepted_tos": "true"}).encode()
    try:
        with urllib.request.urlopen(f"{base_url}/service", data=body, timeout=timeout, context=context) as answer:
            reply = json.load(answer)
        if reply["success"] and "stdout" in reply and int(reply["stdout"].strip()) == a + b:
            return None
        return str(reply)
    except Exception as error:
        return str(error)


def main(argv: list[str]) -> int:
    base_url = argv[0].rstrip("/")
    context = ssl._create_unverified_context() if "--insecure" in argv[1:] else None
    timeout = float(argv[argv.index("--timeout") + 1]) if "--timeout" in argv else TIMEOUT_SECONDS
    for left in range(TRIES - 1, -1, -1):
        failure = probe(base_url, context, timeout)
        if failure is None:
            return 0
        print(f"{datetime.now()}: {left} attempts left. {failure}", flush=True)
        time.sleep(PAUSE_SECONDS)
    print(f"{datetime.now()}: The server is not working!", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
