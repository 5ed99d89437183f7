#!/usr/bin/env python3
"""Cluster operations on the lab, timed: a snapshot of a serving cell, a new cell from it to serving (clone,
boot, converge, health check, into the load balancer) with the share of each step, its removal, and a rolling
update of both cells under a steady load, whose latency over time is plotted.

The steps' times come from the playbooks' own task timer (ansible.posix.profile_tasks): each play of
add-server.yml is a step. Everything runs under QEMU emulation (no KVM here). Prints a table, writes
bench/results/cluster_ops.json and bench/results/rolling_update_latency.png. `make bench-cluster` after
`make up`; takes about 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import ROLLING_UPDATE_PLOT, headless_pyplot

from labkit.lab import (
    CELLS,
    LOAD_BALANCER,
    NEW_CELL,
    installed_release,
    inventory_with_new_cell,
    playbook,
    release_of_app,
    wheelhouse_for,
)
from labkit.load import Sample, SteadyLoad

PROJECT_ROOT = Path(__file__).resolve().parent.parent

RESULTS = PROJECT_ROOT / "bench" / "results"
TARGET_CLONE_TO_SERVING_S = 300
ELAPSED = re.compile(r"\s(\d+):(\d\d):(\d\d\.\d+) \*+\s*$")
RUNTIME_ADD_PLAY = "Put the new server into every load balancer, at runtime"
# add-server.yml's plays, grouped into the steps the target names.
STEPS = {
    "Check the new server's name": "check",
    "Clone the VMs on their hypervisor": "clone",
    "Wait for the new VMs to answer SSH": "boot",
    "Check the new server with real computations": "health",
    RUNTIME_ADD_PLAY: "load balancer",
    "HAProxy in front of the cells and the permalink service": "load balancer",
}


def play_durations(output: str) -> list[tuple[str, float]]:
    """(play name, seconds) from ansible-playbook output with the profile_tasks timer."""
    starts: list[tuple[str, float | None]] = []
    last = 0.0
    for line in output.splitlines():
        if line.startswith("PLAY [") and not line.startswith("PLAY RECAP"):
            starts.append((line[6 : line.index("]")], None))
        match = ELAPSED.search(line)
        if match:
            hours, minutes, seconds = match.groups()
            last = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
            if starts and starts[-1][1] is None:
                starts[-1] = (starts[-1][0], last)
    bounds = [(name, start if start is not None else last) for name, start in starts] + [("end", last)]
    return [(name, bounds[i + 1][1] - start) for i, (name, start) in enumerate(bounds[:-1])]


def steps_of(durations: list[tuple[str, float]]) -> dict[str, float]:
    steps: dict[str, float] = {}
    for name, seconds in durations:
        step = STEPS.get(name, "converge")
        steps[step] = steps.get(step, 0.0) + seconds
    return steps


def serving_after(plays: list[tuple[str, float]]) -> float:
    """Seconds from the playbook's start to the end of the play that adds the cell to the running HAProxies."""
    elapsed = 0.0
    for name, seconds in plays:
        elapsed += seconds
        if name == RUNTIME_ADD_PLAY:
            return elapsed
    return elapsed


def timed(name: str, *arguments: str, **options: Any) -> tuple[float, str]:
    started = time.monotonic()
    result = playbook(name, *arguments, **options)
    took = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stdout[-4000:]}")
    return took, result.stdout


def roll_out(source: Path, version: str) -> tuple[float, str]:
    return timed(
        "rolling-update.yml", "-e", f"cellserver_app_source={source}",
        "-e", f"cellserver_app_wheelhouse={wheelhouse_for(source)}", "-e", f"rolling_update_expect_version={version}",
    )  # fmt: skip


def plot(samples: list[Sample], marks: dict[str, float], path: Path) -> None:
    plt = headless_pyplot()
    origin = min(sample.started for sample in samples)
    figure, axes = plt.subplots(figsize=(10, 4.5))
    for outcome in sorted({sample.outcome for sample in samples}):
        chosen = [sample for sample in samples if sample.outcome == outcome]
        color = "tab:blue" if outcome == "200" else "tab:red"
        times, latencies = [s.started - origin for s in chosen], [s.seconds for s in chosen]
        axes.scatter(times, latencies, s=12, label=f"{outcome} ({len(chosen)})", color=color)
    for label, stamp in marks.items():
        axes.axvline(stamp - origin, color="grey", linestyle="--", linewidth=0.8)
        axes.annotate(label, (stamp - origin, axes.get_ylim()[1]), rotation=90, va="top", ha="right", fontsize=8)
    axes.set_xlabel("seconds since the load started")
    axes.set_ylabel("request latency (s)")
    axes.set_title("print(1+1) through HAProxy during a rolling update of 2 cells (lab, QEMU emulation)")
    axes.legend(loc="upper center")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-rolling-update", action="store_true", help="only the new cell's timings")
    parser.add_argument("--skip-new-cell", action="store_true", help="no snapshot, add-server or removal")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cellfleet-bench-") as scratch_name:
        scratch = Path(scratch_name)
        if not args.skip_new_cell:
            report.update(new_cell_timings(scratch))
        if not args.skip_rolling_update:
            report["rolling_update"] = rolling_update(scratch)
    print_report(report)
    # A partial run (--skip-...) updates its own parts of the last report; each part says when it was measured.
    path = RESULTS / "cluster_ops.json"
    previous = (
        json.loads(path.read_text()) if path.exists() and (args.skip_new_cell or args.skip_rolling_update) else {}
    )
    path.write_text(json.dumps({**previous, **report}, indent=2) + "\n")


def new_cell_timings(scratch: Path) -> dict[str, Any]:
    """A snapshot of serving cell1, add-server.yml of a new cell from it (per play), remove-server.yml."""
    report: dict[str, Any] = {"new_cell_measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    snapshot_name = f"bench-cell1-{int(time.time())}"
    took, _ = timed("snapshot.yml", "-e", "snapshot_source=cell1", "-e", f"snapshot_name={snapshot_name}")
    report["snapshot_s"] = round(took, 1)
    inventories = (PROJECT_ROOT / "inventory" / "lab" / "hosts.yml", inventory_with_new_cell(scratch))
    try:
        took, output = timed("add-server.yml", "-e", f"name={NEW_CELL}", "-e",
                             f"add_server_from={snapshot_name}", inventories=inventories)  # fmt: skip
        report["clone_to_serving_s"] = round(took, 1)
        (RESULTS / "add_server_output.txt").write_text(output)  # every task's time, for a closer look
        plays = play_durations(output)
        report["clone_to_serving_steps_s"] = {step: round(seconds, 1) for step, seconds in steps_of(plays).items()}
        report["clone_to_serving_plays_s"] = [[name, round(seconds, 1)] for name, seconds in plays]
        # The cell serves once the runtime add is done; writing HAProxy's configuration comes after.
        report["serving_after_s"] = round(serving_after(plays), 1)
    finally:
        took, _ = timed("remove-server.yml", "-e", f"name={NEW_CELL}")
        report["remove_server_s"] = round(took, 1)
        subprocess.run(["rm", "-rf", f"/var/cache/cellfleet/snapshots/{snapshot_name}"], check=True)
    return report


def rolling_update(scratch: Path) -> dict[str, Any]:
    baseline = installed_release(CELLS["cell1"])
    version = f"0.1.{int(time.time())}"
    release = release_of_app(scratch / "app", version)
    marks: dict[str, float] = {}
    with SteadyLoad(f"https://{LOAD_BALANCER}/service") as load:
        time.sleep(15)
        marks["rollout starts"] = time.monotonic()
        took, _ = roll_out(release, version)
        marks["rollout done"] = time.monotonic()
        time.sleep(15)
    samples = list(load.samples)
    plot(samples, marks, RESULTS / ROLLING_UPDATE_PLOT)
    rollback, _ = roll_out(PROJECT_ROOT / "app", baseline)
    during = sorted(s.seconds for s in samples if marks["rollout starts"] <= s.started <= marks["rollout done"])
    return {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cells": len(CELLS), "seconds": round(took, 1), "rollback_seconds": round(rollback, 1),
        "outcomes": dict(load.outcomes()), "requests_during": len(during),
        "p50_during_s": round(during[len(during) // 2], 2) if during else None,
        "max_during_s": round(during[-1], 2) if during else None,
        "plot": f"bench/results/{ROLLING_UPDATE_PLOT}",
    }  # fmt: skip


def print_report(report: dict[str, Any]) -> None:
    if "snapshot_s" in report:
        print(f"snapshot of a serving cell: {report['snapshot_s']} s")
    if "clone_to_serving_s" in report:
        total = report["clone_to_serving_s"]
        serving = report["serving_after_s"]
        verdict = "met" if serving <= TARGET_CLONE_TO_SERVING_S else "NOT met"
        print(f"clone to serving (add-server.yml from the snapshot): in rotation after {serving} s "
              f"(target <= {TARGET_CLONE_TO_SERVING_S} s: {verdict}); playbook done, HAProxy's configuration "
              f"written, after {total} s")  # fmt: skip
        for step, seconds in report["clone_to_serving_steps_s"].items():
            print(f"  {step:<14} {seconds:7.1f} s  {100 * seconds / total:5.1f} %")
        print("  by play:")
        for name, seconds in report["clone_to_serving_plays_s"]:
            print(f"    {seconds:7.1f} s  {name}")
    if "remove_server_s" in report:
        print(f"remove-server.yml: {report['remove_server_s']} s")
    if "rolling_update" in report:
        rolling = report["rolling_update"]
        print(f"rolling update of {rolling['cells']} cells: {rolling['seconds']} s under load {rolling['outcomes']};")
        print(f"  latency during it: p50 {rolling['p50_during_s']} s, max {rolling['max_during_s']} s")
        print(f"  plot: {rolling['plot']}")


if __name__ == "__main__":
    main()
