#!/usr/bin/env python3
"""`/service` with the Sage kernel on this machine: a laptop server (`make serve-sage`), a fresh kernel per
computation, `print(1+1)` and `print(factor(2^128+1))` at 1, 8 and 32 clients.

Prints, per load: computations/s, p50/p90 latency, 503 refusals (overload is refused, never queued), and the
server's CPU seconds per computation (server, provider and kernels together); then the PSS of the server
tree idle and of each preforked kernel. Writes bench/results/service_sage.json.
Targets (issue 19): >= 10 computations/s at 8 clients, p90 <= 150 ms at 1 client.
Upstream SageMathCell on this machine (issue 19): 1.67/s p50 613 ms (1), 1.90/s (8), 1.90/s (32).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.parse
from pathlib import Path

from tornado.httpclient import HTTPRequest

from http_load import drive, running_cellserver, server_load_arguments
from labkit.measure import percentile

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT_ROOT / "bench" / "results" / "service_sage.json"
CODES = {"print(1+1)": "print(1+1)", "factor": "print(factor(2^128+1))"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def sage_python() -> str:
    python = os.environ.get("CELLFLEET_SAGE_PYTHON") or str(PROJECT_ROOT / ".venv-sage/bin/python")
    if not Path(python).exists():
        raise SystemExit(f"no Sage environment at {python}: run `make sage` first")
    return python


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time of the server tree: every live process's own, plus what exited children left to their parents
    (the provider reaps its kernels, so theirs lands in its cumulative children time)."""
    total = 0.0
    for process in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime
    return total


def pss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def memory(server: int) -> dict[str, float]:
    """PSS of the whole tree and of each preforked kernel (the provider's children; the provider is the server's)."""
    tree = [server, *descendants(server)]
    provider = min(descendants(server))  # started first, before any kernel
    kernels = descendants(provider)
    per_kernel = [pss_mib(kernel) for kernel in kernels]
    return {
        "tree_pss_mib": sum(pss_mib(process) for process in tree),
        "server_pss_mib": pss_mib(server),
        "provider_pss_mib": pss_mib(provider),
        "preforked_kernels": len(kernels),
        "pss_per_preforked_kernel_mib": sum(per_kernel) / len(per_kernel) if per_kernel else 0.0,
    }


def wait_for_reserve(server: int, preforked: int, patience: float = 60.0) -> None:
    """Until the provider (the server's first child) has its preforked kernels, which it starts a few at a time."""
    deadline = time.monotonic() + patience
    while len(descendants(min(descendants(server)))) < preforked:
        if time.monotonic() > deadline:
            raise SystemExit(f"the reserve of {preforked} kernels did not fill within {patience:g} s")
        time.sleep(0.2)


def request(url: str, code: str) -> HTTPRequest:
    body = urllib.parse.urlencode({"code": code, "accepted_tos": "true"})
    return HTTPRequest(f"{url}/service", method="POST", body=body, request_timeout=120)


def measure(url: str, server: int, code: str, clients: int, seconds: float) -> dict[str, float]:
    refusals: list[float] = []
    before = cpu_seconds(server)
    latencies = asyncio.run(drive(lambda: request(url, code), clients, seconds, refusals))
    spent = cpu_seconds(server) - before
    return {
        "per_second": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 0.5) * 1000 if latencies else float("nan"),
        "p90_ms": percentile(latencies, 0.9) * 1000 if latencies else float("nan"),
        "refused_503": len(refusals),
        "cpu_seconds_per_computation": spent / len(latencies) if latencies else float("nan"),
    }


def main() -> None:
    args = server_load_arguments(__doc__.splitlines()[0])
    options = ("serve", "--kernel", "sage", "--max-kernels", str(args.max_kernels), "--preforked",
               str(args.preforked), "--syslog-socket", "/dev/null")  # fmt: skip
    results: dict[str, object] = {"settings": vars(args)}
    with running_cellserver(*options, python=sage_python()) as (url, server):
        asyncio.run(drive(lambda: request(url, "print(1)"), 1, 5.0))  # warm-up
        wait_for_reserve(server.pid, args.preforked)
        results["memory_idle"] = memory(server.pid)
        for name, code in CODES.items():
            for clients in (1, 8, 32):
                results[f"{name} at {clients}"] = measure(url, server.pid, code, clients, args.seconds)
    print(f"/service with the Sage kernel, fresh kernel each, {args.preforked} preforked of {args.max_kernels}, "
          f"{args.seconds:g} s per load")  # fmt: skip
    print(f"{'load':22} {'per s':>7} {'p50 ms':>8} {'p90 ms':>8} {'503s':>6} {'CPU s/comp':>10}")
    for name, numbers in results.items():
        if name in ("settings", "memory_idle"):
            continue
        assert isinstance(numbers, dict)
        print(f"{name:22} {numbers['per_second']:7.2f} {numbers['p50_ms']:8.1f} {numbers['p90_ms']:8.1f} "
              f"{numbers['refused_503']:6d} {numbers['cpu_seconds_per_computation']:10.3f}")  # fmt: skip
    idle = results["memory_idle"]
    assert isinstance(idle, dict)
    print(f"idle: server tree {idle['tree_pss_mib']:.0f} MiB PSS (server {idle['server_pss_mib']:.0f}, provider "
          f"{idle['provider_pss_mib']:.0f}), {idle['preforked_kernels']} preforked kernels at "
          f"{idle['pss_per_preforked_kernel_mib']:.0f} MiB PSS each")  # fmt: skip
    eight = results["print(1+1) at 8"]
    one = results["print(1+1) at 1"]
    assert isinstance(eight, dict) and isinstance(one, dict)
    print(
        f"target >= 10/s at 8 clients: {eight['per_second']:.2f}/s, {'met' if eight['per_second'] >= 10 else 'MISSED'}"
    )
    print(f"target p90 <= 150 ms at 1 client: {one['p90_ms']:.0f} ms, {'met' if one['p90_ms'] <= 150 else 'MISSED'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
