"""Writes numbered permalinks one at a time for SECONDS, and prints the acknowledged ones (id -> code) and the
number of failed writes as JSON: {"acknowledged": {...}, "failures": N}.

Usage: permalink_writer.py URL SECONDS RUN, where RUN tells this run's codes apart from earlier ones.
Standard library only: it runs on the lab's VMs with their python3.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
import urllib.request

PAUSE_AFTER_FAILURE_SECONDS = 0.2


def main(url: str, seconds: str, run: str) -> None:
    acknowledged: dict[str, str] = {}
    failures, number = 0, 0
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        number += 1
        code = f"print('{run} {number}')"
        try:
            data = urllib.parse.urlencode({"code": code}).encode()
            with urllib.request.urlopen(url, data, timeout=10) as answer:
                acknowledged[json.load(answer)["query"]] = code
        except Exception:  # every failed write counts, whatever failed
            failures += 1
            time.sleep(PAUSE_AFTER_FAILURE_SECONDS)
    print(json.dumps({"acknowledged": acknowledged, "failures": failures}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
