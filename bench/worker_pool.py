#!/usr/bin/env python3
"""Worker pool benchmarks on a converged lab cell: what confinement costs per computation.

Measures, on the cell itself (one SSH session, timings taken inside the VM so SSH does not count):
- launch: `sudo cellfleet-worker-run WORKER -- true` as the launcher account, start to exit;
- launch + Python: the same with `python3 -c pass` (what a kernel start adds on top);
- reset of a clean worker, and of one that left files in its home, /tmp and /dev/shm;
- the bare cost of `systemd-run --wait true` as root, to show how much of the launch is systemd.
Prints a table and writes bench/results/worker_pool.json. Run with `make bench-workers` after `make up`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT / "tests" / "cluster"))

from lab import ssh  # noqa: E402

RESULTS = PROJECT_ROOT / "bench" / "results" / "worker_pool.json"

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="10.77.0.12", help="a converged cell (default: the lab's cell1)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    results = {}
    print(f"worker pool on {args.address}, {args.repeats} runs each (QEMU TCG, 1 vCPU)")
    print(f"{'case':58} {'median s':>9} {'p90 s':>7} {'min s':>7}")
    for name, command in CASES.items():
        durations = sorted(
            float(line) for line in ssh(args.address, remote_timing_script(command, args.repeats)).split()
        )
        p90 = durations[max(0, round(0.9 * len(durations)) - 1)]
        results[name] = {
            "median_s": statistics.median(durations),
            "p90_s": p90,
            "min_s": durations[0],
            "runs": durations,
        }
        print(f"{name:58} {statistics.median(durations):9.3f} {p90:7.3f} {durations[0]:7.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"address": args.address, "results": results}, indent=2) + "\n")
    print(f"written: {RESULTS.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    main()
