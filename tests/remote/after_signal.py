"""Sends a signal to a systemd unit and times its recovery, printed as JSON: {"new_process": seconds until systemd
names another main process, "running": seconds until the unit is active and running again (a Type=notify unit:
ready), "healthy": seconds until HEALTH_URL answered 2xx from it, "resumed": whether a stopped unit was sent SIGCONT
because nothing replaced it, "old_pid" and "pid": the unit's main process before the signal and at the end};
null for what did not happen within LIMIT seconds.

Usage: after_signal.py UNIT SIGNAL LIMIT [--whole-unit] [--health URL] [--resume-after SECONDS].
SIGNAL goes to the main process, or with --whole-unit to every process of the unit. With --resume-after, a unit
whose process is not replaced within that time gets SIGCONT (a stop that no watchdog notices must still end), and
then counts as running when its old process runs on.
Runs on the VM, so the clock is not blurred by an SSH round trip per probe; it polls every 0.1 s. Standard library
only: it runs on the lab's VMs with their python3.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
import urllib.request

POLL_SECONDS = 0.1


def unit_state(unit: str) -> tuple[str, int]:
    """("ActiveState/SubState", MainPID) of the unit; systemctl prints properties in its own order."""
    command = ["systemctl", "show", "-p", "ActiveState,SubState,MainPID", unit]
    lines = subprocess.run(command, capture_output=True, text=True, check=False).stdout.split()
    state = dict(line.split("=", 1) for line in lines if "=" in line)
    return f"{state.get('ActiveState')}/{state.get('SubState')}", int(state.get("MainPID") or 0)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return 200 <= answer.status < 300
    except OSError:
        return False


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("unit")
    parser.add_argument("signal", help="a name such as SIGKILL")
    parser.add_argument("limit", type=float, help="seconds to wait for the recovery")
    parser.add_argument("--whole-unit", action="store_true", help="signal every process of the unit")
    parser.add_argument("--health", help="a URL the recovered unit answers 2xx")
    parser.add_argument("--resume-after", type=float, help="SIGCONT the unit if not replaced after these seconds")
    return parser.parse_args()


def main() -> None:
    asked = arguments()
    _state, old = unit_state(asked.unit)
    if asked.whole_unit:
        subprocess.run(["systemctl", "kill", "-s", asked.signal, asked.unit], check=True)
    else:
        os.kill(old, getattr(signal, asked.signal))
    started = time.monotonic()
    times: dict[str, float | None] = {"new_process": None, "running": None, "healthy": None}
    resumed = False
    pid = old
    while time.monotonic() - started < asked.limit:
        state, pid = unit_state(asked.unit)
        elapsed = time.monotonic() - started  # when the state was read, not when the read began
        replaced = pid not in (0, old)
        if replaced and times["new_process"] is None:
            times["new_process"] = elapsed
        if asked.resume_after is not None and not replaced and not resumed and elapsed > asked.resume_after:
            subprocess.run(["systemctl", "kill", "-s", "SIGCONT", asked.unit], check=False)
            resumed = True
        if times["running"] is None and state == "active/running" and (replaced or (resumed and pid == old)):
            times["running"] = elapsed
        # The old process cannot answer (dead or stopped): an answer comes from its replacement.
        if times["running"] is not None and (asked.health is None or answers(asked.health)):
            times["healthy"] = time.monotonic() - started if asked.health else None
            break
        time.sleep(POLL_SECONDS)
    print(json.dumps({**times, "resumed": resumed, "old_pid": old, "pid": pid}))


if __name__ == "__main__":
    main()
