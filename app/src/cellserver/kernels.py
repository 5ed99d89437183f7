"""Single-use kernels from the forking provider, with a preforked reserve refilled in the background."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import json
import logging
import os
import queue
import select
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient

from cellserver.kernel_files import (
    RETAIN_KEY,
    RETAINED_DIRECTORY,
    WORK_DIRECTORY,
    FileRefusedError,
    ask_provider_for_file,
    open_kernel_file,
)

log = logging.getLogger("cellserver.kernels")


RUNTIME_PREFIX = "cellserver-kernels-"
CONNECT_PATIENCE_SECONDS = 30.0
# A provider that accepts the connection but never says hello is hung (stopped, deadlocked): the server exits
# and systemd starts it again, rather than waiting out its start timeout.
HELLO_PATIENCE_SECONDS = 30.0
# A provider this server spawned says hello once it has imported its kernel's library: Sage takes tens of
# seconds, minutes on a starved machine. Its death ends the wait at once (its pipe closes).
SPAWNED_HELLO_PATIENCE_SECONDS = 300.0
SLOT_POLL_SECONDS = 0.05
# A request waiting for a kernel wakes when one joins the reserve or a slot frees; this often it also looks
# again whether the provider stalled.
WAITING_RECHECK_SECONDS = 1.0
STOP_PATIENCE_SECONDS = 10.0  # how long a stopping server waits for running computations and releases
# Reserve kernels started side by side: a start is CPU work now, and a refill that takes every core makes
# the computations asked for meanwhile wait behind it. One core stays theirs.
REFILL_AT_ONCE = max(1, len(os.sched_getaffinity(0)) - 1)
# A client connecting before its new kernel has bound retries after RECONNECT_MILLISECONDS (zmq's default
# is 100 ms), doubled at each try up to zmq's default: a kernel slow to start (an emulated machine) is not
# polled hundreds of times a second.
RECONNECT_MILLISECONDS = 5
RECONNECT_MAX_MILLISECONDS = 100
# Before asking a starting kernel again, doubled after each unanswered ask up to the most: an ask waits in the
# kernel's queue until it reads it, and each one it finds there costs it a reply on a cell already busy.
KERNEL_INFO_PATIENCE_SECONDS = 1.0
KERNEL_INFO_PATIENCE_MAX_SECONDS = 8.0
IOPUB_PATIENCE_SECONDS = 0.2  # for the first output message, which shows the output channel is subscribed
FILE_PATIENCE_SECONDS = 10.0  # for the provider to open a kernel's file
# A kernel silent at the start timeout on a starved machine is most often close to answering: the request that
# asked for it is refused then, but the kernel keeps its slot and joins the reserve once it answers, up to
# this many start timeouts in all. Killing it would throw its start away, and the next request would pay for
# a whole new one on the same starved machine.
LATE_START_PATIENCE_FACTOR = 2.0


def remove_stale_runtime_dirs() -> None:
    """Kernel directories left by a server that was killed (its pid is in the directory name)."""
    for directory in Path(tempfile.gettempdir()).glob(f"{RUNTIME_PREFIX}*"):
        owner = directory.name[len(RUNTIME_PREFIX) :].split("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists() and directory.owner() == getpass.getuser():
            shutil.rmtree(directory, ignore_errors=True)


class ProviderError(Exception):
    """The kernel provider refused a request or is gone."""

    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


class ProviderLink:
    """Requests to the kernel provider, answered by id, so a slow worker reset holds up nothing else.

    With no socket configured the server spawns its own provider (kernels run as the current user);
    with one, it connects to the root provider service that runs kernels as pooled workers.
    """

    def __init__(self, socket_path: str, kernel: str = "python3") -> None:
        self.socket_path = socket_path
        self.kernel = kernel
        self.process: asyncio.subprocess.Process | None = None
        self.runtime_dir: Path | None = None
        self.workers: int | None = None
        self.provider_runtime_dir: Path | None = None  # where the provider keeps released kernels' files
        self._writer: asyncio.StreamWriter | None = None
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._reader_task: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()  # set when the provider closed the connection
        self.deaths: dict[str, asyncio.Event] = {}  # kernel id -> set when the provider saw it exit
        self.death_seen = asyncio.Event()  # set at each reported death, so the pool can replace a reserve kernel

    async def open(self) -> None:
        if self.socket_path:
            reader, self._writer = await self._connect()
        else:
            remove_stale_runtime_dirs()
            self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{os.getpid()}-"))
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cellserver", "kernel-provider", "--parent-pid", str(os.getpid()),
                "--runtime-dir", str(self.runtime_dir), "--kernel", self.kernel, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert self.process.stdout and self.process.stdin
            reader, self._writer = self.process.stdout, self.process.stdin  # type: ignore[assignment]
        self._reader_task = asyncio.create_task(self._read_answers(reader))
        patience = HELLO_PATIENCE_SECONDS if self.socket_path else SPAWNED_HELLO_PATIENCE_SECONDS
        try:
            hello = await asyncio.wait_for(self.request({"op": "hello"}), patience)
        except TimeoutError:
            raise ProviderError(f"the kernel provider did not answer within {patience:g} s") from None
        self.workers = hello.get("workers")
        self.provider_runtime_dir = Path(hello["runtime_dir"])

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The provider service may still be resetting its workers: wait for its socket a little while."""
        deadline = time.monotonic() + CONNECT_PATIENCE_SECONDS
        while True:
            try:
                return await asyncio.open_unix_connection(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self._writer:
            self._writer.close()
        if self.process and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader_task:
            self._reader_task.cancel()
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._writer is None or self._reader_task is None or self._reader_task.done():
            raise ProviderError("the kernel provider is gone")
        self._next_id += 1
        answer = asyncio.get_running_loop().create_future()
        self._answers[self._next_id] = answer
        self._writer.write((json.dumps({"id": self._next_id, **request}) + "\n").encode())
        await self._writer.drain()
        result = await answer
        if "error" in result:
            raise ProviderError(f"kernel provider: {result['error']}", busy=bool(result.get("busy")))
        return result

    async def open_file(self, kernel_id: str, relative: str) -> int:
        """A read-only descriptor of a file in the kernel's working directory (kernel_files says which files
        qualify): the root provider opens a worker's, the server its own kernels'."""
        if self.socket_path:
            return await asyncio.to_thread(
                ask_provider_for_file, self.socket_path, kernel_id, relative, FILE_PATIENCE_SECONDS
            )
        if self.runtime_dir is None:
            raise FileNotFoundError("the provider is not running")
        return open_kernel_file(self.runtime_dir / kernel_id / WORK_DIRECTORY, relative, os.getuid())

    def retained_directory(self, session_id: str) -> Path | None:
        if self.provider_runtime_dir is None or not RETAIN_KEY.fullmatch(session_id):
            return None
        return self.provider_runtime_dir / RETAINED_DIRECTORY / session_id

    def open_retained_file(self, session_id: str, relative: str) -> int:
        """A descriptor of a file the provider kept from a released session's kernel (as root for pooled
        workers, as this user for its own kernels)."""
        base = self.retained_directory(session_id)
        if base is None:
            raise FileNotFoundError("no files kept")
        keeper = base.lstat().st_uid
        if keeper not in (0, os.getuid()):
            raise FileRefusedError(f"kept by uid {keeper}, not by the provider")
        return open_kernel_file(base, relative, keeper)

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                answer = json.loads(line)
                if "died" in answer:
                    self.deaths.setdefault(answer["died"], asyncio.Event()).set()
                    self.death_seen.set()
                    continue
                future = self._answers.pop(answer.get("id"), None)
                if future and not future.done():
                    future.set_result(answer)
        finally:
            # Without a provider no kernel starts and none is released: fail loudly, every waiter at once.
            log.error("the kernel provider closed its connection")
            self.lost.set()
            # Its kernels cannot be reached, released or reported dead any more: computations in them end now.
            for died in self.deaths.values():
                died.set()
            for future in self._answers.values():
                if not future.done():
                    future.set_result({"error": "the kernel provider is gone"})
            self._answers.clear()


_client_context: zmq.asyncio.Context | None = None


def client_context() -> zmq.asyncio.Context:
    """One zmq context for every kernel client: a context of its own per client (jupyter_client's default)
    starts and stops an I/O thread for every single-use kernel."""
    global _client_context
    if _client_context is None:
        _client_context = zmq.asyncio.Context()
        _client_context.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MILLISECONDS)
        _client_context.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MILLISECONDS)
    return _client_context


async def wait_for_answers(client: AsyncKernelClient, timeout: float) -> None:
    """Until the kernel answers kernel_info on its shell channel and its output channel delivers a message.
    jupyter_client's wait_for_ready does this too, then drains the output channel until it has been silent
    for 0.2 s: a fixed wait on every start, and a fresh kernel has nothing to drain (replies are told
    apart by their parent's id)."""
    deadline = time.monotonic() + timeout
    patience = KERNEL_INFO_PATIENCE_SECONDS
    while (remaining := deadline - time.monotonic()) > 0:
        client.kernel_info()
        try:
            reply = await client.get_shell_msg(timeout=min(remaining, patience))
        except queue.Empty:
            patience = min(patience * 2, KERNEL_INFO_PATIENCE_MAX_SECONDS)
            continue
        if reply["msg_type"] != "kernel_info_reply":
            continue
        try:
            await client.get_iopub_msg(timeout=IOPUB_PATIENCE_SECONDS)
        except queue.Empty:
            continue  # subscribed too late for this reply's status messages: ask again
        return
    raise KernelSilentError(f"the kernel did not answer within {timeout:g} s")


class KernelSilentError(RuntimeError):
    """A started kernel gave no answer within its start timeout: on a starved machine, a slow start."""


class KernelsBusyError(Exception):
    """Every kernel slot is taken: the caller answers 503 instead of waiting without end."""


class KernelStartError(KernelsBusyError):
    """A slot was free but its kernel did not start (it exited, or a starved machine kept it silent past the
    start timeout). Not saturation: told apart so an operator does not add kernels to a machine that cannot
    start one. A KernelsBusyError still, so a caller that only refuses (a 503 either way) needs no change."""


class KernelSlowStartError(KernelStartError):
    """The kernel started but stayed silent past the start timeout: the machine is starved, not broken."""


@dataclass(frozen=True)
class PoolSettings:
    max_kernels: int = 8
    preforked: int = 2
    start_timeout: float = 30.0
    cpu_seconds: int = 30
    memory_bytes: int = 2 << 30
    idle_seconds: float = 900.0
    acquire_wait: float = 2.0
    provider_socket: str = ""  # empty: spawn a provider that runs kernels as the current user
    kernel: str = "python3"  # which kernel a spawned provider forks (the service's is set in its unit)


@dataclass
class Kernel:
    kernel_id: str
    pid: int
    worker: str | None
    client: AsyncKernelClient
    died: asyncio.Event
    ready_since: float = field(default_factory=time.monotonic)
    # A pidfd tells the server itself when the kernel exits, a zombie included, of any user and whatever
    # /proc shows: the provider's death report cannot come while the provider is stopped or deadlocked.
    pidfd: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.died.set()
        except (OSError, AttributeError):  # a kernel older than 5.3, or a Python without pidfd_open
            self.pidfd = None

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def alive(self) -> bool:
        """Not reported dead by the provider, and its process still runs: a zombie is dead too (its provider
        has not reaped it yet, or cannot: it is stopped)."""
        if self.died.is_set() or (self.pidfd is not None and process_exited(self.pidfd)):
            return False
        try:
            # A leader shows as a zombie while its other threads still exit, before its pidfd turns readable.
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            # A pooled kernel runs as a worker, and the server's /proc shows only its own processes
            # (ProtectProc=invisible): the pidfd, or else whether the process exists, is all that can be told.
            return self.pidfd is not None or process_exists(self.pid)
        return state not in ("Z", "X")


def process_exited(pidfd: int) -> bool:
    """Whether the process behind pidfd has ended (a pidfd turns readable at exit, before the reaping)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def process_exists(pid: int) -> bool:
    """Whether pid names a process, of any user (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return True


class KernelPool:
    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.provider = ProviderLink(settings.provider_socket, settings.kernel)
        self.max_kernels = settings.max_kernels
        self._ready: asyncio.Queue[Kernel] = asyncio.Queue()
        self._live = 0  # ready + in use + starting + being released (its worker is not free yet)
        # Held only so they run to the end: the event loop keeps weak references to tasks, and stop tells the
        # refill to end rather than cancelling it (_live, not these, is what stop waits on).
        self._refill_task: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        # Set, and replaced by a fresh one, each time a slot frees: every request waiting then looks again.
        self._slot_freed = asyncio.Event()
        self._refilling = 0  # reserve kernels being started right now
        self._late_starts: set[asyncio.Future[None]] = set()  # readiness of kernels past the start timeout
        self._waiters: list[object] = []  # requests waiting for a kernel, oldest first
        self._launching: set[object] = set()  # those of them starting their own kernel right now
        self._borrowed = 0  # reserve kernels lent to the health probe, coming back to the reserve
        self._unanswered_starts: dict[asyncio.Future[dict[str, Any]], float] = {}  # start request -> asked at
        self._stopping = False

    @property
    def pooled(self) -> bool:
        return self.provider.workers is not None

    async def start(self) -> None:
        await self.provider.open()
        if self.provider.workers is not None:
            # A kernel holds a worker from its start until its reset: more kernels than workers cannot run.
            self.max_kernels = min(self.max_kernels, self.provider.workers)
        self._refill_task = asyncio.create_task(self._refill_forever())
        self._wakeup.set()

    async def stop(self) -> None:
        # The refill is told, not cancelled: a cancel can land after a start finished and lose that kernel (in
        # neither the reserve nor a release), and before Python 3.12 wait_for may swallow the cancel. Told, it
        # ends after its current start and hands back what it started.
        self._stopping = True
        self._wakeup.set()
        for readiness in list(self._late_starts):
            readiness.cancel()  # _late_start_settled releases its kernel
        while not self._ready.empty():
            self.release(self._ready.get_nowait())
        # Computations still running get their answer out first: once the server exits, their requests are
        # cancelled, and a cancelled request answers 500. _live counts them and the releases under way.
        deadline = time.monotonic() + STOP_PATIENCE_SECONDS
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(SLOT_POLL_SECONDS)
        await self.provider.close()

    async def acquire(self) -> Kernel:
        """A ready kernel, started now if there is room, or KernelsBusyError after a short wait."""
        ticket = object()
        self._waiters.append(ticket)
        try:
            return await self._acquire(ticket)
        finally:
            self._waiters.remove(ticket)

    async def _acquire(self, ticket: object) -> Kernel:
        arrived = time.monotonic()
        deadline = arrived + self.settings.acquire_wait
        own_start_late: KernelSilentError | None = None
        while True:
            if self._stopping:
                raise KernelsBusyError()
            self._refuse_if_the_provider_stalled()
            if self._place_in_line(ticket) < self._refilling + len(self._late_starts):
                # One of the kernels on their way to the reserve will be this request's: worth waiting for, as
                # long as a start may take from this request's arrival. Requests beyond those kernels are
                # overload, which answers 503 after the short wait, not a queue.
                deadline = max(deadline, arrived + self.settings.start_timeout)
            with contextlib.suppress(asyncio.QueueEmpty):
                kernel = self._ready.get_nowait()
                self._wakeup.set()
                if self._still_running(kernel):
                    return kernel
                continue
            if self._live < self.max_kernels and own_start_late is None:
                self._launching.add(ticket)
                try:
                    return await self._launch()
                except ProviderError as error:
                    if not error.busy:
                        log.error("starting a kernel on demand failed: %s", error)
                        raise KernelStartError(str(error)) from error
                except KernelSilentError as error:
                    # Its kernel goes on starting for the reserve: on a starved cell it usually answers within
                    # its late patience, which the proxies' answer timeout allows for. Starting another kernel
                    # would only starve both.
                    log.warning("a kernel started on demand is late: %s; the request waits for the reserve", error)
                    own_start_late = error
                    deadline = max(deadline, arrived + self.settings.start_timeout * LATE_START_PATIENCE_FACTOR)
                    continue
                except Exception as error:
                    log.error("starting a kernel on demand failed: %s", error)
                    raise KernelStartError(str(error)) from error
                finally:
                    self._launching.discard(ticket)
            remaining = deadline - time.monotonic()
            if own_start_late is not None and (remaining <= 0 or not (self._late_starts or self._refilling)):
                raise KernelSlowStartError(str(own_start_late)) from own_start_late  # waited enough, or for nothing
            if remaining <= 0:
                raise KernelsBusyError()
            kernel = await self._next_ready_or_freed_slot(min(remaining, WAITING_RECHECK_SECONDS))
            if kernel is None:
                continue
            self._wakeup.set()
            if self._still_running(kernel):
                return kernel

    async def _next_ready_or_freed_slot(self, timeout: float) -> Kernel | None:
        """A kernel from the reserve, or None once a slot frees (a release that brings no reserve kernel) or
        timeout passes. Woken by those events, not by polling: a saturated pool has many requests waiting, on a
        cell whose CPU the kernels need."""
        taken = asyncio.ensure_future(self._ready.get())
        freed = asyncio.ensure_future(self._slot_freed.wait())
        try:
            await asyncio.wait({taken, freed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()
            if not taken.done():
                taken.cancel()  # a cancelled get leaves its kernel in the queue
        return taken.result() if taken.done() and not taken.cancelled() else None

    def _still_running(self, kernel: Kernel) -> bool:
        """Whether a kernel taken from the reserve still runs; one killed while it waited (a reset, the OOM
        killer) is released, and the refill replaces it."""
        if kernel.alive():
            return True
        self.release(kernel)
        return False

    def provider_silent_for(self) -> float:
        """How long the oldest unanswered kernel start has waited for the provider (0 when none waits)."""
        if not self._unanswered_starts:
            return 0.0
        return time.monotonic() - min(self._unanswered_starts.values())

    def _refuse_if_the_provider_stalled(self) -> None:
        # A provider that answers no start (frozen, deadlocked) would leave every slot waiting on it and every
        # request refused as "busy", which reads as saturation and keeps the health timer from restarting.
        silent = self.provider_silent_for()
        if silent > self.settings.start_timeout:
            raise KernelStartError(f"the kernel provider has not answered a kernel start for {silent:.0f} s")

    async def borrow(self, patience: float) -> Kernel | None:
        """A live reserve kernel for a computation of the server's own that leaves no trace in it (the health
        probe's silent expression), waiting up to patience for one on its way to the reserve; None when there
        is none. give_back returns it to the reserve."""
        deadline = time.monotonic() + patience
        while True:
            with contextlib.suppress(asyncio.QueueEmpty):
                kernel = self._ready.get_nowait()
                if self._still_running(kernel):
                    self._borrowed += 1
                    return kernel
                continue
            if not self._reserve_on_its_way() or time.monotonic() > deadline:
                return None
            await asyncio.sleep(SLOT_POLL_SECONDS)

    def _reserve_on_its_way(self) -> bool:
        """A kernel is starting for the reserve, or the refill will start one (it has a free slot to)."""
        below = self._ready.qsize() + self._borrowed < self.settings.preforked
        on_its_way = self._refilling + len(self._late_starts)
        return on_its_way > 0 or (below and self._live < self.max_kernels and not self._stopping)

    def give_back(self, kernel: Kernel, usable: bool) -> None:
        self._borrowed -= 1
        if usable and not self._stopping and kernel.alive():
            self._ready.put_nowait(kernel)
        else:
            self.release(kernel)
            self._wakeup.set()

    def _place_in_line(self, ticket: object) -> int:
        """How many requests wait for the reserve ahead of this one: those starting their own kernel do not."""
        ahead = self._waiters[: self._waiters.index(ticket)]
        return sum(1 for other in ahead if other not in self._launching)

    def release(self, kernel: Kernel, retain_as: str | None = None) -> asyncio.Task[None]:
        """Single use: the provider kills the kernel and everything it started, and resets its worker; with
        retain_as, it keeps the files the kernel wrote for that session first."""
        kernel.client.stop_channels()
        self._stop_watching(kernel)
        return self._release_in_background(kernel.kernel_id, retain_as)

    def _release_in_background(self, kernel_id: str, retain_as: str | None = None) -> asyncio.Task[None]:
        task = asyncio.create_task(self._release_by_id(kernel_id, retain_as))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return task

    async def _release_by_id(self, kernel_id: str, retain_as: str | None = None) -> None:
        self.provider.deaths.pop(kernel_id, None)
        request = {"op": "release", "kernel_id": kernel_id}
        if retain_as:
            request["retain_as"] = retain_as
        try:
            await self.provider.request(request)
        except ProviderError as error:
            log.error("releasing kernel %s: %s", kernel_id, error)
        finally:
            self._free_a_slot()
            self._wakeup.set()

    async def _launch(self) -> Kernel:
        self._live += 1
        try:
            return await self._start_kernel()
        except BaseException:
            # Not _free_a_slot: a start the provider refused (every worker busy) would wake the waiting
            # requests to ask again at once, and be refused again.
            self._live -= 1
            raise

    def _free_a_slot(self) -> None:
        """A kernel released: its slot counts no more, and the requests waiting look again."""
        self._live -= 1
        self._slot_freed.set()
        self._slot_freed = asyncio.Event()

    async def _start_kernel(self) -> Kernel:
        answer = await self._ask_for_a_kernel()
        answered_at = time.monotonic()
        client = self._connect(answer["connection"])
        died = self.provider.deaths.setdefault(answer["kernel_id"], asyncio.Event())
        kernel = Kernel(answer["kernel_id"], answer["pid"], answer["worker"], client, died)
        self._watch_exit(kernel)
        patience = self.settings.start_timeout * LATE_START_PATIENCE_FACTOR
        ready = asyncio.ensure_future(self._wait_until_ready(kernel, patience))
        try:
            done, _pending = await asyncio.wait({ready}, timeout=self.settings.start_timeout)
            if done:
                ready.result()
        except BaseException:
            ready.cancel()
            # The slot stays counted until the provider has released it (and reset its worker).
            self._live += 1
            self.release(kernel)
            raise
        if not done:
            self._live += 1  # _launch gives the slot back for a failed start; the late kernel keeps it
            self._late_starts.add(ready)
            ready.add_done_callback(functools.partial(self._late_start_settled, kernel, answered_at))
            raise KernelSilentError(f"the kernel did not answer within {self.settings.start_timeout:g} s")
        kernel.ready_since = time.monotonic()
        return kernel

    @staticmethod
    def _connect(connection: dict[str, Any]) -> AsyncKernelClient:
        client = AsyncKernelClient(context=client_context())
        client.load_connection_info(connection)
        # No heartbeat channel: it declares a kernel dead after one silent second, which a busy machine (or an
        # emulated one) reaches while the kernel is fine. Deaths come from the provider, which reaps the pid.
        client.start_channels(hb=False)
        return client

    def _late_start_settled(self, kernel: Kernel, answered_at: float, ready: asyncio.Future[None]) -> None:
        """The reserve gets a kernel that answered after its start timeout; one that never does, or whose wait
        a stopping pool cancelled, is released."""
        self._late_starts.discard(ready)
        self._wakeup.set()
        if ready.cancelled():
            self.release(kernel)
            return
        if ready.exception() is not None:
            log.warning("kernel %s: given up %.0f s after the provider started it: %s", kernel.kernel_id,
                        time.monotonic() - answered_at, ready.exception())  # fmt: skip
            self.release(kernel)
            return
        log.warning("kernel %s answered %.1f s after the provider started it, past the start timeout (%g s); it "
                    "joins the reserve", kernel.kernel_id, time.monotonic() - answered_at,
                    self.settings.start_timeout)  # fmt: skip
        kernel.ready_since = time.monotonic()
        self._keep_in_reserve(kernel)

    def _watch_exit(self, kernel: Kernel) -> None:
        """Mark the kernel dead the moment its process exits, so a computation in it ends then, and wake the
        refill to replace a reserve kernel."""
        if kernel.pidfd is None:
            return
        asyncio.get_running_loop().add_reader(kernel.pidfd, self._exited, kernel)

    def _exited(self, kernel: Kernel) -> None:
        self._stop_watching(kernel, close=False)
        kernel.died.set()
        self.provider.death_seen.set()

    def _stop_watching(self, kernel: Kernel, close: bool = True) -> None:
        if kernel.pidfd is not None:
            asyncio.get_running_loop().remove_reader(kernel.pidfd)
            if close:
                kernel.close()

    async def _ask_for_a_kernel(self) -> dict[str, Any]:
        """The provider's answer to a start, or ProviderError once the start timeout passes without one."""
        limits = {"cpu_seconds": self.settings.cpu_seconds, "memory_bytes": self.settings.memory_bytes}
        asked = asyncio.ensure_future(self.provider.request({"op": "start", **limits}))
        self._unanswered_starts[asked] = time.monotonic()
        asked.add_done_callback(self._start_answered)
        done, _pending = await asyncio.wait({asked}, timeout=self.settings.start_timeout)
        if not done:
            # The provider may still start it: that kernel takes a worker, so its slot stays counted until the
            # kernel, once it comes, is released.
            self._live += 1
            asked.add_done_callback(self._release_late_kernel)
            raise ProviderError(f"the kernel provider did not start a kernel within {self.settings.start_timeout:g} s")
        return asked.result()

    def _start_answered(self, asked: asyncio.Future[dict[str, Any]]) -> None:
        self._unanswered_starts.pop(asked, None)
        self._wakeup.set()

    def _release_late_kernel(self, asked: asyncio.Future[dict[str, Any]]) -> None:
        if asked.cancelled() or asked.exception() is not None:
            self._free_a_slot()
            return
        self._release_in_background(asked.result()["kernel_id"])

    @staticmethod
    async def _wait_until_ready(kernel: Kernel, timeout: float) -> None:
        """Until the kernel answers, or KernelSilentError after timeout, or RuntimeError when it exits first."""
        ready = asyncio.ensure_future(wait_for_answers(kernel.client, timeout))
        died = asyncio.ensure_future(kernel.died.wait())
        try:
            await asyncio.wait({ready, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Cancelled itself (the request went away, the pool stops), this leaves neither wait behind.
            for waiter in (ready, died):
                waiter.cancel()
        if ready.cancelled():
            raise RuntimeError("the kernel exited while it started")
        ready.result()

    async def _refill_forever(self) -> None:
        """Keep the preforked reserve full and replace kernels idle for too long."""
        while not self._stopping:
            # Woken when a kernel is taken, released or dies, and at least every minute to expire idle ones.
            await self._wait_for_a_change(timeout=min(60.0, self.settings.idle_seconds))
            self._drop_dead_and_idle()
            while not self._stopping:
                on_its_way = self._ready.qsize() + self._borrowed + len(self._late_starts)
                missing = self.settings.preforked - on_its_way
                wanted = min(missing, self.max_kernels - self._live, REFILL_AT_ONCE)
                if wanted <= 0 or self.provider_silent_for() > self.settings.start_timeout:
                    break  # nothing to start, or no start would be answered: the provider's answer wakes this
                self._refilling += wanted
                try:
                    started = await asyncio.gather(*(self._launch() for _ in range(wanted)), return_exceptions=True)
                finally:
                    self._refilling -= wanted
                for result in started:
                    if isinstance(result, Kernel):
                        self._keep_in_reserve(result)
                if any(isinstance(result, ProviderError) and result.busy for result in started):
                    break  # every worker is taken or being reset: the next release wakes this loop
                # A late kernel is not a failure: it joins the reserve when it answers (_late_start_settled).
                failures = [result for result in started if isinstance(result, BaseException)
                            and not isinstance(result, KernelSilentError)]  # fmt: skip
                if failures:
                    log.error("starting %d preforked kernels failed: %s", len(failures), failures[0])
                    await asyncio.sleep(1)
                    break

    def _keep_in_reserve(self, kernel: Kernel) -> None:
        if self._stopping:
            self.release(kernel)  # stop has emptied the reserve already and waits for this one to go
        else:
            self._ready.put_nowait(kernel)

    async def _wait_for_a_change(self, timeout: float) -> None:
        changes = [asyncio.ensure_future(event.wait()) for event in (self._wakeup, self.provider.death_seen)]
        await asyncio.wait(changes, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for change in changes:
            change.cancel()
        self._wakeup.clear()
        self.provider.death_seen.clear()

    def _drop_dead_and_idle(self) -> None:
        """Release reserve kernels that died while they waited, or waited past the idle limit."""
        now = time.monotonic()
        keep = []
        while not self._ready.empty():
            kernel = self._ready.get_nowait()
            if now - kernel.ready_since > self.settings.idle_seconds or not kernel.alive():
                self.release(kernel)
            else:
                keep.append(kernel)
        for kernel in keep:
            self._ready.put_nowait(kernel)
