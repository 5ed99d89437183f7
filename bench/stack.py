#!/usr/bin/env python3
"""The service stack on the lab: computations and permalink reads through HAProxy with TLS, beside the same
requests sent straight to the cells and the permalink service, so the load balancer's cost is a ratio.

The load runs on this machine inside the lab's namespace (so it takes no emulated CPU from the VMs), over
keep-alive connections, one per client. "Direct" goes through SSH forwards to each cell's nginx and to the
permalink service (the firewall lets only the load balancers reach them, over the mesh); the direct load is
spread over the cells as the load balancer spreads it. While it runs, the load balancer exempts this machine
from its rate limits through the runtime API (`add acl`), and takes the exemption back afterwards.
Prints a table and writes bench/results/stack.json. Run with `make bench-stack` after `make up`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT_ROOT / "bench" / "results" / "stack.json"
SSH_KEY = "/var/lib/cellfleet/lab/ssh/id_ed25519"
NETNS = "cellfleet"
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
EXEMPT_LIST = "/etc/haproxy/rate-limit-exempt.lst"
COMPUTATION = urllib.parse.urlencode({"code": "print(1+1)"}).encode()
FORM = {"Content-Type": "application/x-www-form-urlencoded"}

# Opens a connection to (scheme, host, port); each client thread keeps its own.
Endpoint = tuple[str, str, int]


def in_lab_namespace() -> bool:
    """Whether this process already runs in the lab's network namespace."""
    named = Path(f"/run/netns/{NETNS}")
    return named.exists() and os.stat("/proc/self/ns/net").st_ino == named.stat().st_ino


def ssh(address: str, command: str) -> str:
    arguments = ["ssh", "-q", *SSH_OPTIONS, "-i", SSH_KEY, f"root@{address}", command]
    return subprocess.run(arguments, check=True, capture_output=True, text=True, timeout=120).stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def forward(address: str, remote_port: int) -> Iterator[Endpoint]:
    """An SSH forward from a local port to remote_port on the node's loopback."""
    port = free_port()
    arguments = ["ssh", "-N", *SSH_OPTIONS, "-o", "ExitOnForwardFailure=yes", "-i", SSH_KEY]
    arguments += ["-L", f"127.0.0.1:{port}:127.0.0.1:{remote_port}", f"root@{address}"]
    tunnel = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or tunnel.poll() is not None:
                    raise RuntimeError(f"no SSH forward to {address}:{remote_port}") from None
                time.sleep(0.2)
        yield ("http", "127.0.0.1", port)
    finally:
        tunnel.terminate()
        tunnel.wait()


@contextmanager
def rate_limit_exemption(load_balancer: str, source: str) -> Iterator[None]:
    ssh(load_balancer, f"echo 'add acl {EXEMPT_LIST} {source}' | socat stdio unix-connect:/run/haproxy/admin.sock")
    try:
        yield
    finally:
        ssh(load_balancer, f"echo 'del acl {EXEMPT_LIST} {source}' | socat stdio unix-connect:/run/haproxy/admin.sock")


def connect(endpoint: Endpoint) -> http.client.HTTPConnection:
    scheme, host, port = endpoint
    if scheme == "https":
        return http.client.HTTPSConnection(host, port, timeout=120, context=ssl._create_unverified_context())
    return http.client.HTTPConnection(host, port, timeout=120)


def percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def drive(
    endpoints: list[Endpoint], request: Callable[[http.client.HTTPConnection], bool], clients: int, seconds: float
) -> dict[str, float]:
    """Clients spread over the endpoints send requests back to back for seconds; latencies of the good ones."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(endpoint: Endpoint) -> None:
        nonlocal failures
        connection = connect(endpoint)
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                ok = request(connection)
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = connect(endpoint)
            with lock:
                if ok:
                    latencies.append(time.monotonic() - started)
                else:
                    failures += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(endpoints[i % len(endpoints)],)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return {
        "per_second": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "failures": failures,
    }


def compute(connection: http.client.HTTPConnection) -> bool:
    connection.request("POST", "/service", body=COMPUTATION, headers=FORM)
    answer = connection.getresponse()
    body = answer.read()
    return answer.status == 200 and json.loads(body)["stdout"] == "2\n"


def reader(ident: str, path: str) -> Callable[[http.client.HTTPConnection], bool]:
    def read(connection: http.client.HTTPConnection) -> bool:
        connection.request("GET", f"{path}?q={ident}")
        answer = connection.getresponse()
        answer.read()
        return answer.status == 200

    return read


def make_permalink(endpoint: Endpoint) -> str:
    connection = connect(endpoint)
    body = urllib.parse.urlencode({"code": "print('bench')"}).encode()
    connection.request("POST", "/permalink", body=body, headers=FORM)
    answer = connection.getresponse()
    return json.loads(answer.read())["query"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-balancer", default="10.77.0.11")
    parser.add_argument("--cells", nargs="+", default=["10.77.0.12", "10.77.0.13"])
    parser.add_argument("--permalink-host", default="10.77.0.14")
    parser.add_argument("--source", default="10.77.0.1", help="this machine's address on the lab bridge")
    parser.add_argument("--seconds", type=float, default=30.0, help="per computation load")
    parser.add_argument("--read-seconds", type=float, default=10.0, help="per permalink read load")
    args = parser.parse_args()
    if not in_lab_namespace():
        os.execvp("ip", ["ip", "netns", "exec", NETNS, sys.executable, *sys.argv])
    results: dict[str, Any] = {"through load balancer": {}, "direct": {}}
    balanced: list[Endpoint] = [("https", args.load_balancer, 443)]
    with ExitStack() as stack:
        stack.enter_context(rate_limit_exemption(args.load_balancer, args.source))
        cells = [stack.enter_context(forward(cell, 80)) for cell in args.cells]
        permalinks = [stack.enter_context(forward(args.permalink_host, 8889))]
        drive(balanced, compute, 2, 5)  # warm-up: every cell's reserve of kernels fills
        for clients in (1, 8):
            load = f"computations, {clients} client{'s' * (clients > 1)}"
            results["through load balancer"][load] = drive(balanced, compute, clients, args.seconds)
            results["direct"][load] = drive(cells, compute, clients, args.seconds)
        ident = make_permalink(balanced[0])
        load = "permalink reads, 8 clients"
        results["through load balancer"][load] = drive(balanced, reader(ident, "/permalink"), 8, args.read_seconds)
        results["direct"][load] = drive(permalinks, reader(ident, "/permalink"), 8, args.read_seconds)
    print(f"print(1+1) on {len(args.cells)} cells and permalink reads, lab under QEMU emulation, keep-alive clients")
    print(f"{'load':30} {'path':22} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7} {'LB/direct':>10}")
    for load, direct in results["direct"].items():
        balanced_numbers = results["through load balancer"][load]
        for path, numbers in (("direct", direct), ("through HAProxy+TLS", balanced_numbers)):
            ratio = numbers["per_second"] / direct["per_second"] if direct["per_second"] else float("nan")
            print(f"{load:30} {path:22} {numbers['per_second']:8.2f} {numbers['p50_ms']:8.0f} "
                  f"{numbers['p99_ms']:8.0f} {numbers['failures']:7.0f} {ratio:10.2f}")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
