"""Single-use kernels from the forking provider, with a preforked reserve refilled in the background."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.connect import write_connection_file

log = logging.getLogger("cellserver.kernels")


RUNTIME_PREFIX = "cellserver-kernels-"


def remove_stale_runtime_dirs() -> None:
    """Connection files and sockets left by a server that was killed (its pid is in the directory name)."""
    for directory in Path(tempfile.gettempdir()).glob(f"{RUNTIME_PREFIX}*"):
        owner = directory.name[len(RUNTIME_PREFIX) :].split("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists() and directory.owner() == getpass.getuser():
            shutil.rmtree(directory, ignore_errors=True)


class KernelsBusyError(Exception):
    """Every kernel slot is taken: the caller answers 503 instead of waiting without end."""


@dataclass(frozen=True)
class PoolSettings:
    max_kernels: int = 8
    preforked: int = 2
    start_timeout: float = 30.0
    cpu_seconds: int = 30
    memory_bytes: int = 2 << 30
    idle_seconds: float = 900.0
    acquire_wait: float = 2.0


@dataclass
class Kernel:
    kernel_id: str
    pid: int
    connection_file: Path
    client: AsyncKernelClient
    ready_since: float = field(default_factory=time.monotonic)


class KernelPool:
    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self._ready: asyncio.Queue[Kernel] = asyncio.Queue()
        self._live = 0  # ready + in use + starting
        self._provider: asyncio.subprocess.Process | None = None
        self._provider_lock = asyncio.Lock()
        remove_stale_runtime_dirs()
        self._runtime_dir = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{os.getpid()}-"))
        self._refill_task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()

    async def start(self) -> None:
        self._provider = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cellserver.kernel_provider", str(os.getpid()), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._refill_task = asyncio.create_task(self._refill_forever())
        self._wakeup.set()

    async def stop(self) -> None:
        if self._refill_task:
            self._refill_task.cancel()
        while not self._ready.empty():
            self._kill(self._ready.get_nowait())
        if self._provider and self._provider.returncode is None:
            self._provider.kill()
            await self._provider.wait()
        shutil.rmtree(self._runtime_dir, ignore_errors=True)

    async def acquire(self) -> Kernel:
        """A ready kernel, started now if there is room, or KernelsBusyError after a short wait."""
        deadline = time.monotonic() + self.settings.acquire_wait
        while True:
            with contextlib.suppress(asyncio.QueueEmpty):
                kernel = self._ready.get_nowait()
                self._wakeup.set()
                return kernel
            if self._live < self.settings.max_kernels:
                try:
                    return await self._launch()
                except Exception as error:
                    log.error("starting a kernel on demand failed: %s", error)
                    raise KernelsBusyError() from error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KernelsBusyError()
            try:
                kernel = await asyncio.wait_for(self._ready.get(), timeout=remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11 (EL9)
                raise KernelsBusyError() from None
            self._wakeup.set()
            return kernel

    def release(self, kernel: Kernel) -> None:
        """Single use: the kernel and everything it started are killed, never reused."""
        self._kill(kernel)
        self._wakeup.set()

    def _kill(self, kernel: Kernel) -> None:
        self._tear_down(kernel)
        self._live -= 1

    def _tear_down(self, kernel: Kernel) -> None:
        """Kill the kernel's process group and remove its connection file and sockets."""
        kernel.client.stop_channels()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(kernel.pid, signal.SIGKILL)
        kernel.connection_file.unlink(missing_ok=True)
        for socket_file in self._runtime_dir.glob(f"k-{kernel.kernel_id}-*"):
            socket_file.unlink(missing_ok=True)

    async def _launch(self) -> Kernel:
        self._live += 1
        try:
            return await self._start_kernel()
        except BaseException:
            self._live -= 1
            raise

    async def _start_kernel(self) -> Kernel:
        kernel_id = str(uuid.uuid4())
        connection_file = self._runtime_dir / f"kernel-{kernel_id}.json"
        # Unix sockets, not TCP ports: no race for free ports between kernels started side by side, and
        # later no loopback traffic for the worker firewall to allow.
        socket_base = str(self._runtime_dir / f"k-{kernel_id}")
        write_connection_file(str(connection_file), transport="ipc", ip=socket_base)
        pid = await self._ask_provider(
            {"connection_file": str(connection_file), "cpu_seconds": self.settings.cpu_seconds,
             "memory_bytes": self.settings.memory_bytes}
        )  # fmt: skip
        client = AsyncKernelClient()
        client.load_connection_file(str(connection_file))
        client.start_channels()
        kernel = Kernel(kernel_id=kernel_id, pid=pid, connection_file=connection_file, client=client)
        try:
            await client.wait_for_ready(timeout=self.settings.start_timeout)
        except BaseException:
            self._tear_down(kernel)  # _launch gives the slot back
            raise
        kernel.ready_since = time.monotonic()
        return kernel

    async def _ask_provider(self, request: dict[str, Any]) -> int:
        assert self._provider and self._provider.stdin and self._provider.stdout
        async with self._provider_lock:
            self._provider.stdin.write((json.dumps(request) + "\n").encode())
            await self._provider.stdin.drain()
            answer = json.loads(await self._provider.stdout.readline() or b'{"error": "provider exited"}')
        if "error" in answer:
            raise RuntimeError(f"kernel provider: {answer['error']}")
        return int(answer["pid"])

    async def _refill_forever(self) -> None:
        """Keep the preforked reserve full and replace kernels idle for too long."""
        while True:
            # Woken when a kernel is taken or killed, and at least every minute to expire idle ones.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=min(60.0, self.settings.idle_seconds))
            self._wakeup.clear()
            self._expire_idle()
            while True:
                wanted = min(self.settings.preforked - self._ready.qsize(), self.settings.max_kernels - self._live)
                if wanted <= 0:
                    break
                # Started side by side: most of a start is waiting for the new kernel to answer.
                started = await asyncio.gather(*(self._launch() for _ in range(wanted)), return_exceptions=True)
                failures = [result for result in started if isinstance(result, BaseException)]
                for result in started:
                    if isinstance(result, Kernel):
                        self._ready.put_nowait(result)
                if failures:
                    log.error("starting %d preforked kernels failed: %s", len(failures), failures[0])
                    await asyncio.sleep(1)
                    break

    def _expire_idle(self) -> None:
        now = time.monotonic()
        keep = []
        while not self._ready.empty():
            kernel = self._ready.get_nowait()
            if now - kernel.ready_since > self.settings.idle_seconds:
                self._kill(kernel)
            else:
                keep.append(kernel)
        for kernel in keep:
            self._ready.put_nowait(kernel)
