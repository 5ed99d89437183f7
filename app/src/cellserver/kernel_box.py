"""The privileged steps, all of them: the box a pooled kernel runs in, and the drop to its worker.

Runs in the root kernel provider. Before the fork the provider makes the kernel's cgroup (its own memory,
task and CPU limits, under the provider's delegated subtree) and mounts a fresh home for its worker. In the
forked child, before any user code: the child joins that cgroup, takes a mount and IPC namespace of its own
with private tmpfs /tmp, /var/tmp and /dev/shm, and enters the one shared network namespace that holds only
loopback; then it becomes the worker. Order matters there: groups and ids first (root is needed for them),
then the SELinux domain (a process that is no longer root cannot change uid, and one in the confined domain
could not either), then no_new_privs, so no setuid program can give any of it back.

The box is thrown away whole after the release: cgroup.kill ends every process in it, the namespaces go
with their last process, and the home's tmpfs is detached; nothing is searched for and deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

PR_SET_NO_NEW_PRIVS = 38  # linux/prctl.h
SELINUX_CURRENT = Path("/proc/self/attr/current")
OOM_SCORE_ADJ = Path("/proc/self/oom_score_adj")
# Where a kernel stands in the OOM killer's order: well ahead of anything else on the cell. The provider that
# forks it is exempt (-1000, its unit's OOMScoreAdjust), which every child inherits until it says otherwise.
KERNEL_OOM_SCORE_ADJ = 500
CGROUP_ROOT = Path("/sys/fs/cgroup")
# linux/sched.h, linux/mount.h, linux/sockios.h, linux/if.h
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
MNT_DETACH = 0x2
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IN_MODIFY, IN_NONBLOCK, IN_CLOEXEC = 0x2, 0o4000, 0o2000000  # linux/inotify.h
KERNEL_CGROUP_PREFIX = "kernel-"
KERNELS_CGROUP = "kernels"  # every box, under one parent whose memory.high keeps them below their ancestors' limit
# What the boxes together leave free below the tightest memory.max above them (the workers' slice), for the
# provider and for the guard to act before the kernel's OOM killer does: a share of that limit, at least a floor.
GUARD_HEADROOM_SHARE = 16
GUARD_HEADROOM_FLOOR = 32 << 20
# The boxes still hold at least this share of their memory.high: allocations throttled a moment ago, by a box
# that has been killed and freed its memory since, are no reason to kill another.
STILL_SHORT_SHARE = 0.9
PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")

libc = ctypes.CDLL(None, use_errno=True)


class WorkerPoolError(Exception):
    """The worker pool description cannot be used; the message names what is wrong."""


@dataclass(frozen=True)
class Worker:
    name: str
    uid: int
    gid: int
    home: Path


@dataclass(frozen=True)
class WorkerPool:
    workers: tuple[Worker, ...]
    selinux_context: str
    environment: dict[str, str]
    skeleton_dir: Path | None = None
    skeleton_entries: tuple[str, ...] = ()
    file_context: str = ""  # SELinux label of the box's tmpfs mounts: the type the workers own in /tmp


@dataclass(frozen=True)
class BoxLimits:
    """What one kernel's box may use; 0 leaves a limit to the provider's own cgroup."""

    memory_bytes: int = 0
    tasks: int = 0
    cpu_weight: int = 0
    tmpfs_bytes: int = 64 << 20  # each of /tmp, /var/tmp, /dev/shm and the home


def load_worker_pool(path: Path) -> WorkerPool:
    """Read the pool the worker_pool role wrote (/etc/cellfleet/worker-pool.json)."""
    try:
        document = json.loads(path.read_text())
        gid = int(document["gid"])
        workers = tuple(
            Worker(name=name, uid=int(entry["uid"]), gid=gid, home=Path(entry["home"]))
            for name, entry in sorted(document["workers"].items())
        )
        environment = {str(key): str(value) for key, value in document.get("environment", {}).items()}
        context = str(document.get("selinux_context", ""))
        skeleton = Path(document["skeleton_dir"]) if document.get("skeleton_dir") else None
        entries = tuple(str(name) for name in document.get("immutable", ()))
        file_context = str(document.get("file_context", ""))
    except OSError as error:
        raise WorkerPoolError(f"{path}: cannot read it ({error.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise WorkerPoolError(f"{path}: not a worker pool description ({error!r})") from None
    if not workers:
        raise WorkerPoolError(f"{path}: the pool has no workers")
    if any(worker.uid == 0 or worker.gid == 0 for worker in workers):
        raise WorkerPoolError(f"{path}: a worker with uid or gid 0 is not a worker")
    if any("/" in name or name in ("", ".", "..") for name in entries):
        raise WorkerPoolError(f"{path}: a skeleton entry must be a plain name in the home")
    return WorkerPool(workers=workers, selinux_context=context, environment=environment, skeleton_dir=skeleton,
                      skeleton_entries=entries, file_context=file_context)  # fmt: skip


def selinux_enabled() -> bool:
    return Path("/sys/fs/selinux/enforce").exists()


def volunteer_for_the_oom_killer() -> None:
    """Put this process first in the OOM killer's order. Written while still root, the value is also the
    floor (oom_score_adj_min): the worker this process becomes cannot lower it again."""
    OOM_SCORE_ADJ.write_text(str(KERNEL_OOM_SCORE_ADJ))


def become_worker(worker: Worker, pool: WorkerPool) -> None:
    """Drop every privilege this process has and take on the worker's identity; raises on any failure."""
    os.setgroups([])
    os.setresgid(worker.gid, worker.gid, worker.gid)
    os.setresuid(worker.uid, worker.uid, worker.uid)
    if os.getresuid() != (worker.uid,) * 3 or os.getresgid() != (worker.gid,) * 3 or os.getgroups():
        raise PermissionError(f"could not become {worker.name}")
    if pool.selinux_context and selinux_enabled():
        # A dynamic transition: the forked interpreter keeps its warm imports (an exec would lose them).
        SELINUX_CURRENT.write_text(pool.selinux_context)
        if SELINUX_CURRENT.read_text().rstrip("\0\n") != pool.selinux_context:
            raise PermissionError(f"still not in {pool.selinux_context}")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    os.chdir(worker.home)
    os.environ.clear()
    os.environ.update(pool.environment)
    os.environ.update({"HOME": str(worker.home), "USER": worker.name, "LOGNAME": worker.name})


# --- the box ----------------------------------------------------------------------------------------


def check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def mount_tmpfs(target: str, size: int, mode: int, owner: tuple[int, int], label: str) -> None:
    options = f"size={size},mode={mode:o},uid={owner[0]},gid={owner[1]}"
    if label and selinux_enabled():
        options += f',context="{label}"'
    check(libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()),
          f"mount tmpfs on {target}")  # fmt: skip


def own_cgroup() -> Path:
    """This process's cgroup (v2 unified hierarchy only)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROUP_ROOT / line[3:].lstrip("/")
    raise OSError("no cgroup v2 hierarchy: kernels cannot have a cgroup of their own")


def memory_limit_above(path: Path) -> int | None:
    """The tightest memory.max of path's ancestors (path excluded) in bytes, None when none sets one."""
    limits = []
    for ancestor in path.parents:
        if ancestor == CGROUP_ROOT or CGROUP_ROOT not in ancestor.parents:
            break
        with contextlib.suppress(FileNotFoundError, ValueError):
            limits.append(int((ancestor / "memory.max").read_text()))
    return min(limits) if limits else None


def high_events(cgroup: Path) -> int:
    """How often the cgroup went over its memory.high (memory.events), 0 when it is gone."""
    try:
        fields = dict(line.split() for line in (cgroup / "memory.events").read_text().splitlines())
    except FileNotFoundError:
        return 0
    return int(fields.get("high", 0))


def memory_in_use(cgroup: Path) -> int:
    try:
        return int((cgroup / "memory.current").read_text())
    except FileNotFoundError:
        return 0


class KernelCgroups:
    """The provider's delegated cgroup: the provider itself in a leaf, the boxes in a sibling group.

    The kernel's OOM killer, when the workers' slice runs out, picks the process with the largest resident
    size: every forked kernel counts the pages it shares with the provider, so an idle neighbour looks as large
    as a fork bomb's children and may be the one killed. The boxes' parent therefore gets a memory.high below
    the slice's limit: past it the kernel slows the boxes' allocations down instead of killing anything, and
    the provider kills the box that holds the most memory (Provider.guard_memory).
    """

    def __init__(self, top: Path) -> None:
        self.top = top
        self.kernels = top / KERNELS_CGROUP
        self.high: int | None = None
        self.high_seen = 0

    @classmethod
    def take_over(cls) -> KernelCgroups:
        """Move this process into a leaf of its unit's cgroup and hand the controllers down to kernels.

        cgroup v2 lets only leaves hold processes once controllers are enabled for children; a provider
        restarted under the same unit finds its own leaf already made.
        """
        current = own_cgroup()
        top = current.parent if current.name == "provider" else current
        (top / "provider").mkdir(exist_ok=True)
        (top / "provider" / "cgroup.procs").write_text(str(os.getpid()))
        available = set((top / "cgroup.controllers").read_text().split())
        missing = {"memory", "pids", "cpu"} - available
        if missing:
            raise OSError(f"{top}: controllers {sorted(missing)} are not delegated (Delegate=yes in the unit)")
        (top / "cgroup.subtree_control").write_text("+memory +pids +cpu")
        cgroups = cls(top)
        for stale in [*top.glob(f"{KERNEL_CGROUP_PREFIX}*"), *cgroups.kernels.glob(f"{KERNEL_CGROUP_PREFIX}*")]:
            cgroups.kill(stale)
            cgroups.remove(stale)
        cgroups.kernels.mkdir(exist_ok=True)
        (cgroups.kernels / "cgroup.subtree_control").write_text("+memory +pids +cpu")
        return cgroups

    def set_memory_guard(self) -> int | None:
        """memory.high of the boxes' parent: the limit above, less the provider's memory (warm by now) and the
        headroom; None where nothing above limits memory."""
        limit = memory_limit_above(self.top / "provider")
        if limit is None:
            return None
        headroom = max(limit // GUARD_HEADROOM_SHARE, GUARD_HEADROOM_FLOOR)
        high = max(limit - memory_in_use(self.top / "provider") - headroom, GUARD_HEADROOM_FLOOR)
        (self.kernels / "memory.high").write_text(str(high))
        self.high, self.high_seen = high, high_events(self.kernels)
        return high

    def memory_ran_short(self) -> bool:
        """Whether the boxes together went over their memory.high since the last call and still hold nearly
        that much."""
        seen = high_events(self.kernels)
        crossed, self.high_seen = seen > self.high_seen, seen
        return crossed and self.high is not None and memory_in_use(self.kernels) >= self.high * STILL_SHORT_SHARE

    @staticmethod
    def largest(boxes: list[Path]) -> Path | None:
        """The box that holds the most memory, None for no box."""
        return max(boxes, key=memory_in_use, default=None)

    def create(self, kernel_id: str, limits: BoxLimits) -> Path:
        path = self.kernels / f"{KERNEL_CGROUP_PREFIX}{kernel_id}"
        path.mkdir()
        wanted = {"memory.max": limits.memory_bytes, "pids.max": limits.tasks, "cpu.weight": limits.cpu_weight}
        settings = {name: value for name, value in wanted.items() if value}
        if limits.memory_bytes:
            settings["memory.swap.max"] = 0  # a box bounded in memory must not spill into swap instead
        try:
            for name, value in settings.items():
                (path / name).write_text(str(value))
        except OSError:
            path.rmdir()
            raise
        return path

    @staticmethod
    def kill(path: Path) -> None:
        """Every process in the kernel's cgroup, at once: a fork bomb cannot outrun it."""
        with contextlib.suppress(FileNotFoundError):
            (path / "cgroup.kill").write_text("1")

    @staticmethod
    def task_count(path: Path) -> int:
        try:
            return int((path / "pids.current").read_text())
        except FileNotFoundError:
            return 0

    @staticmethod
    def is_empty(path: Path) -> bool:
        try:
            return "populated 0" in (path / "cgroup.events").read_text()
        except FileNotFoundError:
            return True

    @staticmethod
    def remove(path: Path) -> bool:
        try:
            path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


class CgroupEvents:
    """Tells when a watched cgroup file changed: the kernel reports each change of cgroup.events (a box
    emptied) and memory.events (the boxes went over their memory.high) to inotify, so the provider waits on one
    descriptor instead of reading those files again and again while it competes with the kernels for CPU."""

    def __init__(self) -> None:
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"inotify_init1: {os.strerror(error)}")

    def watch(self, path: Path) -> bool:
        """Hear of path's changes from now on, until it is removed; False when it cannot be watched (gone
        already): the caller's own periodic check then sees its state."""
        return libc.inotify_add_watch(self.fd, bytes(path), IN_MODIFY) >= 0

    def drain(self) -> int:
        """Read every pending event; how many bytes there were (their content does not matter: the provider
        checks the boxes' state itself)."""
        pending = 0
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                return pending
            if not chunk:
                return pending
            pending += len(chunk)

    def close(self) -> None:
        os.close(self.fd)


def set_loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(probe, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))


def shared_network_namespace() -> int:
    """A descriptor of a new network namespace holding only loopback (up), for every kernel to enter.

    One namespace for all kernels: creating one per kernel costs tens of milliseconds under a global lock.
    """
    ready_reader, ready_writer = os.pipe()
    hold_reader, hold_writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_reader)
            os.close(hold_writer)
            check(libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            set_loopback_up()
            os.write(ready_writer, b"1")
            os.read(hold_reader, 1)  # until the provider has its descriptor
            code = 0
        except OSError as error:
            os.write(ready_writer, f"0{error}".encode())
        finally:
            os._exit(code)
    os.close(ready_writer)
    os.close(hold_reader)
    try:
        answer = os.read(ready_reader, 4096)
        if answer != b"1":
            raise OSError(f"the network namespace for kernels could not be made: {answer[1:].decode()}")
        return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_reader)
        os.close(hold_writer)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def copy_skeleton(pool: WorkerPool, home: Path) -> None:
    """The immutable dotfiles and directories, owned by root, into a fresh home.

    Their contents and modes only: a tmpfs mounted with a context gives every file the same label, and no one
    reads their timestamps, so none of what shutil's copies carry over (times, extended attributes) is asked
    for: each box costs a few system calls per entry, which a starved cell feels on every kernel.
    """
    if pool.skeleton_dir is None:
        return
    for name in pool.skeleton_entries:
        copy_entry(pool.skeleton_dir / name, home / name)


def copy_entry(source: Path, target: Path) -> None:
    """A regular file or a directory tree (links and special files are left out), with its permission bits."""
    info = source.lstat()
    if stat.S_ISDIR(info.st_mode):
        os.mkdir(target)
        os.chmod(target, stat.S_IMODE(info.st_mode))
        with os.scandir(source) as entries:
            for entry in entries:
                copy_entry(Path(entry.path), target / entry.name)
    elif stat.S_ISREG(info.st_mode):
        content = source.read_bytes()
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(descriptor, "wb") as stream:
            stream.write(content)
            os.fchmod(descriptor, stat.S_IMODE(info.st_mode))


def mount_home(worker: Worker, pool: WorkerPool, limits: BoxLimits) -> None:
    """A fresh tmpfs home for the worker, in the provider's mount namespace (the provider serves its files)."""
    mount_tmpfs(str(worker.home), limits.tmpfs_bytes, 0o700, (worker.uid, worker.gid), pool.file_context)
    try:
        copy_skeleton(pool, worker.home)
    except OSError:
        unmount_home(worker)
        raise


def unmount_home(worker: Worker) -> None:
    """Detach the worker's tmpfs home: its files go once the kernel's namespace has gone too."""
    while os.path.ismount(worker.home):
        check(libc.umount2(str(worker.home).encode(), MNT_DETACH), f"umount {worker.home}")


def private_mount_namespace(also: int = 0) -> None:
    """A mount namespace of this process's own (and the namespaces in also): mounts made from here on stay in it."""
    check(libc.unshare(CLONE_NEWNS | also), "unshare")
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")


def enter_box(cgroup: Path, network_namespace: int, pool: WorkerPool, limits: BoxLimits) -> None:
    """In the forked child, still root: join the kernel's cgroup, get private namespaces and tmpfs mounts."""
    (cgroup / "cgroup.procs").write_text("0")
    private_mount_namespace(also=CLONE_NEWIPC)
    for target in PRIVATE_TMPFS:
        if os.path.isdir(target):
            mount_tmpfs(target, limits.tmpfs_bytes, 0o1777, (0, 0), pool.file_context)
    check(libc.setns(network_namespace, CLONE_NEWNET), "setns(network namespace)")
    os.close(network_namespace)
