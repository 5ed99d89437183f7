"""The privileged step, all of it: turn a freshly forked root process into a pooled worker.

Runs in the kernel provider's child, after the fork and before any user code. Order matters:
groups and ids first (root is needed for them), then the SELinux domain (a process that is no longer
root cannot change uid, and one in the confined domain could not either), then no_new_privs, so no
setuid program can give any of it back.
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass
from pathlib import Path

PR_SET_NO_NEW_PRIVS = 38  # linux/prctl.h
SELINUX_CURRENT = Path("/proc/self/attr/current")


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
    except OSError as error:
        raise WorkerPoolError(f"{path}: cannot read it ({error.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise WorkerPoolError(f"{path}: not a worker pool description ({error!r})") from None
    if not workers:
        raise WorkerPoolError(f"{path}: the pool has no workers")
    if any(worker.uid == 0 or worker.gid == 0 for worker in workers):
        raise WorkerPoolError(f"{path}: a worker with uid or gid 0 is not a worker")
    return WorkerPool(workers=workers, selinux_context=context, environment=environment)


def selinux_enabled() -> bool:
    return Path("/sys/fs/selinux/enforce").exists()


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
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    os.chdir(worker.home)
    os.environ.clear()
    os.environ.update(pool.environment)
    os.environ.update({"HOME": str(worker.home), "USER": worker.name, "LOGNAME": worker.name})
