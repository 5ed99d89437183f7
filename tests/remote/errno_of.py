"""Runs Python statements and tells which failed with which errno: the worker pool tests' probe of what a
worker may do.

Usage: errno_of.py CODE: prints OK, or the errno CODE's OSError carried.
       errno_of.py --each ATTACKS_JSON NAMES_JSON: runs every attack ({label: code}) on every name (bound to p in
       the code) and prints {"label name": "OK" or errno} as JSON: one run, since each launch costs seconds.
Standard library only: it runs as a worker on the lab's VMs with their python3.
"""

from __future__ import annotations

import json
import os
import shutil
import sys


def outcome(code: str, p: str = "") -> str | int:
    """OK, or the errno of the OSError code raised (with os, shutil and p within its reach)."""
    try:
        exec(code, {"os": os, "shutil": shutil, "p": p})  # the tests' own probes, run as the worker
    except OSError as error:
        return error.errno
    return "OK"


def main(arguments: list[str]) -> None:
    if arguments[0] == "--each":
        attacks, names = json.loads(arguments[1]), json.loads(arguments[2])
        print(json.dumps({f"{label} {p}": outcome(code, p) for label, code in attacks.items() for p in names}))
    else:
        print(outcome(arguments[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
