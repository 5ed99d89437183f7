#!/usr/bin/env python3
"""Kernel sessions on this machine: a laptop server with the Sage kernel (`make serve-sage`), as a page uses it.

Prints the time from `POST /kernel` to the first execute_reply over the WebSocket (one page after another,
preforked kernels), the round trip of a computation in a live session, the round trip of an `@interact`
slider's change (update request to its reply and idle status, the output checked), and the PSS of the server
tree with --idle-sessions sessions held open and idle, per session. Writes bench/results/sessions.json.
Targets (issue 20): kernel creation p50 <= 150 ms; interact update p50 <= 100 ms; PSS per idle session printed
(upstream's idle Sage kernel: about 103 MB PSS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from http_load import running_cellserver
from labkit.measure import percentile
from service_sage import descendants, pss_mib, sage_python

RESULTS = Path(__file__).resolve().parent / "results" / "sessions.json"
INTERACT_CODE = "@interact\ndef f(n=slider(1, 100, 1)):\n    print(n^2)\n"


def execute_request(code: str) -> dict[str, Any]:
    return {
        "channel": "shell",
        "header": {"msg_type": "execute_request", "msg_id": str(uuid.uuid4()), "username": "", "session": "b"},
        "parent_header": {}, "metadata": {},
        "content": {"code": code, "silent": False, "user_expressions": {}, "allow_stdin": False},
    }  # fmt: skip


async def open_session(url: str, page: str, timeout: str) -> tuple[str, WebSocketClientConnection]:
    body = urllib.parse.urlencode({"accepted_tos": "true", "timeout": timeout, "CellSessionID": page})
    answer = await AsyncHTTPClient().fetch(HTTPRequest(f"{url}/kernel", method="POST", body=body))
    kernel = json.loads(answer.body)
    connection = await websocket_connect(f"{kernel['ws_url']}kernel/{kernel['id']}/channels")
    return kernel["id"], connection


async def run(connection: WebSocketClientConnection, code: str) -> None:
    request = execute_request(code)
    connection.write_message(json.dumps(request))
    while True:
        text = await asyncio.wait_for(connection.read_message(), 60)
        if text is None:
            raise ConnectionError("the server closed the session")
        message = json.loads(text)
        if message["msg_type"] == "execute_reply":
            return


async def creation(url: str, count: int) -> list[float]:
    """Seconds from POST /kernel to the first computation's reply, one page after another."""
    took = []
    for _ in range(count):
        started = time.monotonic()
        _kernel_id, connection = await open_session(url, str(uuid.uuid4()), "0")
        await run(connection, "1+1")
        took.append(time.monotonic() - started)
        connection.close()
        await asyncio.sleep(0.3)  # the reserve refills between pages, as between visitors
    return took


async def round_trips(url: str, count: int) -> list[float]:
    _kernel_id, connection = await open_session(url, str(uuid.uuid4()), "60")
    took = []
    for value in range(count):
        started = time.monotonic()
        await run(connection, f"x = {value}; x * 2")
        took.append(time.monotonic() - started)
    connection.close()
    return took


def update_request(interact_id: str, value: int) -> dict[str, Any]:
    return {
        "channel": "shell",
        "header": {"msg_type": "sagenb.interact.update_interact", "msg_id": str(uuid.uuid4()), "session": "b"},
        "parent_header": {}, "metadata": {},
        "content": {"interact_id": interact_id, "values": {"n": value}, "update_last": False},
    }  # fmt: skip


async def answered(connection: WebSocketClientConnection, request: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages answering request, up to both its reply and its idle status (they travel on two channels)."""
    messages, replied, idle = [], False, False
    while not (replied and idle):
        text = await asyncio.wait_for(connection.read_message(), 60)
        if text is None:
            raise ConnectionError("the server closed the session")
        message = json.loads(text)
        if message["parent_header"].get("msg_id") != request["header"]["msg_id"]:
            continue
        messages.append(message)
        replied = replied or message["msg_type"].endswith("_reply")
        idle = idle or message["content"].get("execution_state") == "idle"
    return messages


async def interact_round_trips(url: str, count: int) -> list[float]:
    """Seconds from a slider's change to the interact's new output, as an unlinked page's cell has it."""
    _kernel_id, connection = await open_session(url, str(uuid.uuid4()), "0")
    request = execute_request(INTERACT_CODE)
    connection.write_message(json.dumps(request))
    shown = [m["content"]["data"] for m in await answered(connection, request) if "data" in m["content"]]
    announced = next(data for data in shown if "application/sage-interact" in data)["application/sage-interact"]
    took = []
    for step in range(count):
        value = step % 100 + 1
        update = update_request(announced["new_interact_id"], value)
        started = time.monotonic()
        connection.write_message(json.dumps(update))
        output = "".join(m["content"].get("text", "") for m in await answered(connection, update))
        took.append(time.monotonic() - started)
        if output != f"{value**2}\n":
            raise AssertionError(f"the interact printed {output!r} for n = {value}")
    connection.close()
    return took


async def idle_sessions(url: str, server: int, count: int) -> dict[str, float]:
    baseline = sum(pss_mib(process) for process in [server, *descendants(server)])
    held = [await open_session(url, str(uuid.uuid4()), "600") for _ in range(count)]
    for _kernel_id, connection in held:
        await run(connection, "a = 1")
    await asyncio.sleep(2)
    loaded = sum(pss_mib(process) for process in [server, *descendants(server)])
    for _kernel_id, connection in held:
        connection.close()
    return {"sessions": count, "tree_pss_mib_before": baseline, "tree_pss_mib_with_sessions": loaded,
            "pss_mib_per_idle_session": (loaded - baseline) / count}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=30, help="kernel creations to time")
    parser.add_argument("--idle-sessions", type=int, default=50)
    parser.add_argument("--preforked", type=int, default=4)
    args = parser.parse_args()
    kernels = args.idle_sessions + args.preforked + 2
    options = ("serve", "--kernel", "sage", "--max-kernels", str(kernels), "--preforked", str(args.preforked),
               "--syslog-socket", "")  # fmt: skip
    with running_cellserver(*options, python=sage_python()) as (url, server):
        asyncio.run(creation(url, 3))  # warm-up
        created = asyncio.run(creation(url, args.pages))
        trips = asyncio.run(round_trips(url, args.pages))
        updates = asyncio.run(interact_round_trips(url, args.pages))
        memory = asyncio.run(idle_sessions(url, server.pid, args.idle_sessions))
    results = {
        "settings": vars(args),
        "creation_p50_ms": statistics.median(created) * 1000,
        "creation_p90_ms": percentile(created, 0.9) * 1000,
        "round_trip_p50_ms": statistics.median(trips) * 1000,
        "round_trip_p90_ms": percentile(trips, 0.9) * 1000,
        "interact_update_p50_ms": statistics.median(updates) * 1000,
        "interact_update_p90_ms": percentile(updates, 0.9) * 1000,
        **memory,
    }
    print(f"kernel sessions, Sage kernel, {args.preforked} preforked")
    print(f"POST /kernel to first execute_reply: p50 {results['creation_p50_ms']:.0f} ms, "
          f"p90 {results['creation_p90_ms']:.0f} ms ({args.pages} pages, target p50 <= 150 ms: "
          f"{'met' if results['creation_p50_ms'] <= 150 else 'MISSED'})")  # fmt: skip
    print(f"computation round trip in a live session: p50 {results['round_trip_p50_ms']:.0f} ms, "
          f"p90 {results['round_trip_p90_ms']:.0f} ms")  # fmt: skip
    print(f"@interact slider change to new output: p50 {results['interact_update_p50_ms']:.0f} ms, "
          f"p90 {results['interact_update_p90_ms']:.0f} ms (target p50 <= 100 ms: "
          f"{'met' if results['interact_update_p50_ms'] <= 100 else 'MISSED'})")  # fmt: skip
    print(f"{memory['sessions']:.0f} idle sessions: server tree {memory['tree_pss_mib_before']:.0f} -> "
          f"{memory['tree_pss_mib_with_sessions']:.0f} MiB PSS, {memory['pss_mib_per_idle_session']:.1f} MiB "
          f"per idle session (upstream's idle Sage kernel: about 103 MB)")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
