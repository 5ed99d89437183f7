"""Posts COUNT computations at once to the cell server on this VM's loopback, from threads of this process,
and prints their answers as a JSON list of {"status", "body"}.

Usage: post_service_many.py PORT CODE COUNT RETRY_BUSY_SECONDS PATIENCE. A computation refused as busy (503)
is sent again, as a client honouring Retry-After would, for up to RETRY_BUSY_SECONDS; each answer is waited
for up to PATIENCE seconds. Standard library only: it runs on the lab's VMs with their python3.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

RETRY_PAUSE_SECONDS = 0.5


def post_until_taken(url: str, data: bytes, retry_until: float, patience: float) -> dict[str, Any]:
    while True:
        try:
            with urllib.request.urlopen(url, data=data, timeout=patience) as answer:
                return {"status": answer.status, "body": json.load(answer)}
        except urllib.error.HTTPError as error:
            if error.code != 503 or time.monotonic() > retry_until:
                return {"status": error.code, "body": json.load(error)}
            time.sleep(RETRY_PAUSE_SECONDS)


def main(port: str, code: str, count: str, retry_busy_seconds: str, patience: str) -> None:
    url = f"http://127.0.0.1:{port}/service"
    data = urllib.parse.urlencode({"code": code}).encode()
    retry_until = time.monotonic() + float(retry_busy_seconds)
    with ThreadPoolExecutor(int(count)) as pool:
        answers = pool.map(lambda _: post_until_taken(url, data, retry_until, float(patience)), range(int(count)))
        print(json.dumps(list(answers)))


if __name__ == "__main__":
    main(*sys.argv[1:6])
