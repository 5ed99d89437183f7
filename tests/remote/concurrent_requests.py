"""Sends COUNT requests at once from the machine it runs on and prints each answer as JSON:
[status, headers, body], or [error name, {}, message] when no HTTP answer came.

Run on the lab's VMs (`python3 -c "$(cat this file)" URL METHOD FIELDS_JSON COUNT`): each VM has its own
address, so the load balancer's per-client limits can be told apart. Standard library only, since the VMs
have nothing else; certificates are not checked because the lab's are self-signed. Redirects are returned,
not followed, so a test sees them.
"""

from __future__ import annotations

import json
import ssl
import sys
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


def main() -> None:
    url, method, fields, count = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    context = ssl._create_unverified_context()
    opener = urllib.request.build_opener(KeepRedirects, urllib.request.HTTPSHandler(context=context))
    data = urllib.parse.urlencode(fields).encode() if method == "POST" else None

    def one(_index: int) -> tuple[int | str, dict[str, str], str]:
        try:
            with opener.open(urllib.request.Request(url, data=data, method=method), timeout=120) as answer:
                return answer.status, lowered(answer.headers), answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, lowered(error.headers), error.read().decode()
        except Exception as error:  # a refused or reset connection is an answer to count
            return type(error).__name__, {}, str(error)

    with ThreadPoolExecutor(min(count, 64)) as pool:
        print(json.dumps(list(pool.map(one, range(count)))))


if __name__ == "__main__":
    main()
