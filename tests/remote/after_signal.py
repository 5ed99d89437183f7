"""Sends a signal to the cell server and times its replacement, printed as JSON: {"new_process": seconds until
systemd names another main process, "healthy": seconds until that process answered /health} (null for what did
not happen within LIMIT seconds).

Usage: after_signal.py PORT PID SIGNAL LIMIT. Runs on the cell, so the clock is not blurred by an SSH round trip
per probe; it polls every 0.1 s. Standard library only: it runs on the lab's VMs with their python3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

POLL_SECONDS = 0.1


def main_pid() -> int:
    command = ["systemctl", "show", "-p", "MainPID", "--value", "cellserver"]
    return int(subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip() or 0)


def answers_health(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read()
    except OSError:
        return False
    return True


def main(port: str, pid: str, signame: str, limit: str) -> None:
    old = int(pid)
    os.kill(old, getattr(signal, signame))
    started = time.monotonic()
    new_process: float | None = None
    healthy: float | None = None
    while healthy is None and time.monotonic() - started < float(limit):
        if new_process is None and main_pid() not in (0, old):
            new_process = time.monotonic() - started
        # The old process cannot answer (dead or stopped): an answer comes from its replacement.
        if answers_health(int(port)) and main_pid() != old:
            healthy = time.monotonic() - started
        else:
            time.sleep(POLL_SECONDS)
    print(json.dumps({"new_process": new_process, "healthy": healthy}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
