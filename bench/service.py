#!/usr/bin/env python3
"""`/service` throughput and latency on this machine for `print(1+1)`, every computation in a fresh kernel.

Starts `cellserver serve` (no worker pool: kernels as the current user, forked from the provider) and
drives it at concurrency 1 and 8. Prints a table and writes bench/results/service.json.
Targets (issue 4): >= 20 computations/s at concurrency 8, p50 <= 100 ms at concurrency 1.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from pathlib import Path

from tornado.httpclient import HTTPRequest

from http_load import cellserver, drive, server_load_arguments
from labkit.measure import percentile

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT_ROOT / "bench" / "results" / "service.json"
BODY = urllib.parse.urlencode({"code": "print(1+1)"})


def request_factory(url: str) -> HTTPRequest:
    return HTTPRequest(f"{url}/service", method="POST", body=BODY, request_timeout=120)


def main() -> None:
    args = server_load_arguments(__doc__.splitlines()[0])
    results = {}
    options = ("serve", "--max-kernels", str(args.max_kernels), "--preforked", str(args.preforked))
    with cellserver(*options) as url:
        asyncio.run(drive(lambda: request_factory(url), 1, 3.0))  # warm-up: fills the preforked reserve
        for concurrency in (1, 8):
            latencies = asyncio.run(drive(lambda: request_factory(url), concurrency, args.seconds))
            results[f"concurrency {concurrency}"] = {
                "per_second": len(latencies) / args.seconds,
                "p50_ms": percentile(latencies, 0.5) * 1000,
                "p90_ms": percentile(latencies, 0.9) * 1000,
            }
    print(f"/service print(1+1), fresh kernel each, {args.preforked} preforked of {args.max_kernels}, {args.seconds} s")
    print(f"{'load':16} {'per s':>7} {'p50 ms':>8} {'p90 ms':>8}   target")
    targets = {"concurrency 1": "p50 <= 100 ms", "concurrency 8": ">= 20/s"}
    for name, numbers in results.items():
        met = numbers["p50_ms"] <= 100 if name.endswith(" 1") else numbers["per_second"] >= 20
        print(
            f"{name:16} {numbers['per_second']:7.1f} {numbers['p50_ms']:8.1f} {numbers['p90_ms']:8.1f}   "
            f"{targets[name]}: {'met' if met else 'MISSED'}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
