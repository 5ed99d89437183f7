"""Sends COUNT requests at once from the machine it runs on and prints each answer as JSON:
[[status, headers, body], ...], with [error name, {}, message] where no HTTP answer came.

Usage: http_requests.py URL [--method GET|POST] [--form JSON] [--count N] [--timeout SECONDS].
Run on the lab's VMs: each VM has its own address, so the load balancer's per-client limits can be told apart,
and a cell's loopback services are reached as nginx reaches them. Standard library only, since the VMs have
nothing else; certificates are not checked because the lab's are self-signed. Redirects are returned, not
followed, so a test sees them.
"""

from __future__ import annotations

import argparse
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from typing import Any


class KeepRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_arguments: Any, **_keywords: Any) -> None:
        return None


def lowered(headers: Message) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--method", choices=("GET", "POST"), default="GET")
    parser.add_argument("--form", type=json.loads, default={}, help="POST fields as a JSON object")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for each answer")
    return parser.parse_args()


def main() -> None:
    asked = arguments()
    context = ssl._create_unverified_context()
    opener = urllib.request.build_opener(KeepRedirects, urllib.request.HTTPSHandler(context=context))
    data = urllib.parse.urlencode(asked.form).encode() if asked.method == "POST" else None

    def one(_index: int) -> tuple[int | str, dict[str, str], str]:
        request = urllib.request.Request(asked.url, data=data, method=asked.method)
        try:
            with opener.open(request, timeout=asked.timeout) as answer:
                return answer.status, lowered(answer.headers), answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, lowered(error.headers), error.read().decode()
        except Exception as error:  # a refused or reset connection is an answer to count
            return type(error).__name__, {}, str(error)

    with ThreadPoolExecutor(min(asked.count, 64)) as pool:
        print(json.dumps(list(pool.map(one, range(asked.count)))))


if __name__ == "__main__":
    main()
