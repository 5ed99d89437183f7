#!/usr/bin/env python3
"""Kernel sessions on the lab, through HAProxy with TLS, as a page that embeds a cell uses them.

Kernel creation: one page after another, `POST /kernel` to the first execute_reply over the kernel's WebSocket
(wss through the load balancer), with a pause between pages that lets a cell refill its reserve, as between
visitors. Sessions per cell: pages (each its own CellSessionID, so the per-page cap does not apply) open a
session each, compute once and stay idle, until the cluster refuses one as busy; HAProxy's stick table says which
cell holds each, and each cell's MemAvailable is read before and with the sessions held. The client runs on this
machine inside the lab's namespace (its address is exempt from the rate limits). Under emulation a cell has one
slow vCPU, so absolute numbers are far below real hardware. Writes bench/results/sessions_lab.json.
Run with `make bench-sessions-lab` after `make up`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from sessions import execute_request
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from labkit.lab import CELLS, LOAD_BALANCER, admin, ssh
from labkit.load import enter_lab_namespace
from labkit.measure import percentile

PROJECT_ROOT = Path(__file__).resolve().parent.parent

RESULTS = PROJECT_ROOT / "bench" / "results" / "sessions_lab.json"
ROOT_URL = f"https://{LOAD_BALANCER}"


async def open_session(timeout: str) -> tuple[str, WebSocketClientConnection]:
    fields = {"accepted_tos": "true", "timeout": timeout, "CellSessionID": str(uuid.uuid4())}
    request = HTTPRequest(f"{ROOT_URL}/kernel", method="POST", body=urllib.parse.urlencode(fields),
                          validate_cert=False, request_timeout=120)  # fmt: skip
    kernel = json.loads((await AsyncHTTPClient().fetch(request)).body)
    channels = HTTPRequest(f"{kernel['ws_url']}kernel/{kernel['id']}/channels", validate_cert=False)
    return kernel["id"], await websocket_connect(channels)


async def computed(connection: WebSocketClientConnection, code: str) -> None:
    connection.write_message(json.dumps(execute_request(code)))
    while True:
        text = await asyncio.wait_for(connection.read_message(), 120)
        if text is None:
            raise ConnectionError("the server closed the session")
        if json.loads(text)["msg_type"] == "execute_reply":
            return


async def creation(pages: int, pause: float) -> list[float]:
    """Seconds from POST /kernel to the first reply, one page after another."""
    took = []
    for _ in range(pages):
        started = time.monotonic()
        _kernel_id, connection = await open_session("0")
        await computed(connection, "1+1")
        took.append(time.monotonic() - started)
        connection.close()
        await asyncio.sleep(pause)
    return took


async def held_until_refused(limit: int) -> tuple[list[tuple[str, WebSocketClientConnection]], str]:
    """Idle sessions opened one by one until the cluster refuses one (or limit are open); what refused it."""
    held: list[tuple[str, WebSocketClientConnection]] = []
    while len(held) < limit:
        try:
            kernel_id, connection = await open_session("600")
            await computed(connection, "a = 1")
        except HTTPClientError as error:
            body = error.response.body.decode(errors="replace")[:200] if error.response else ""
            return held, f"{error.code} {body}"
        held.append((kernel_id, connection))
    return held, f"stopped at the bench's limit of {limit}"


def stuck_cells() -> dict[str, str]:
    """HAProxy's routing of kernel sessions: kernel id (or CellSessionID) -> the cell it is kept with."""
    table = admin("show table cells")
    pairs = (dict(field.split("=", 1) for field in line.split()[1:]) for line in table.splitlines()[1:] if line)
    return {pair["key"]: pair["server_key"] for pair in pairs if "server_key" in pair}


def available_mib() -> dict[str, float]:
    return {cell: int(ssh(address, "awk '/^MemAvailable/ {print $2}' /proc/meminfo")) / 1024
            for cell, address in CELLS.items()}  # fmt: skip


def pool_sizes() -> dict[str, int]:
    return {cell: len(json.loads(ssh(address, "cat /etc/cellfleet/worker-pool.json"))["workers"])
            for cell, address in CELLS.items()}  # fmt: skip


async def sessions_per_cell(limit: int) -> dict[str, Any]:
    before = available_mib()
    held, refusal = await held_until_refused(limit)
    await asyncio.sleep(2)
    with_sessions = available_mib()
    routed = stuck_cells()
    per_cell = {cell: sum(1 for kernel_id, _ in held if routed.get(kernel_id) == cell) for cell in CELLS}
    for _kernel_id, connection in held:
        connection.close()
    return {
        "held": len(held), "refused_with": refusal, "per_cell": per_cell,
        "mem_available_mib_before": before, "mem_available_mib_with_sessions": with_sessions,
        "mib_per_session": {cell: (before[cell] - with_sessions[cell]) / per_cell[cell]
                            for cell in CELLS if per_cell[cell]},
    }  # fmt: skip


def in_lab_namespace(work: Any) -> Any:
    """work() run on a thread that has entered the lab's network namespace (setns is per thread)."""
    outcome: dict[str, Any] = {}

    def thread() -> None:
        enter_lab_namespace()
        try:
            outcome["value"] = work()
        except Exception as error:  # handed to the caller, which raises it
            outcome["error"] = error

    runner = threading.Thread(target=thread)
    runner.start()
    runner.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20, help="kernel creations to time")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between pages (the reserve refills)")
    parser.add_argument("--limit", type=int, default=60, help="most sessions to hold at once")
    args = parser.parse_args()
    pools = pool_sizes()
    in_lab_namespace(lambda: asyncio.run(creation(2, args.pause)))  # warm-up: both cells' reserves in use once
    created = in_lab_namespace(lambda: asyncio.run(creation(args.pages, args.pause)))
    held = in_lab_namespace(lambda: asyncio.run(sessions_per_cell(args.limit)))
    results = {
        "settings": vars(args), "pool_sizes": pools,
        "creation_p50_ms": statistics.median(created) * 1000, "creation_p90_ms": percentile(created, 0.9) * 1000,
        "creation_max_ms": max(created) * 1000, **held,
    }  # fmt: skip
    print(f"kernel sessions on the lab through HAProxy+TLS ({len(CELLS)} cells, worker pools {pools})")
    print(f"POST /kernel to first execute_reply: p50 {results['creation_p50_ms']:.0f} ms, "
          f"p90 {results['creation_p90_ms']:.0f} ms, max {results['creation_max_ms']:.0f} ms "
          f"({args.pages} pages, {args.pause:g} s apart)")  # fmt: skip
    print(f"idle sessions held at once: {held['held']} ({held['per_cell']}), then refused with "
          f"{held['refused_with']!r}")  # fmt: skip
    for cell, mib in held["mib_per_session"].items():
        print(f"  {cell}: MemAvailable {held['mem_available_mib_before'][cell]:.0f} -> "
              f"{held['mem_available_mib_with_sessions'][cell]:.0f} MiB, {mib:.1f} MiB per idle session")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
