"""Writes LINES numbered lines to syslog as PROGRAM ("line N of LINES"), one every INTERVAL seconds.

Usage: syslog_writer.py PROGRAM LINES INTERVAL. One process on a clock: a shell loop forking logger and sleep
per line drifts to minutes on a busy emulated cell, and then still writes after the outage it is meant to span.
Standard library only: it runs on the lab's VMs with their python3.
"""

from __future__ import annotations

import sys
import syslog
import time


def main(program: str, lines: str, interval: str) -> None:
    syslog.openlog(program)
    started = time.monotonic()
    for number in range(1, int(lines) + 1):
        syslog.syslog(f"line {number} of {lines}")
        time.sleep(max(0.0, started + number * float(interval) - time.monotonic()))


if __name__ == "__main__":
    main(*sys.argv[1:4])
