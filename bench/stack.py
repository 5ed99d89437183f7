#!/usr/bin/env python3
"""The service stack on the lab: computations and permalink reads through HAProxy with TLS, beside the same
requests sent straight to the cells and the permalink service, so the load balancer's cost is a ratio.

The load runs on the load balancer's VM for both paths, so the client is the same: "through HAProxy" goes to
https://127.0.0.1 there (TLS, rate-limit tables, leastconn, then the mesh); "direct" goes over the mesh to
each cell's nginx and to the permalink service, spread over the cells as HAProxy spreads it. Each client
keeps one connection open. While it runs, HAProxy exempts 127.0.0.1 from its rate limits through the
runtime API (`add acl`) and takes the exemption back afterwards. Everything runs under QEMU emulation, the
client included, so absolute numbers are far below real hardware; the ratio is the point.
Prints a table and writes bench/results/stack.json. Run with `make bench-stack` after `make up`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from labkit.lab import CELLS, DATA_HOST, LOAD_BALANCER, PERMALINK_PORT, mesh_address, rate_limits_exempted, ssh
from labkit.measure import load_from_vm, summary
from labkit.sending import answers_from, requests_command

PROJECT_ROOT = Path(__file__).resolve().parent.parent

RESULTS = PROJECT_ROOT / "bench" / "results" / "stack.json"


def drive(
    client: str, urls: list[str], method: str, form: dict, expect: str | None, clients: int, seconds: float
) -> dict[str, Any]:
    """Load from the client VM; expect is a text the good answers contain (None: any 200)."""
    spec = {"urls": urls, "method": method, "form": form, "expect": expect, "concurrency": clients, "seconds": seconds}
    return summary(load_from_vm(client, spec), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-balancer", default=LOAD_BALANCER, help="the load balancer (runs the load too)")
    parser.add_argument("--cells", nargs="+", help="mesh addresses (default: the lab's cells')")
    parser.add_argument("--permalink-host", help="mesh address (default: the lab's permalink host's)")
    parser.add_argument("--seconds", type=float, default=30.0, help="per computation load")
    parser.add_argument("--read-seconds", type=float, default=10.0, help="per permalink read load")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="clients at once")
    args = parser.parse_args()
    lb = args.load_balancer
    cells = args.cells or [mesh_address(address) for address in CELLS.values()]
    permalink_host = args.permalink_host or mesh_address(DATA_HOST)
    balanced = "https://127.0.0.1"
    computation = {"code": "print(1+1)"}
    results: dict[str, Any] = {"through HAProxy+TLS": {}, "direct": {}}
    with rate_limits_exempted("127.0.0.1", lb):
        drive(lb, [f"{balanced}/service"], "POST", computation, None, 2, 5)  # warm-up: the reserves fill
        for clients in args.concurrency:
            load = f"print(1+1), {clients} client{'s' * (clients > 1)}"
            results["through HAProxy+TLS"][load] = drive(
                lb, [f"{balanced}/service"], "POST", computation, '"2\\n"', clients, args.seconds
            )
            direct = [f"http://{cell}/service" for cell in cells]
            results["direct"][load] = drive(lb, direct, "POST", computation, '"2\\n"', clients, args.seconds)
        [(_status, _headers, made)] = answers_from(
            ssh(lb, requests_command(f"{balanced}/permalink", "POST", {"code": "print('bench')"}))
        )
        ident = json.loads(made)["query"]
        load = "permalink reads, 8 clients"
        read = f"/permalink?q={ident}"
        results["through HAProxy+TLS"][load] = drive(lb, [balanced + read], "GET", {}, "bench", 8, args.read_seconds)
        results["direct"][load] = drive(
            lb, [f"http://{permalink_host}:{PERMALINK_PORT}{read}"], "GET", {}, "bench", 8, args.read_seconds
        )
    print(f"Lab under QEMU emulation; load from {lb} itself, keep-alive clients; ratio = HAProxy+TLS / direct")
    print(f"{'load':28} {'path':20} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6}  outcomes")
    for load, direct_numbers in results["direct"].items():
        for path in ("direct", "through HAProxy+TLS"):
            numbers = results[path][load]
            ratio = numbers["per_second"] / direct_numbers["per_second"] if direct_numbers["per_second"] else 0.0
            print(f"{load:28} {path:20} {numbers['per_second']:8.2f} {numbers['p50_ms']:8.0f} "
                  f"{numbers['p99_ms']:8.0f} {ratio:6.2f}  {numbers['outcomes']}")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
