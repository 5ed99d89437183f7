"""Posts computations to the cell server on this VM's loopback, all at once from threads of this process, and
prints their answers as a JSON list of {"status", "headers", "body", "seconds"}.

Usage: post_service.py PORT CODE [--count N] [--retry-busy SECONDS] [--patience SECONDS]. A computation refused
as busy (503) is sent again, as a client honouring Retry-After would, for up to --retry-busy seconds (0: never);
each answer is waited for up to --patience seconds. Standard library only: it runs on the lab's VMs with their
python3.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

RETRY_PAUSE_SECONDS = 0.5


def post_until_taken(url: str, data: bytes, retry_until: float, patience: float) -> dict[str, Any]:
    sent = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, data=data, timeout=patience) as answer:
                status, headers, body = answer.status, dict(answer.headers), json.load(answer)
        except urllib.error.HTTPError as error:
            if error.code == 503 and time.monotonic() < retry_until:
                time.sleep(RETRY_PAUSE_SECONDS)
                continue
            status, headers, body = error.code, dict(error.headers), json.load(error)
        return {"status": status, "headers": headers, "body": body, "seconds": time.monotonic() - sent}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("code")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--retry-busy", type=float, default=0, metavar="SECONDS")
    parser.add_argument("--patience", type=float, default=120, metavar="SECONDS")
    arguments = parser.parse_args()
    url = f"http://127.0.0.1:{arguments.port}/service"
    data = urllib.parse.urlencode({"code": arguments.code}).encode()
    retry_until = time.monotonic() + arguments.retry_busy
    patience = arguments.patience
    with ThreadPoolExecutor(arguments.count) as pool:
        answers = pool.map(lambda _: post_until_taken(url, data, retry_until, patience), range(arguments.count))
        print(json.dumps(list(answers)))


if __name__ == "__main__":
    main()
