#!/usr/bin/env python3
"""Worker pool benchmarks on a converged lab cell: what confinement costs per computation.

Measures, on the cell itself (one SSH session, timings taken inside the VM so SSH does not count):
- launch: `sudo cellfleet-worker-run WORKER -- true` as the launcher account, start to exit;
- launch + Python: the same with `python3 -c pass` (what a kernel start adds on top);
- reset of a clean worker, and of one that left files in its home, /tmp and /dev/shm;
- the bare cost of `systemd-run --wait true` as root, to show how much of the launch is systemd.
The live kernel provider owns every worker of the pool (it keeps preforked kernels in some and resets a worker
after each computation, killing all its processes), so the cell server, its provider and its health timer are
stopped while this measures and started again after.
Prints a table and writes bench/results/worker_pool.json. Run with `make bench-workers` after `make up`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from labkit import units
from labkit.lab import CELLS, ssh, ssh_command

PROJECT_ROOT = Path(__file__).resolve().parent.parent

RESULTS = PROJECT_ROOT / "bench" / "results" / "worker_pool.json"

# Stopped in this order, started again in the reverse one (the server needs its provider).
LIVE_POOL_UNITS = (units.CELL_HEALTH_TIMER, units.CELL_SERVER, units.KERNEL_PROVIDER)
# A check the timer already started outlives it, and restarts the server (and provider) it finds stopped.
HEALTH_CHECK_UNIT = units.CELL_HEALTH
RUN = "runuser -u cellserver -- sudo -n /usr/local/sbin/cellfleet-worker-run"
RESET = "runuser -u cellserver -- sudo -n /usr/local/sbin/cellfleet-worker-reset"
CASES = {
    "systemd-run --wait true (root, no confinement)": "systemd-run --quiet --pipe --wait --collect true",
    "launch: cellfleet-worker-run -- true": f"{RUN} cellw01 -- true",
    "launch: cellfleet-worker-run -- python3 -c pass": f"{RUN} cellw01 -- python3 -c pass",
    "reset of a clean worker": f"{RESET} cellw02 >/dev/null",
    "reset after litter (home, /tmp, /dev/shm, 200 files)": (
        f"{RUN} cellw03 -- bash -c 'mkdir -p d && for i in $(seq 200); do echo x > d/$i; done; "
        f"echo x > /tmp/t; echo x > /dev/shm/s' && START && {RESET} cellw03 >/dev/null"
    ),
}


def remote_timing_script(command: str, repeats: int) -> str:
    """Bash that runs command repeats times and prints one duration (seconds) per run.

    START inside a command restarts the clock, so set-up before it is not measured.
    """
    timed = command.replace("START", "t0=$(date +%s.%N)")
    return (
        f"for i in $(seq {repeats}); do t0=$(date +%s.%N); {timed} || exit 1; "
        'echo "$(date +%s.%N) $t0" | awk \'{printf "%.4f\\n", $1 - $2}\'; done'
    )


@contextmanager
def pool_to_ourselves(address: str) -> Iterator[None]:
    """The live pool's units stopped for the measurement, the ones that were running started again after."""
    # One line per unit, in the order asked.
    states = ssh(address, f"systemctl is-active {' '.join(LIVE_POOL_UNITS)}", check=False).split()
    running = [unit for unit, state in zip(LIVE_POOL_UNITS, states, strict=True) if state == "active"]
    if running:
        print(f"stopping while measuring: {' '.join(running)}")
        ssh(address, f"systemctl stop {HEALTH_CHECK_UNIT} {' '.join(running)}")
    try:
        yield
    finally:
        if running:
            ssh(address, f"systemctl start {' '.join(reversed(running))}")
            print(f"started again: {' '.join(reversed(running))}")


def durations_of(address: str, command: str, repeats: int) -> list[float]:
    """Sorted durations of repeats runs of command on the VM; a failing run ends the benchmark with its stderr."""
    script = remote_timing_script(command, repeats)
    run = subprocess.run(ssh_command(address, script), capture_output=True, text=True, timeout=1800, check=False)
    if run.returncode != 0:
        raise SystemExit(f"failed (exit {run.returncode}) on {address}: {command}\n{run.stderr.strip()}")
    return sorted(float(line) for line in run.stdout.split())


def summary(durations: list[float]) -> dict[str, float | list[float]]:
    return {
        "median_s": statistics.median(durations),
        "p90_s": durations[max(0, round(0.9 * len(durations)) - 1)],
        "min_s": durations[0],
        "runs": durations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=CELLS["cell1"], help="a converged cell (default: the lab's cell1)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with pool_to_ourselves(args.address):
        results = {name: summary(durations_of(args.address, command, args.repeats)) for name, command in CASES.items()}
    print(f"worker pool on {args.address}, {args.repeats} runs each (QEMU TCG, 1 vCPU)")
    print(f"{'case':58} {'median s':>9} {'p90 s':>7} {'min s':>7}")
    for name, numbers in results.items():
        print(f"{name:58} {numbers['median_s']:9.3f} {numbers['p90_s']:7.3f} {numbers['min_s']:7.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"address": args.address, "results": results}, indent=2) + "\n")
    print(f"written: {RESULTS.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    main()
