# cellfleet worker pool: start a command as a pooled worker, and reset a worker to its skeleton.
# Installed by the worker_pool role; runs as root through sudo (the launch rule) or from Ansible.
# Runs on the target's system Python (3.9 on EL9, 3.11 on Debian 12): standard library only.
"""Launch and reset pooled, confined worker accounts."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_PATH = Path("/etc/cellfleet/worker-pool.json")
SYSTEMD_RUN = "/usr/bin/systemd-run"
SYSTEMCTL = "/usr/bin/systemctl"
RESTORECON = "/usr/sbin/restorecon"
IPCRM = "/usr/bin/ipcrm"
CGROUP_ROOT = Path("/sys/fs/cgroup")

# ioctl numbers of FS_IOC_GETFLAGS / FS_IOC_SETFLAGS and the immutable bit (linux/fs.h, 64-bit).
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010

WORKER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
EXIT_USAGE = 2


class UsageError(Exception):
    """A request the pool refuses; nothing has been changed."""


@dataclass(frozen=True)
class Worker:
    name: str
    uid: int
    gid: int
    home: Path


@dataclass(frozen=True)
class PoolConfig:
    workers: dict[str, Worker]
    selinux_context: str
    skeleton_dir: Path
    immutable: tuple[str, ...]
    shared_dirs: tuple[Path, ...]
    slice_prefix: str
    unit_properties: tuple[str, ...]
    environment: dict[str, str] = field(default_factory=dict)

    def worker(self, name: str) -> Worker:
        # The name is checked against the pool itself, never interpreted: no path, no uid, no other account.
        if not WORKER_NAME.match(name) or name not in self.workers:
            raise UsageError(f"{name!r} is not a worker of this pool")
        return self.workers[name]

    def slice_name(self, worker: Worker) -> str:
        return f"{self.slice_prefix}-{worker.name}.slice"

    def cgroup_dir(self, worker: Worker) -> Path:
        return CGROUP_ROOT / f"{self.slice_prefix}.slice" / self.slice_name(worker)


def load_config(path: Path = CONFIG_PATH) -> PoolConfig:
    raw = json.loads(path.read_text())
    workers = {
        name: Worker(name=name, uid=int(entry["uid"]), gid=int(raw["gid"]), home=Path(entry["home"]))
        for name, entry in raw["workers"].items()
    }
    return PoolConfig(
        workers=workers,
        selinux_context=raw["selinux_context"],
        skeleton_dir=Path(raw["skeleton_dir"]),
        immutable=tuple(raw["immutable"]),
        shared_dirs=tuple(Path(p) for p in raw["shared_dirs"]),
        slice_prefix=raw["slice_prefix"],
        unit_properties=tuple(raw["unit_properties"]),
        environment=dict(raw.get("environment", {})),
    )


# --- launch -----------------------------------------------------------------------------------------


def parse_env_assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not ENV_NAME.match(name) or "\0" in value:
        raise UsageError(f"--env takes NAME=VALUE, got {text!r}")
    return name, value


def systemd_run_argv(config: PoolConfig, worker: Worker, command: list[str], extra_env: dict[str, str]) -> list[str]:
    """The one command line a launch may become: the properties come from root's config, never the caller."""
    if not command:
        raise UsageError("no command given after the worker name")
    unit = f"cellworker-{worker.name}-{secrets.token_hex(4)}"
    environment = {
        **config.environment,
        "HOME": str(worker.home),
        "USER": worker.name,
        "LOGNAME": worker.name,
        **extra_env,
    }
    argv = [
        SYSTEMD_RUN,
        "--quiet",
        "--pipe",
        "--wait",
        "--collect",
        "--service-type=exec",
        f"--unit={unit}",
        f"--slice={config.slice_name(worker)}",
        f"--uid={worker.uid}",
        f"--gid={worker.gid}",
        f"--property=SELinuxContext={config.selinux_context}",
        f"--property=WorkingDirectory={worker.home}",
        # The home is the one place a worker writes outside its private /tmp (ProtectSystem=strict).
        f"--property=ReadWritePaths={worker.home}",
    ]
    argv += [f"--property={prop}" for prop in config.unit_properties]
    argv += [f"--setenv={name}={value}" for name, value in sorted(environment.items())]
    return [*argv, "--", *command]


def launch_main(args: list[str]) -> int:
    extra_env: dict[str, str] = {}
    while args and args[0] == "--env":
        if len(args) < 2:
            raise UsageError("--env needs NAME=VALUE")
        name, value = parse_env_assignment(args[1])
        extra_env[name] = value
        args = args[2:]
    if len(args) < 3 or args[1] != "--":
        raise UsageError("usage: cellfleet-worker-run [--env NAME=VALUE]... WORKER -- COMMAND [ARG]...")
    config = load_config()
    argv = systemd_run_argv(config, config.worker(args[0]), args[2:], extra_env)
    os.execv(argv[0], argv)
    return 1  # not reached


# --- reset ------------------------------------------------------------------------------------------


@dataclass
class ResetReport:
    worker: str
    killed: int = 0
    removed: list[str] = field(default_factory=list)
    ipc_removed: int = 0
    restored: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.killed or self.removed or self.ipc_removed or self.restored)

    def as_dict(self) -> dict[str, object]:
        return {
            "worker": self.worker,
            "changed": self.changed,
            "killed": self.killed,
            "removed": self.removed,
            "ipc_removed": self.ipc_removed,
            "restored": self.restored,
            "errors": self.errors,
        }


def pids_of_uid(uid: int) -> list[int]:
    """Every process whose real, effective or saved uid is the worker's."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        uid_line = next((line for line in status.splitlines() if line.startswith("Uid:")), "")
        if str(uid) in uid_line.split()[1:4]:
            pids.append(int(entry.name))
    return pids


def kill_worker_processes(config: PoolConfig, worker: Worker, report: ResetReport, dry_run: bool) -> None:
    cgroup = config.cgroup_dir(worker)
    if dry_run:
        report.killed = len(pids_of_uid(worker.uid))
        return
    # cgroup.kill takes the whole slice down at once, so a fork bomb cannot outrun the killing.
    if (cgroup / "cgroup.kill").exists():
        (cgroup / "cgroup.kill").write_text("1")
    subprocess.run([SYSTEMCTL, "stop", config.slice_name(worker)], check=False, capture_output=True)
    # Whatever runs as the worker outside its slice (started by hand, by cron...) goes too.
    for _ in range(100):
        pids = pids_of_uid(worker.uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                report.killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    report.errors.append(f"processes of {worker.name} still alive: {pids_of_uid(worker.uid)}")


def remove_ipc_objects(worker: Worker, report: ResetReport, dry_run: bool) -> None:
    """System V shared memory, queues and semaphores outlive processes: remove the worker's."""
    for kind, flag, id_column in (("shm", "-m", "shmid"), ("msg", "-q", "msqid"), ("sem", "-s", "semid")):
        table = Path("/proc/sysvipc") / kind
        if not table.exists():
            continue
        lines = table.read_text().splitlines()
        columns = lines[0].split()
        for line in lines[1:]:
            row = dict(zip(columns, line.split()))  # noqa: B905 - EL9's Python 3.9 has no zip(strict=)
            if str(worker.uid) in (row.get("uid"), row.get("cuid")):
                report.ipc_removed += 1
                if not dry_run:
                    subprocess.run([IPCRM, flag, row[id_column]], check=False, capture_output=True)


def open_for_flags(path: Path) -> int:
    # Never through a symlink, never blocking on a FIFO: only the named inode's flags are wanted.
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)


def read_flags(fd: int) -> int:
    return struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]


def get_flags(path: Path) -> int:
    fd = open_for_flags(path)
    try:
        return read_flags(fd)
    finally:
        os.close(fd)


def set_immutable(path: Path, immutable: bool) -> None:
    fd = open_for_flags(path)
    try:
        flags = read_flags(fd)
        wanted = flags | FS_IMMUTABLE_FL if immutable else flags & ~FS_IMMUTABLE_FL
        if wanted != flags:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", wanted))
    finally:
        os.close(fd)


def is_immutable(path: Path) -> bool:
    return bool(get_flags(path) & FS_IMMUTABLE_FL)


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree, clearing immutable flags root may have set inside it."""
    info = path.lstat()
    if stat.S_ISDIR(info.st_mode):
        set_immutable(path, False)
        for child in path.iterdir():
            remove_tree(child)
        path.rmdir()
        return
    # Only regular files carry the flag; opening a device or a FIFO to ask could have side effects. A file
    # with other names may be a hard link to something that must stay immutable: leave its flag alone.
    if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
        set_immutable(path, False)
    path.unlink()


def walk_owned(top: Path, uid: int) -> Iterator[Path]:
    """Entries under top owned by uid, on top's filesystem, not descending into the ones it yields."""
    try:
        top_device = top.lstat().st_dev
    except FileNotFoundError:
        return
    pending = [top]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if info.st_uid == uid:
                yield Path(entry.path)
            elif stat.S_ISDIR(info.st_mode) and info.st_dev == top_device:
                pending.append(Path(entry.path))


def remove_worker_files(config: PoolConfig, worker: Worker, report: ResetReport, dry_run: bool) -> None:
    # The home belongs to the pool: everything but the immutable skeleton goes, whoever created it.
    if worker.home.is_dir():
        for entry in sorted(worker.home.iterdir()):
            if entry.name in config.immutable:
                continue
            report.removed.append(str(entry))
            if not dry_run:
                remove_tree(entry)
    for shared in config.shared_dirs:
        for entry in list(walk_owned(shared, worker.uid)):
            report.removed.append(str(entry))
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    remove_tree(entry)


def restorecon(path: Path) -> None:
    subprocess.run([RESTORECON, "-F", str(path)], check=False, capture_output=True)


def note(restored: list[str], path: Path) -> None:
    """Record a path the reset restored, once however many of its properties were off."""
    if str(path) not in restored:
        restored.append(str(path))


def seal(source: Path, target: Path) -> None:
    """Give target the skeleton's mode, root's ownership, its SELinux label, then the immutable flag.

    The label comes before the flag: an immutable inode refuses new extended attributes.
    """
    os.chown(target, 0, 0)
    os.chmod(target, stat.S_IMODE(source.stat().st_mode))
    restorecon(target)
    set_immutable(target, True)


def file_matches(source: Path, target: Path) -> bool:
    try:
        info = target.lstat()
    except FileNotFoundError:
        return False
    source_info = source.stat()
    return (
        stat.S_ISREG(info.st_mode)
        and stat.S_IMODE(info.st_mode) == stat.S_IMODE(source_info.st_mode)
        and (info.st_uid, info.st_gid) == (0, 0)
        and target.read_bytes() == source.read_bytes()
        and is_immutable(target)
    )


def mirror_file(source: Path, target: Path, restored: list[str], dry_run: bool) -> None:
    if file_matches(source, target):
        return
    note(restored, target)
    if dry_run:
        return
    if target.is_symlink() or target.exists():
        remove_tree(target)
    target.write_bytes(source.read_bytes())
    seal(source, target)


def mirror_dir(source: Path, target: Path, restored: list[str], dry_run: bool) -> None:
    """Make target an exact, root-owned, immutable copy of the skeleton directory source."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        note(restored, target)
        if not dry_run:
            remove_tree(target)
    if not target.exists():
        note(restored, target)
        if dry_run:
            return
        target.mkdir()
    wanted = {child.name for child in source.iterdir()}
    extra = [child for child in target.iterdir() if child.name not in wanted]
    missing = [name for name in wanted if not (target / name).exists() and not (target / name).is_symlink()]
    info = target.lstat()
    node_differs = (
        stat.S_IMODE(info.st_mode) != stat.S_IMODE(source.stat().st_mode)
        or (info.st_uid, info.st_gid) != (0, 0)
        or not is_immutable(target)
    )
    if extra or missing or node_differs:
        note(restored, target)
        if dry_run:
            return
        set_immutable(target, False)
        for child in extra:
            remove_tree(child)
    for child in sorted(source.iterdir()):
        mirror(child, target / child.name, restored, dry_run)
    if not dry_run and (extra or missing or node_differs):
        seal(source, target)


def mirror(source: Path, target: Path, restored: list[str], dry_run: bool) -> None:
    if source.is_dir():
        mirror_dir(source, target, restored, dry_run)
    else:
        mirror_file(source, target, restored, dry_run)


def restore_skeleton(config: PoolConfig, worker: Worker, report: ResetReport, dry_run: bool) -> None:
    home = worker.home
    if not home.is_dir():
        note(report.restored, home)
        if dry_run:
            return
        home.mkdir(mode=0o700)
    info = home.lstat()
    if (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) != (worker.uid, worker.gid, 0o700):
        note(report.restored, home)
        if not dry_run:
            os.chown(home, worker.uid, worker.gid)
            os.chmod(home, 0o700)
            restorecon(home)
    for name in config.immutable:
        source = config.skeleton_dir / name
        if not source.exists():
            report.errors.append(f"skeleton entry {source} is missing")
            continue
        mirror(source, home / name, report.restored, dry_run)


def reset_worker(config: PoolConfig, worker: Worker, skeleton_only: bool, dry_run: bool) -> ResetReport:
    report = ResetReport(worker=worker.name)
    if not skeleton_only:
        kill_worker_processes(config, worker, report, dry_run)
        remove_ipc_objects(worker, report, dry_run)
        remove_worker_files(config, worker, report, dry_run)
    restore_skeleton(config, worker, report, dry_run)
    return report


def reset_main(args: list[str]) -> int:
    options = {arg for arg in args if arg.startswith("--")}
    names = [arg for arg in args if not arg.startswith("--")]
    unknown = options - {"--all", "--dry-run", "--skeleton-only"}
    if unknown or (not names) == ("--all" not in options):
        raise UsageError("usage: cellfleet-worker-reset [--dry-run] [--skeleton-only] (WORKER... | --all)")
    config = load_config()
    workers = list(config.workers.values()) if "--all" in options else [config.worker(name) for name in names]
    reports = [
        reset_worker(config, worker, "--skeleton-only" in options, "--dry-run" in options).as_dict()
        for worker in workers
    ]
    print(json.dumps({"changed": any(r["changed"] for r in reports), "workers": reports}))
    return 1 if any(r["errors"] for r in reports) else 0


def run(entry_point: Callable[[list[str]], int], args: list[str]) -> None:
    if os.geteuid() != 0:
        print("cellfleet worker pool: must run as root (through the sudo launch rule)", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        sys.exit(entry_point(args))
    except UsageError as error:
        print(f"cellfleet worker pool: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
