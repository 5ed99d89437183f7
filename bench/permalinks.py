#!/usr/bin/env python3
"""Permalink service throughput on this machine: durable writes/s and reads/s, latency percentiles.

Starts `cellserver permalink` on a loopback port with a fresh SQLite file, drives it with concurrent HTTP
clients for a fixed time per phase, prints a table and writes bench/results/permalinks.json.
Targets (issue 4): >= 1,500 reads/s, >= 500 durable writes/s, p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import urllib.parse
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from http_load import cellserver, drive
from labkit.measure import percentile

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT_ROOT / "bench" / "results" / "permalinks.json"


async def measure(base: str, concurrency: int, seconds: float) -> dict[str, dict[str, float]]:
    written: list[str] = []
    body = urllib.parse.urlencode({"code": "print(1 + 1)\n" * 5})
    results = {}

    def write() -> HTTPRequest:
        return HTTPRequest(f"{base}/permalink", method="POST", body=body)

    client = AsyncHTTPClient()
    for _ in range(50):
        answer = await client.fetch(write())
        written.append(json.loads(answer.body)["query"])
    counter = iter(range(10**9))

    def read() -> HTTPRequest:
        return HTTPRequest(f"{base}/permalink?q={written[next(counter) % len(written)]}")

    for name, factory in (("durable writes", write), ("reads", read)):
        latencies = await drive(factory, concurrency, seconds)
        results[name] = {
            "per_second": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, cellserver("permalink", "--db", f"{scratch}/bench.sqlite3") as url:
        results = asyncio.run(measure(url, args.concurrency, args.seconds))
    targets = {"durable writes": (500, 50), "reads": (1500, 50)}
    print(f"permalink service, SQLite (WAL, synchronous=FULL), concurrency {args.concurrency}, {args.seconds} s each")
    print(f"{'phase':16} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8}   target")
    for name, numbers in results.items():
        rate, p99 = targets[name]
        met = numbers["per_second"] >= rate and numbers["p99_ms"] <= p99
        print(
            f"{name:16} {numbers['per_second']:8.0f} {numbers['p50_ms']:8.2f} {numbers['p99_ms']:8.2f}   "
            f">= {rate}/s, p99 <= {p99} ms: {'met' if met else 'MISSED'}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"concurrency": args.concurrency, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
