"""Reads back the permalinks whose ids come as a JSON list on stdin and prints id -> stored code as JSON
(or the error's repr where a read failed).

Usage: permalink_reader.py URL < IDS_JSON. Standard library only: it runs on the lab's VMs with their python3.
"""

from __future__ import annotations

import json
import sys
import urllib.request


def main(url: str) -> None:
    found: dict[str, str] = {}
    for ident in json.loads(sys.stdin.read()):
        try:
            with urllib.request.urlopen(f"{url}?q={ident}", timeout=10) as answer:
                found[ident] = json.load(answer)[0]
        except Exception as error:  # the test shows what went wrong for each id
            found[ident] = repr(error)
    print(json.dumps(found))


if __name__ == "__main__":
    main(sys.argv[1])
