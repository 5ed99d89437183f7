#!/usr/bin/env python3
"""Where a fresh kernel's start goes, on this machine: the provider's fork, the kernel's readiness (its
kernel_info reply and first output message), and its first computation; then the CPU a kernel costs from
fork to exit (user, system) and the pages it copies from the provider.

Run with the Sage environment's Python for Sage kernels: `.venv-sage/bin/python bench/kernel_start.py --kernel
sage` (`make bench-kernel-start`). Starts --starts kernels one after another from a spawned provider, each
released before the next. Writes bench/results/kernel_start_<kernel>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient

from cellserver.kernels import KernelPool, PoolSettings, client_context, wait_for_answers

RESULTS = Path(__file__).resolve().parent / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def children_usage(pid: int) -> tuple[float, float, int]:
    """User and system CPU seconds and minor faults of pid's reaped children (the provider's kernels)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[13]) / CLOCK_TICKS, int(fields[14]) / CLOCK_TICKS, int(fields[8])


async def one_start(pool: KernelPool) -> dict[str, float]:
    """Milliseconds of each stage of one kernel's life, start to release."""
    asked = time.monotonic()
    answer = await pool.provider.request({"op": "start", "cpu_seconds": 30, "memory_bytes": 16 << 30})
    forked = time.monotonic()
    client = AsyncKernelClient(context=client_context())
    client.load_connection_info(answer["connection"])
    client.start_channels(hb=False)
    await wait_for_answers(client, 60)
    ready = time.monotonic()
    reply = await client.execute_interactive("print(1+1)", timeout=60, output_hook=lambda _message: None)
    computed = time.monotonic()
    assert reply["content"]["status"] == "ok", reply
    client.stop_channels()
    await pool.provider.request({"op": "release", "kernel_id": answer["kernel_id"]})
    return {"fork_ms": (forked - asked) * 1000, "ready_ms": (ready - forked) * 1000,
            "first_computation_ms": (computed - ready) * 1000}  # fmt: skip


async def measure(kernel: str, starts: int) -> dict[str, Any]:
    pool = KernelPool(PoolSettings(max_kernels=1, preforked=0, kernel=kernel))
    await pool.provider.open()
    provider = pool.provider.process.pid  # type: ignore[union-attr]
    try:
        await one_start(pool)  # the provider's first fork touches pages every later one shares
        before = children_usage(provider)
        stages = [await one_start(pool) for _ in range(starts)]
        after = children_usage(provider)
    finally:
        await pool.provider.close()
    result: dict[str, Any] = {name: statistics.median(stage[name] for stage in stages) for name in stages[0]}
    result["kernel_user_cpu_ms"] = (after[0] - before[0]) / starts * 1000
    result["kernel_system_cpu_ms"] = (after[1] - before[1]) / starts * 1000
    result["kernel_minor_faults"] = (after[2] - before[2]) / starts
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=["python3", "sage"], default="python3")
    parser.add_argument("--starts", type=int, default=20)
    args = parser.parse_args()
    result = asyncio.run(measure(args.kernel, args.starts))
    print(f"{args.kernel} kernel, {args.starts} starts one after another (medians):")
    print(f"  provider fork {result['fork_ms']:.1f} ms, ready {result['ready_ms']:.1f} ms, "
          f"first print(1+1) {result['first_computation_ms']:.1f} ms")  # fmt: skip
    print(f"  per kernel, fork to exit: {result['kernel_user_cpu_ms']:.0f} ms user CPU, "
          f"{result['kernel_system_cpu_ms']:.0f} ms system CPU, {result['kernel_minor_faults']:.0f} minor faults "
          f"(pages copied or mapped)")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"kernel_start_{args.kernel}.json").write_text(json.dumps({"settings": vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
