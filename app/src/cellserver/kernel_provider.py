"""The kernel provider: imports the kernel's heavy modules once, then forks one kernel per request.

Two ways to run it:
- spawned by `cellserver serve` (a laptop, the tests): it talks over its stdin/stdout and kernels run as
  the current user;
- as root, its own systemd service (`cellserver kernel-provider --socket ... --worker-pool ...`): each
  kernel becomes an unused pooled worker (kernel_box.become_worker) before it runs anything, and
  after its release the worker is reset (killed, cleaned) before it serves again.

Protocol, one JSON object per line, each request carrying an "id" its answer repeats:
    {"op": "hello"}                    -> {"workers": N or null, "runtime_dir": DIR}
    {"op": "start", "cpu_seconds": N, "memory_bytes": N}
                                       -> {"kernel_id", "pid", "worker", "connection": {...}}
                                          or {"error": TEXT, "busy": true when every worker is taken}
    {"op": "release", "kernel_id": ID, "retain_as": SESSION_ID (optional)}
                                       -> {"released": ID}, sent once the worker is reset; with retain_as,
                                          the files the kernel wrote are kept for the session first
    {"op": "open_file", "kernel_id": ID, "path": P}
                                       -> {} with a read-only descriptor of the kernel's file passed beside
                                          it (socket clients only), or {"error": TEXT, "missing": true when
                                          there is no such file}
and, unasked, {"died": ID, "status": N} when a kernel exits before its release.
A client that goes away has all its kernels released.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import grp
import importlib
import json
import logging
import os
import resource
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# debugpy (imported by ipykernel) warns on stderr at every start that frozen modules hide breakpoints.
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")

# Imported once here, inherited by every fork: this is the point of the provider.
from ipykernel.kernelapp import IPKernelApp

from cellserver import sagecell_hooks, systemd
from cellserver.kernel_box import (
    BoxLimits,
    CgroupEvents,
    KernelCgroups,
    Worker,
    WorkerPool,
    become_worker,
    enter_box,
    mount_home,
    shared_network_namespace,
    unmount_home,
    volunteer_for_the_oom_killer,
)
from cellserver.kernel_files import (
    RETAIN_KEY,
    RETAIN_TOTAL_BYTES,
    RETAINED_DIRECTORY,
    WORK_DIRECTORY,
    FileRefusedError,
    answer_with_descriptor,
    open_kernel_file,
    remove_expired,
    retain_files,
)

# Modules a kernel would otherwise import while it initialises, after the fork, every time: imported once
# here, they leave most of a forked kernel's start (the debugger's above all) to the provider's own start.
WARM_MODULES = (
    "ipykernel.ipkernel", "ipykernel.debugger", "ipykernel.zmqshell", "ipykernel.comm",
    "IPython.core.completer", "IPython.core.completerlib", "IPython.core.debugger", "IPython.core.oinspect",
    "IPython.extensions.storemagic", "IPython.utils.wildcard", "faulthandler", "pdb", "tornado.platform.asyncio",
)  # fmt: skip
for _module in WARM_MODULES:
    importlib.import_module(_module)

log = logging.getLogger("cellserver.kernel_provider")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
MADV_COLLAPSE = 25  # linux/mman.h
HUGE_PAGE_BYTES = 2 << 20
RETAIN_SWEEP_SECONDS = 30.0  # how often expired retained files are looked for
# A killed box wakes the provider when it empties (cgroup.events); this often its task count is also checked,
# for a box that stopped emptying (BOX_DEATH_SECONDS) or whose file could not be watched.
BOX_CHECK_SECONDS = 0.5
# The boxes going over their memory.high wakes the guard (memory.events); where that file cannot be watched, it
# is read this often while kernels run. Past memory.high the kernel slows the boxes' allocations down, so the
# guard has time to act before the slice's OOM killer would.
MEMORY_GUARD_SECONDS = 0.25
# A killed box whose task count has not dropped for this long goes to the full reset. A box that still empties
# is left to finish: a starved cell takes long to end a fork bomb's tasks, and the full reset run meanwhile
# (a filesystem walk, restorecon) starved it further.
BOX_DEATH_SECONDS = 5.0
# A killed box holding at most this many tasks frees its worker at once, before its last task has gone:
# cgroup.kill queued SIGKILL for every task in the box, forks racing it included, so none of them runs user
# code again, and the worker's next kernel gets a cgroup and a home of its own. More tasks (a fork bomb's)
# count against the worker's RLIMIT_NPROC until they are reaped and could refuse its next kernel's processes,
# so such a box frees its worker only once it is empty.
EARLY_REUSE_TASKS = 32
PARALLEL_RESETS = 1  # full resets at once: each is a filesystem walk that a starved cell pays for in seconds
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")

KERNEL_ARGUMENTS = [
    # No history database in the worker's home, no banner, no extensions: a one-shot computation.
    "--HistoryManager.enabled=False",
    "--IPKernelApp.quiet=True",
    "--InteractiveShellApp.extensions=[]",
]


KERNELS = ("python3", "sage")


def kernel_arguments(kernel: str) -> list[str]:
    """Arguments selecting the kernel; for Sage, its library is imported here, once, before any fork."""
    if kernel == "python3":
        return []
    try:
        from cellserver.sage_environment import provide_sage_globals, warm_up

        log.info("sage globals from %s", ", ".join(provide_sage_globals()))
        importlib.import_module("sage.repl.ipython_kernel.kernel")
        importlib.import_module("sage.repl.ipython_kernel.all_jupyter")
        warm_up()
    except ImportError as error:
        raise SystemExit(f"kernel provider: the sage kernel needs passagemath installed ({error})") from None
    return ["--IPKernelApp.kernel_class=sage.repl.ipython_kernel.kernel.SageKernel"]


@dataclass(frozen=True)
class ProviderSettings:
    runtime_dir: Path
    kernel_arguments: tuple[str, ...] = ()
    pool: WorkerPool | None = None
    server_gid: int = -1  # the group whose members (the cell server) may connect to pooled kernels
    reset_command: tuple[str, ...] = ("/usr/local/sbin/cellfleet-worker-reset",)
    max_processes: int = 0  # RLIMIT_NPROC for pooled kernels (per uid, so per worker): 0 leaves it alone
    open_files: int = 1024
    box: BoxLimits | None = None  # a cgroup and namespaces per pooled kernel; None: the full reset after each


@dataclass(frozen=True)
class Box:
    """Where a pooled kernel's box lives, made before its fork."""

    cgroup: Path
    network_namespace: int


@dataclass
class KernelRecord:
    kernel_id: str
    pid: int
    directory: Path
    client: Client
    worker: Worker | None
    box: Box | None = None
    release_id: Any = None  # the request to answer once the worker is clean
    released_at: float = 0.0  # when its release began: the clock of release-to-reusable
    box_tasks: int | None = None  # tasks last seen in its killed box
    box_emptying_at: float = 0.0  # when that count was first seen or last dropped
    worker_freed: bool = False  # its worker went back to the pool while the killed box still emptied


@dataclass
class Client:
    reader: int
    writer: int
    buffer: bytes = b""
    kernels: set[str] = field(default_factory=set)
    closed: bool = False

    def send(self, answer: dict[str, Any]) -> None:
        if self.closed:
            return
        data = (json.dumps(answer) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.writer, data) :]
        except OSError:
            self.closed = True


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, so nothing outlives the server.

    parent is the pid the caller knew before it was started: if that parent is already gone (we were
    re-parented before the request took effect), exit now instead of living on as an orphan.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


def apply_limits(cpu_seconds: int, memory_bytes: int, max_processes: int, open_files: int) -> None:
    if cpu_seconds > 0:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if max_processes > 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
    if open_files > 0:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def connection_info(directory: Path) -> dict[str, Any]:
    """Unix sockets in the kernel's own directory: no port races, and no loopback traffic to allow."""
    info: dict[str, Any] = {f"{channel}_port": number for number, channel in enumerate(CHANNELS, start=1)}
    info.update(transport="ipc", ip=str(directory / "k"), key=secrets.token_hex(32),
                signature_scheme="hmac-sha256", kernel_name="python3")  # fmt: skip
    return info


def run_kernel(
    settings: ProviderSettings,
    provider: int,
    worker: Worker | None,
    info: dict[str, Any],
    limits: dict[str, int],
    box: Box | None,
) -> None:
    """In the forked child: enter the box, shed the provider's files, become the worker, serve until killed."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    # First, before the kernel allocates anything: it must not keep the provider's exemption.
    volunteer_for_the_oom_killer()
    if box is not None and settings.pool is not None and settings.box is not None:
        try:
            enter_box(box.cgroup, box.network_namespace, settings.pool, settings.box)
        except BaseException:
            os.write(2, f"kernel provider: a kernel's box failed:\n{traceback.format_exc()}".encode())
            raise
    # The provider's stderr (the journal) hears why a kernel could not start; it is closed before any user code.
    report = os.dup(2)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    # The provider's listening socket and client pipes must never reach user code.
    os.closerange(3, report)
    os.closerange(report + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    try:
        app = prepare_kernel(settings, provider, worker, info, limits)
    except BaseException:
        os.write(report, f"kernel provider: a kernel failed to start:\n{traceback.format_exc()}".encode())
        raise
    os.close(report)
    app.start()


def prepare_kernel(
    settings: ProviderSettings, provider: int, worker: Worker | None, info: dict[str, Any], limits: dict[str, int]
) -> IPKernelApp:
    apply_limits(limits["cpu_seconds"], limits["memory_bytes"], settings.max_processes if worker else 0,
                 settings.open_files if worker else 0)  # fmt: skip
    if worker is not None and settings.pool is not None:
        become_worker(worker, settings.pool)
        os.umask(0o007)  # the sockets the kernel binds next must admit the server's group
    die_with_parent(provider)  # after the change of uid, which clears the parent-death signal
    connection_file = Path(info["ip"]).with_suffix(".json")
    if worker is None:
        # Not the server's directory: what a kernel writes by a relative path (a savefig, a plot) stays apart
        # from other kernels and goes with its release. A worker works in its home, which its quota bounds
        # and its reset empties (this directory is on /run, a tmpfs that no quota bounds).
        os.chdir(connection_file.parent / WORK_DIRECTORY)
    fd = os.open(connection_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as stream:
        json.dump(info, stream)
    app = IPKernelApp.instance()
    app.initialize(["-f", str(connection_file), *KERNEL_ARGUMENTS, *settings.kernel_arguments])
    sagecell_hooks.install(app.kernel)
    os.umask(0o077)
    return app


class Provider:
    def __init__(
        self, settings: ProviderSettings, cgroups: KernelCgroups | None = None, network_namespace: int = -1
    ) -> None:
        self.settings = settings
        self.cgroups = cgroups if settings.box is not None else None
        self.network_namespace = network_namespace
        self.kernels: dict[str, KernelRecord] = {}
        self.free_workers: list[Worker] = list(settings.pool.workers) if settings.pool else []
        # reset process pid -> (the worker it cleans, the kernel it held if any, the process)
        self.resets: dict[int, tuple[Worker, KernelRecord | None, subprocess.Popen[bytes]]] = {}
        self.reset_queue: list[tuple[Worker, KernelRecord | None]] = []
        self.dying: dict[str, KernelRecord] = {}  # killed boxes waiting for their last process
        # Workers freed early whose old box then would not empty: their next release gets the full reset.
        self.suspect_workers: set[str] = set()
        self.guard_killed: set[Path] = set()  # boxes the memory guard killed, until their kernel's release
        self.selector = selectors.DefaultSelector()
        self.cgroup_events = CgroupEvents() if self.cgroups is not None else None
        if self.cgroup_events is not None:
            self.selector.register(self.cgroup_events.fd, selectors.EVENT_READ, "cgroups")
        self.wakeup_reader, wakeup_writer = os.pipe()
        os.set_blocking(self.wakeup_reader, False)
        os.set_blocking(wakeup_writer, False)
        signal.set_wakeup_fd(wakeup_writer)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        self.selector.register(self.wakeup_reader, selectors.EVENT_READ, "wakeup")
        self.retained_bytes: dict[str, int] = {}  # session id -> bytes kept for it, oldest first

    # --- clients -------------------------------------------------------------------------------------

    def add_client(self, reader: int, writer: int) -> None:
        os.set_blocking(reader, False)
        self.selector.register(reader, selectors.EVENT_READ, Client(reader, writer))

    def read_client(self, client: Client) -> bool:
        """Handle every complete line the client sent; False once it has gone."""
        try:
            data = os.read(client.reader, 65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            return False
        client.buffer += data
        *lines, client.buffer = client.buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self.handle(client, line)
        return True

    def drop_client(self, client: Client) -> None:
        self.selector.unregister(client.reader)
        client.closed = True
        for kernel_id in list(client.kernels):
            self.release(kernel_id, None)
        os.close(client.reader)
        if client.writer != client.reader:
            os.close(client.writer)

    def handle(self, client: Client, line: bytes) -> None:
        try:
            request = json.loads(line)
            request_id = request.get("id")
            op = request["op"]
        except (ValueError, KeyError, AttributeError, TypeError):
            client.send({"error": "not a request"})
            return
        try:
            if op == "hello":
                answer = {"workers": len(self.settings.pool.workers) if self.settings.pool else None,
                          "runtime_dir": str(self.settings.runtime_dir)}  # fmt: skip
            elif op == "start":
                answer = self.start(client, int(request.get("cpu_seconds", 0)), int(request.get("memory_bytes", 0)))
            elif op == "release":
                retain_as = request.get("retain_as")
                if self.release(str(request.get("kernel_id")), (client, request_id), retain_as):
                    return  # answered when the worker is clean
                answer = {"released": request.get("kernel_id")}
            elif op == "open_file":
                self.send_file(client, request_id, str(request.get("kernel_id")), str(request.get("path")))
                return
            else:
                answer = {"error": f"unknown op {op!r}"}
        except (ValueError, TypeError, OSError) as error:
            answer = {"error": str(error)}
        client.send({"id": request_id, **answer})

    def send_file(self, client: Client, request_id: Any, kernel_id: str, relative: str) -> None:
        """Open a file of a live kernel's working directory as the kernel's user may see it, and pass the
        descriptor: the server cannot reach a worker's home itself."""
        record = self.kernels.get(kernel_id)
        descriptor = None
        if record is None or record.release_id is not None:
            answer: dict[str, Any] = {"error": "no such kernel", "missing": True}
        elif client.reader != client.writer:
            answer = {"error": "descriptors pass over the provider's socket only"}
        else:
            base, owner = kernel_working_directory(record)
            try:
                descriptor = open_kernel_file(base, relative, owner)
                answer = {}
            except FileNotFoundError:
                answer = {"error": "no such file", "missing": True}
            except FileRefusedError as error:
                log.warning("kernel %s: file refused: %s", kernel_id, error)
                answer = {"error": "this file is not served"}
        try:
            with socket.socket(fileno=os.dup(client.writer)) as connection:
                answer_with_descriptor(connection, {"id": request_id, **answer}, descriptor)
        except OSError:
            client.closed = True
        finally:
            if descriptor is not None:
                os.close(descriptor)

    # --- kernels -------------------------------------------------------------------------------------

    def start(self, client: Client, cpu_seconds: int, memory_bytes: int) -> dict[str, Any]:
        worker = None
        if self.settings.pool is not None:
            if not self.free_workers:
                return {"error": "every worker is busy", "busy": True}
            worker = self.free_workers.pop(0)
        kernel_id = uuid.uuid4().hex
        directory = self.settings.runtime_dir / kernel_id
        box = None
        try:
            if worker is not None:
                box = self.make_box(kernel_id, worker)
            directory.mkdir(mode=0o700)
            if worker is not None:
                # Owned by the worker, readable by the server's group; setgid, so the sockets the kernel
                # binds belong to that group too. Other workers get nothing.
                os.chown(directory, worker.uid, self.settings.server_gid)
                os.chmod(directory, 0o2750)
            if worker is None:
                (directory / WORK_DIRECTORY).mkdir(mode=0o700)
            info = connection_info(directory)
            limits = {"cpu_seconds": cpu_seconds, "memory_bytes": memory_bytes}
            pid = self.fork_kernel(worker, info, limits, box)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            if worker is not None:
                self.throw_box_away(worker, box)
                self.free_workers.append(worker)
            raise
        self.kernels[kernel_id] = KernelRecord(kernel_id, pid, directory, client, worker, box)
        client.kernels.add(kernel_id)
        return {"kernel_id": kernel_id, "pid": pid, "worker": worker.name if worker else None, "connection": info}

    def make_box(self, kernel_id: str, worker: Worker) -> Box | None:
        if self.cgroups is None or self.settings.box is None or self.settings.pool is None:
            return None
        cgroup = self.cgroups.create(kernel_id, self.settings.box)
        try:
            mount_home(worker, self.settings.pool, self.settings.box)
        except OSError:
            self.cgroups.remove(cgroup)
            raise
        return Box(cgroup, self.network_namespace)

    def box_still_emptying(self, record: KernelRecord) -> bool:
        """Whether the killed box's task count dropped within BOX_DEATH_SECONDS."""
        assert record.box is not None and self.cgroups is not None
        tasks = self.cgroups.task_count(record.box.cgroup)
        now = time.monotonic()
        if record.box_tasks is None or tasks < record.box_tasks:
            record.box_tasks, record.box_emptying_at = tasks, now
        return now - record.box_emptying_at <= BOX_DEATH_SECONDS

    def throw_box_away(self, worker: Worker, box: Box | None) -> bool:
        """Remove an emptied box: its cgroup and the worker's tmpfs home; False while a process remains."""
        if box is None or self.cgroups is None:
            return True
        if not (self.cgroups.is_empty(box.cgroup) and self.cgroups.remove(box.cgroup)):
            return False
        return self.detach_home(worker)

    def fork_kernel(self, worker: Worker | None, info: dict[str, Any], limits: dict[str, int], box: Box | None) -> int:
        provider = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                run_kernel(self.settings, provider, worker, info, limits, box)
            finally:
                os._exit(70)
        return pid

    def release(self, kernel_id: str, answer_to: tuple[Client, Any] | None, retain_as: Any = None) -> bool:
        """Kill the kernel's process group; True when the answer waits for the worker's reset."""
        record = self.kernels.get(kernel_id)
        if record is None or record.release_id is not None:
            return False
        record.released_at = time.monotonic()
        record.client.kernels.discard(kernel_id)
        if record.box is not None and self.cgroups is not None:
            self.cgroups.kill(record.box.cgroup)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pid, signal.SIGKILL)
        if isinstance(retain_as, str) and RETAIN_KEY.fullmatch(retain_as):
            self.retain(record, retain_as)
        if record.worker is None:
            self.forget(record)
            return False
        record.release_id = answer_to or (None, None)
        if record.box is not None and record.worker.name in self.suspect_workers:
            self.suspect_workers.discard(record.worker.name)
            self.queue_reset(record.worker, record)
        elif record.box is not None and self.cgroups is not None:
            # Everything the kernel could touch is in its box: it is clean once the box is empty, and its
            # worker is reusable once every task in it is killed and its home detached (see EARLY_REUSE_TASKS).
            # Watched before its state is read: an emptying between the two still wakes the provider.
            self.watch(record.box.cgroup / "cgroup.events")
            self.dying[kernel_id] = record
            if self.detach_home(record.worker) and self.cgroups.task_count(record.box.cgroup) <= EARLY_REUSE_TASKS:
                record.worker_freed = True
                self.reusable(record)
            self.collect_boxes()
        else:
            # Without a box a kernel may have left processes outside its group and files anywhere it can
            # write: the pool's reset tool finds them by uid. The worker serves again only after it succeeded.
            self.queue_reset(record.worker, record)
        return answer_to is not None

    @property
    def retained(self) -> Path:
        return self.settings.runtime_dir / RETAINED_DIRECTORY

    def retain(self, record: KernelRecord, key: str) -> None:
        """Keep what the kernel wrote, before its worker's reset removes it, for the page to fetch."""
        base, owner = kernel_working_directory(record)
        group = self.settings.server_gid if record.worker is not None else -1
        try:
            self.retained.mkdir(mode=0o750, exist_ok=True)
            if group >= 0:
                os.chown(self.retained, 0, group)
            # Copied under another name, then renamed: the server serves the directory once it exists.
            partial = self.retained / f"{key}.part"
            shutil.rmtree(partial, ignore_errors=True)
            _files, size = retain_files(base, owner, partial, group)
            partial.rename(self.retained / key)
        except OSError as error:
            log.warning("kernel %s: its files were not kept: %s", record.kernel_id, error)
            return
        self.retained_bytes[key] = size
        while sum(self.retained_bytes.values()) > RETAIN_TOTAL_BYTES:
            oldest = next(iter(self.retained_bytes))
            shutil.rmtree(self.retained / oldest, ignore_errors=True)
            del self.retained_bytes[oldest]

    def remove_expired_files(self) -> None:
        remove_expired(self.retained)
        for key in [key for key in self.retained_bytes if not (self.retained / key).exists()]:
            del self.retained_bytes[key]

    def forget(self, record: KernelRecord) -> None:
        self.kernels.pop(record.kernel_id, None)
        shutil.rmtree(record.directory, ignore_errors=True)

    def watch(self, path: Path) -> bool:
        """Wake the loop when the cgroup file at path changes; False when it cannot be watched."""
        return self.cgroup_events is not None and self.cgroup_events.watch(path)

    def detach_home(self, worker: Worker) -> bool:
        """Detach the worker's home from the provider's view (the killed kernel keeps its own until it is gone)."""
        try:
            unmount_home(worker)
        except OSError as error:
            log.error("%s: its home could not be detached: %s", worker.name, error)
            return False
        return True

    def reusable(self, record: KernelRecord) -> None:
        assert record.worker is not None
        reusable_ms = (time.monotonic() - record.released_at) * 1000
        log.info("%s reusable %.1f ms after its kernel's release", record.worker.name, reusable_ms)
        self.finish_release(record, record.worker, clean=True)

    def collect_boxes(self) -> None:
        """Remove the killed boxes that have emptied, freeing the workers still waiting for them; a box that will
        not empty gets the full reset, or, when its worker was freed early, the worker's next release does."""
        for kernel_id, record in list(self.dying.items()):
            assert record.worker is not None and record.box is not None and self.cgroups is not None
            emptied = self.cgroups.is_empty(record.box.cgroup) and self.cgroups.remove(record.box.cgroup)
            # A worker still waiting needs its home detached too (a release whose detach failed tries again).
            if emptied and (record.worker_freed or self.detach_home(record.worker)):
                del self.dying[kernel_id]
                if not record.worker_freed:
                    self.reusable(record)
            elif not self.box_still_emptying(record):
                del self.dying[kernel_id]
                log.error("kernel %s: its box still holds processes after cgroup.kill", kernel_id)
                if record.worker_freed:
                    self.suspect(record.worker)
                else:
                    self.queue_reset(record.worker, record)

    def guard_memory(self) -> None:
        """Kill the box holding the most memory once the boxes together went past their memory.high, so the
        computation that ran the workers' memory out ends, not whichever kernel looks largest to the kernel."""
        if self.cgroups is None or not self.cgroups.memory_ran_short():
            return
        boxes = {record.box.cgroup: record for record in self.kernels.values()
                 if record.box is not None and record.release_id is None}  # fmt: skip
        self.guard_killed &= boxes.keys()
        if any(not self.cgroups.is_empty(box) for box in self.guard_killed):
            return  # the box killed last still gives its memory back
        largest = self.cgroups.largest(list(boxes))
        if largest is None:
            return
        log.error("kernel %s: its box killed, the largest when the kernels' memory ran short", boxes[largest].kernel_id)
        self.cgroups.kill(largest)
        self.guard_killed.add(largest)

    def suspect(self, worker: Worker) -> None:
        """A worker whose old box would not empty: reset now if it is free, else after its current kernel."""
        if worker in self.free_workers:
            self.free_workers.remove(worker)
            self.queue_reset(worker, None)
        else:
            self.suspect_workers.add(worker.name)

    def queue_reset(self, worker: Worker, record: KernelRecord | None) -> None:
        self.reset_queue.append((worker, record))
        self.start_queued_resets()

    def start_queued_resets(self) -> None:
        while self.reset_queue and len(self.resets) < PARALLEL_RESETS:
            worker, record = self.reset_queue.pop(0)
            reset = start_reset(self.settings, worker)
            self.resets[reset.pid] = (worker, record, reset)

    def reap(self) -> None:
        """Collect exited kernels (no zombies) and finish the releases whose reset is done."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            resetting = self.resets.pop(pid, None)
            if resetting is not None:
                self.finish_reset(*resetting, os.waitstatus_to_exitcode(status))
                self.start_queued_resets()
                continue
            kernel = next((k for k in self.kernels.values() if k.pid == pid and k.release_id is None), None)
            if kernel is not None:
                # Died before its release (out of memory, CPU limit, a crash): the server stops waiting.
                kernel.client.send({"died": kernel.kernel_id, "status": os.waitstatus_to_exitcode(status)})

    def finish_reset(
        self, worker: Worker, record: KernelRecord | None, reset: subprocess.Popen[bytes], code: int
    ) -> None:
        if code != 0:
            message = reset.stderr.read().decode(errors="replace").strip() if reset.stderr else ""
            log.error("resetting %s failed (exit %s): %s; it is out of the pool", worker.name, code, message)
        if reset.stderr:
            reset.stderr.close()
        clean = code == 0 and (record is None or self.throw_box_away(worker, record.box))
        if record is None:
            if clean:
                self.free_workers.append(worker)
            return
        self.finish_release(record, worker, clean)

    def finish_release(self, record: KernelRecord, worker: Worker, clean: bool) -> None:
        self.forget(record)
        if clean:
            self.free_workers.append(worker)
        else:
            # An unclean worker must not run the next stranger's code: it stays out until a restart.
            log.error("%s stays out of the pool: its kernel's remains could not be removed", worker.name)
        client, request_id = record.release_id
        if client is not None:
            client.send({"id": request_id, "released": record.kernel_id})

    # --- the loop ------------------------------------------------------------------------------------

    def run_forever(self, listener: socket.socket | None) -> None:
        freeze_heap()
        if listener is not None:
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ, "listener")
        swept = guarded = time.monotonic()
        guards = self.cgroups is not None and self.cgroups.high is not None
        guard_polls = guards and self.cgroups is not None and not self.watch(self.cgroups.kernels / "memory.events")
        while True:
            if time.monotonic() - swept > RETAIN_SWEEP_SECONDS:
                self.remove_expired_files()
                swept = time.monotonic()
            if self.dying:
                self.collect_boxes()
            # Not on every wake-up: a message from the server wakes the loop far more often.
            if guard_polls and time.monotonic() - guarded >= MEMORY_GUARD_SECONDS:
                self.guard_memory()
                guarded = time.monotonic()
            timeout = BOX_CHECK_SECONDS if self.dying else RETAIN_SWEEP_SECONDS
            if guard_polls and self.kernels:
                timeout = min(timeout, MEMORY_GUARD_SECONDS)
            for key, _events in self.selector.select(timeout=timeout):
                if key.data == "cgroups":
                    assert self.cgroup_events is not None
                    self.cgroup_events.drain()
                    if guards:
                        self.guard_memory()  # one read of memory.events; a box emptying wakes it too
                elif key.data == "wakeup":
                    while True:
                        try:
                            if not os.read(self.wakeup_reader, 512):
                                break
                        except BlockingIOError:
                            break
                    self.reap()
                elif key.data == "listener":
                    assert listener is not None
                    with contextlib.suppress(BlockingIOError, ConnectionAbortedError):
                        connection, _address = listener.accept()
                        fd = connection.detach()
                        self.add_client(fd, fd)
                elif not self.read_client(key.data):
                    self.drop_client(key.data)
                    if listener is None:
                        return  # the server that spawned this provider is gone


def kernel_working_directory(record: KernelRecord) -> tuple[Path, int]:
    """Where the kernel works, and the user its files belong to."""
    if record.worker is not None:
        return record.worker.home, record.worker.uid
    return record.directory / WORK_DIRECTORY, os.getuid()


def freeze_heap() -> None:
    """Every object imported so far out of the garbage collector's reach: a kernel's collections would
    otherwise walk them all, and each page they touch is copied from the provider's into the kernel's."""
    gc.collect()
    gc.freeze()
    collapsed = collapse_heap_into_huge_pages()
    log.info("%d MiB of the provider's heap in huge pages", collapsed >> 20)


def dense_anonymous_regions(smaps: str) -> Iterator[tuple[int, int]]:
    """The private, writable, anonymous mappings of a /proc/<pid>/smaps text that are mostly resident."""
    region: tuple[int, int] | None = None
    for line in smaps.splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(part, 16) for part in fields[0].split("-"))
            anonymous = len(fields) == 5 or fields[5] == "[heap]"
            region = (start, end) if anonymous and fields[1] == "rw-p" else None
        elif region is not None and fields[0] == "Rss:":
            start, end = region
            # A sparse mapping (a thread's stack) would be filled up to whole huge pages: left alone.
            if int(fields[1]) * 1024 * 2 >= end - start:
                yield region
            region = None


def huge_page_span(start: int, end: int) -> tuple[int, int] | None:
    """The whole huge pages inside [start, end), if any."""
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    last = end // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return (first, last) if last > first else None


def collapse_heap_into_huge_pages() -> int:
    """Bytes of the heap now mapped by huge pages: each kernel's fork copies, and its exit tears down, one
    entry per 2 MiB there instead of 512. Best effort: a kernel without MADV_COLLAPSE (before Linux 6.1)
    or without transparent huge pages leaves the heap as it is."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    collapsed = 0
    for start, end in dense_anonymous_regions(Path("/proc/self/smaps").read_text()):
        span = huge_page_span(start, end)
        if span is not None and libc.madvise(span[0], span[1] - span[0], MADV_COLLAPSE) == 0:
            collapsed += span[1] - span[0]
    return collapsed


def start_reset(settings: ProviderSettings, worker: Worker) -> subprocess.Popen[bytes]:
    """The pool's reset tool on one worker; its stderr says why when it fails."""
    return subprocess.Popen([*settings.reset_command, worker.name], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def reset_first_clean_worker(
    settings: ProviderSettings, workers: Sequence[Worker]
) -> tuple[list[Worker], list[Worker]]:
    """Reset workers one by one until one comes clean: (that one, the workers still to reset).

    At start, workers may hold what a killed provider or a launched command left. Resetting them all at
    once starves a small cell for as long as it takes; one clean worker is enough to serve. A worker whose
    reset failed is in neither list.
    """
    for position, worker in enumerate(workers):
        reset = start_reset(settings, worker)
        _out, error = reset.communicate()
        if reset.returncode == 0:
            return [worker], list(workers[position + 1 :])
        log.error("resetting %s failed: %s; it is out of the pool", worker.name, error.decode().strip())
    return [], []


@dataclass(frozen=True)
class BoxPlaces:
    """What every box is made in: the provider's cgroup subtree and the kernels' network namespace."""

    cgroups: KernelCgroups | None = None
    network_namespace: int = -1


def make_box_places(box: BoxLimits | None) -> BoxPlaces:
    """The places kernels are boxed in; none without box limits.

    Called before the kernel's library is imported: the namespace is made by a forked helper, and a host
    that cannot box should say so at once, not after a minute of loading Sage.
    """
    if box is None:
        return BoxPlaces()
    try:
        cgroups = KernelCgroups.take_over()
        return BoxPlaces(cgroups, shared_network_namespace())
    except OSError as error:
        raise SystemExit(f"kernel provider: kernels cannot be boxed here: {error}") from None


def listen(path: Path, gid: int) -> socket.socket:
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chown(path, 0, gid)
    os.chmod(path, 0o660)
    listener.listen(8)
    return listener


def serve_pool(settings: ProviderSettings, socket_path: Path, places: BoxPlaces) -> None:
    """Root service mode: workers reset, then the socket opens for the cell server's group."""
    settings.runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    for stale in settings.runtime_dir.iterdir():
        shutil.rmtree(stale, ignore_errors=True)
    provider = Provider(settings, places.cgroups, places.network_namespace)
    workers = settings.pool.workers if settings.pool else ()
    provider.free_workers, waiting = reset_first_clean_worker(settings, workers)
    if not provider.free_workers:
        raise SystemExit("kernel provider: no worker could be reset; refusing to run kernels")
    for worker in waiting:
        provider.queue_reset(worker, None)
    if places.cgroups is not None:
        high = places.cgroups.set_memory_guard()
        if high is not None:
            log.info("kernels together slowed down past %d MiB, the largest box killed", high >> 20)
    listener = listen(socket_path, settings.server_gid)
    log.info("serving on %s: %d workers clean, %d more after their reset, kernels %s", socket_path,
             len(provider.free_workers), len(waiting), "boxed" if places.cgroups else "not boxed")  # fmt: skip
    systemd.notify("READY=1")  # the cell server's unit starts after this: the socket exists by then
    provider.run_forever(listener)


def serve_parent(settings: ProviderSettings, parent: int) -> None:
    """Spawned mode: the server's pipes are the one client; kernels run as the current user."""
    die_with_parent(parent)
    provider = Provider(settings)
    provider.add_client(sys.stdin.fileno(), sys.stdout.fileno())
    provider.run_forever(None)


def group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SystemExit(f"kernel provider: no group named {name!r}") from None
