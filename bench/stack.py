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
import shlex
from pathlib import Path
from typing import Any

from labkit.lab import rate_limits_exempted, ssh

PROJECT_ROOT = Path(__file__).resolve().parent.parent

RESULTS = PROJECT_ROOT / "bench" / "results" / "stack.json"

# Runs on the client VM: concurrency threads, each with one keep-alive connection to its URL (round robin
# over the URLs), sending requests back to back for a while. Prints latencies of good answers and the rest.
LOAD = r"""
import http.client, json, ssl, sys, threading, time, urllib.parse
spec = json.loads(sys.argv[1])
context = ssl._create_unverified_context()
body = urllib.parse.urlencode(spec["form"]).encode() if spec["form"] else None
headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
latencies, outcomes, lock = [], {}, threading.Lock()
deadline = time.monotonic() + spec["seconds"]
def connect(url):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=120, context=context)
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=120)
def client(url):
    connection, target = connect(url), urllib.parse.urlsplit(url)
    path = target.path + ("?" + target.query if target.query else "")
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            connection.request(spec["method"], path, body=body, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
            outcome = str(answer.status)
            ok = answer.status == 200 and (spec["expect"] is None or spec["expect"] in data.decode())
        except Exception as error:
            outcome, ok = type(error).__name__, False
            connection.close()
            connection = connect(url)
        with lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if ok:
                latencies.append(time.monotonic() - started)
threads = [threading.Thread(target=client, args=(spec["urls"][i % len(spec["urls"])],))
           for i in range(spec["concurrency"])]
for thread in threads: thread.start()
for thread in threads: thread.join()
print(json.dumps({"latencies": sorted(latencies), "outcomes": outcomes}))
"""


MAKE_PERMALINK = r"""
import ssl, sys, urllib.parse, urllib.request
data = urllib.parse.urlencode({"code": "print('bench')"}).encode()
context = ssl._create_unverified_context()
print(urllib.request.urlopen(sys.argv[1], data, context=context).read().decode())
"""


def percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def drive(
    client: str, urls: list[str], method: str, form: dict, expect: str | None, clients: int, seconds: float
) -> dict[str, Any]:
    """Load from the client VM; expect is a text the good answers contain (None: any 200)."""
    spec = {"urls": urls, "method": method, "form": form, "expect": expect, "concurrency": clients, "seconds": seconds}
    run = json.loads(ssh(client, f"python3 -c {shlex.quote(LOAD)} {shlex.quote(json.dumps(spec))}"))
    latencies = run["latencies"]
    return {
        "per_second": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "outcomes": run["outcomes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-balancer", default="10.77.0.11", help="the load balancer (runs the load too)")
    parser.add_argument("--cells", nargs="+", default=["10.78.0.12", "10.78.0.13"], help="mesh addresses")
    parser.add_argument("--permalink-host", default="10.78.0.14", help="mesh address")
    parser.add_argument("--seconds", type=float, default=30.0, help="per computation load")
    parser.add_argument("--read-seconds", type=float, default=10.0, help="per permalink read load")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="clients at once")
    args = parser.parse_args()
    lb = args.load_balancer
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
            direct = [f"http://{cell}/service" for cell in args.cells]
            results["direct"][load] = drive(lb, direct, "POST", computation, '"2\\n"', clients, args.seconds)
        ident = json.loads(ssh(lb, f"python3 -c {shlex.quote(MAKE_PERMALINK)} {balanced}/permalink"))["query"]
        load = "permalink reads, 8 clients"
        read = f"/permalink?q={ident}"
        results["through HAProxy+TLS"][load] = drive(lb, [balanced + read], "GET", {}, "bench", 8, args.read_seconds)
        results["direct"][load] = drive(
            lb, [f"http://{args.permalink_host}:8889{read}"], "GET", {}, "bench", 8, args.read_seconds
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
