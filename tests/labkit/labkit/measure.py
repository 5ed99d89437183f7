"""Numbers from loads: percentiles, and the lab's load generator (tests/remote/http_load.py) run on a VM with
its run summed up the same way for every benchmark."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from labkit.lab import ssh
from labkit.sending import SCRIPTS, script_command


def percentile(values: Sequence[float], share: float) -> float:
    """The value that share of the values do not exceed (nan when there are none); values in any order."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def load_from_vm(address: str, spec: dict[str, Any]) -> dict[str, Any]:
    """http_load.py's run on the VM at address (spec as its docstring says): the good answers' latencies and
    every outcome counted."""
    return json.loads(ssh(address, script_command(SCRIPTS / "http_load.py", json.dumps(spec))))


def summary(run: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Good answers per second, their median, p90 and p99 in ms, every outcome, and how many were not good."""
    latencies = run["latencies"]
    return {
        "per_second": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p90_ms": percentile(latencies, 0.9) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "outcomes": run["outcomes"],
        "failures": sum(run["outcomes"].values()) - len(latencies),
    }
