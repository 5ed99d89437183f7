"""GETs URL and prints the answer's body (or with --status, its status code); exits 1 with the reason on
stderr when no 2xx answer came within the timeout.

Usage: http_get.py URL [--timeout SECONDS] [--status]. Standard library only: it runs on the lab's VMs with
their python3.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=10)
    parser.add_argument("--status", action="store_true", help="print the status code instead of the body")
    arguments = parser.parse_args()
    try:
        with urllib.request.urlopen(arguments.url, timeout=arguments.timeout) as answer:
            print(answer.status if arguments.status else answer.read().decode())
    except (urllib.error.URLError, OSError) as error:
        print(f"{arguments.url}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
