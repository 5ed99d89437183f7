"""Posts one computation to the cell server on this VM's loopback and prints the answer as JSON:
{"status", "headers", "body", "seconds"}.

Usage: post_service.py PORT CODE. Standard library only: it runs on the lab's VMs with their python3.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def main(port: str, code: str) -> None:
    data = urllib.parse.urlencode({"code": code}).encode()
    sent = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/service", data=data, timeout=120) as answer:
            status, headers, body = answer.status, dict(answer.headers), json.load(answer)
    except urllib.error.HTTPError as error:
        status, headers, body = error.code, dict(error.headers), json.load(error)
    print(json.dumps({"status": status, "headers": headers, "body": body, "seconds": time.monotonic() - sent}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
