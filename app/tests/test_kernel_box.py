"""The pieces of a kernel's box that this machine can run as root: the shared loopback-only network namespace,
the private tmpfs mounts, a fresh home from the skeleton, the cgroup limits written. Each runs in a forked
child in a mount namespace of its own, so nothing touches this machine's mounts.

The whole box (a real delegated cgroup v2 subtree, cgroup.kill, SELinux) is proven on the lab's cells by
tests/infra/test_kernel_box.py: this machine's cgroups are v1 and its PID 1 is not systemd.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cellserver import kernel_box
from cellserver.kernel_box import KERNELS_CGROUP as KERNELS
from cellserver.kernel_box import BoxLimits, KernelCgroups, Worker, WorkerPool

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a kernel's box is made by root")


def in_child(action: Callable[[], Any]) -> Any:
    """action's JSON-able result, run in a forked child that first takes a private mount namespace."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        try:
            kernel_box.private_mount_namespace()
            result = {"result": action()}
        except BaseException:
            result = {"error": traceback.format_exc()}
        os.write(writer, json.dumps(result).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as stream:
        answer = json.loads(stream.read() or '{"error": "the child said nothing"}')
    os.waitpid(pid, 0)
    assert "error" not in answer, answer["error"]
    return answer["result"]


def test_the_kernels_network_namespace_holds_only_a_working_loopback() -> None:
    namespace = kernel_box.shared_network_namespace()

    def look() -> dict[str, Any]:
        kernel_box.check(kernel_box.libc.setns(namespace, kernel_box.CLONE_NEWNET), "setns")
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=2):
                pass
        return {"interfaces": [name for _index, name in socket.if_nameindex()]}

    try:
        seen = in_child(look)
    finally:
        os.close(namespace)
    assert seen == {"interfaces": ["lo"]}
    assert len(socket.if_nameindex()) >= 1  # this process stayed where it was


def test_the_box_gives_private_tmpfs_places_that_go_with_it(tmp_path: Path) -> None:
    namespace = kernel_box.shared_network_namespace()
    cgroup = tmp_path / "kernel-x"
    cgroup.mkdir()
    (cgroup / "cgroup.procs").write_text("")
    pool = WorkerPool(workers=(), selinux_context="", environment={})
    marker = f"box-test-{os.getpid()}"

    def inside() -> dict[str, Any]:
        kernel_box.enter_box(cgroup, namespace, pool, BoxLimits(tmpfs_bytes=1 << 20))
        found = {}
        for place in kernel_box.PRIVATE_TMPFS:
            Path(place, marker).write_text("x")
            found[place] = (sorted(os.listdir(place)), os.statvfs(place).f_blocks * os.statvfs(place).f_frsize)
        return found

    try:
        seen = in_child(inside)
    finally:
        os.close(namespace)
    for place in kernel_box.PRIVATE_TMPFS:
        entries, size = seen[place]
        assert entries == [marker], f"{place} was not empty and private: {entries}"
        assert size == 1 << 20
        assert not Path(place, marker).exists(), f"{place}/{marker} reached this machine"
    assert (cgroup / "cgroup.procs").read_text() == "0"


def test_a_fresh_home_holds_the_skeleton_owned_by_root(tmp_path: Path) -> None:
    skeleton = tmp_path / "skel"
    (skeleton / ".ipython").mkdir(parents=True)
    (skeleton / ".ipython").chmod(0o555)
    (skeleton / ".profile").write_text("umask 077\n")
    (skeleton / ".profile").chmod(0o444)
    (skeleton / ".ssh").symlink_to(tmp_path)  # a link is not followed: nothing outside the skeleton is copied
    home = tmp_path / "home"
    home.mkdir()
    (home / "on-disk").write_text("the disk's")
    worker = Worker(name="cellw01", uid=20001, gid=20000, home=home)
    pool = WorkerPool(workers=(worker,), selinux_context="", environment={}, skeleton_dir=skeleton,
                      skeleton_entries=(".profile", ".ipython", ".ssh"))  # fmt: skip

    def mounted() -> dict[str, Any]:
        kernel_box.mount_home(worker, pool, BoxLimits(tmpfs_bytes=1 << 20))
        info = home.stat()
        listing = {entry.name: (entry.stat().st_uid, entry.is_dir(), oct(entry.stat().st_mode & 0o7777))
                   for entry in home.iterdir()}  # fmt: skip
        profile = (home / ".profile").read_text()
        (home / "written").write_text("by the kernel")
        kernel_box.unmount_home(worker)
        return {"owner": [info.st_uid, info.st_gid, oct(info.st_mode & 0o7777)], "listing": listing,
                "profile": profile, "after": sorted(os.listdir(home))}  # fmt: skip

    seen = in_child(mounted)
    assert seen["owner"] == [20001, 20000, "0o700"]
    assert seen["listing"] == {".profile": [0, False, "0o444"], ".ipython": [0, True, "0o555"]}
    assert seen["profile"] == "umask 077\n"
    assert seen["after"] == ["on-disk"], "the kernel's home must not reach the disk"


def test_a_kernel_cgroup_gets_its_limits_and_goes_once_empty(tmp_path: Path) -> None:
    cgroups = KernelCgroups(tmp_path)
    cgroups.kernels.mkdir()
    path = cgroups.create("k1", BoxLimits(memory_bytes=256 << 20, tasks=64, cpu_weight=50))
    written = {name: (path / name).read_text() for name in ("memory.max", "memory.swap.max", "pids.max", "cpu.weight")}
    assert written == {"memory.max": str(256 << 20), "memory.swap.max": "0", "pids.max": "64", "cpu.weight": "50"}
    (path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert not cgroups.is_empty(path)
    (path / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    assert cgroups.is_empty(path)


def cgroup_tree(root: Path, slice_max: str, provider_bytes: int) -> KernelCgroups:
    """A cgroup tree as the provider's unit sees it: the workers' slice, the unit (no limit of its own), the
    provider's leaf and the boxes' parent; files as the kernel shows them."""
    unit = root / "cellworkers.slice" / "provider.service"
    (unit / "provider").mkdir(parents=True)
    (unit / KERNELS).mkdir()
    (root / "cellworkers.slice" / "memory.max").write_text(f"{slice_max}\n")
    (unit / "memory.max").write_text("max\n")
    (unit / "provider" / "memory.current").write_text(f"{provider_bytes}\n")
    (unit / KERNELS / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    return KernelCgroups(unit)


def test_the_boxes_are_slowed_down_below_the_workers_limit_less_the_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_box, "CGROUP_ROOT", tmp_path)
    cgroups = cgroup_tree(tmp_path, str(1024 << 20), 200 << 20)
    high = cgroups.set_memory_guard()
    assert high == (1024 - 200 - 64) << 20  # a sixteenth of the limit stays free besides the provider
    assert (cgroups.kernels / "memory.high").read_text() == str(high)


def test_no_guard_where_nothing_above_limits_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_box, "CGROUP_ROOT", tmp_path)
    cgroups = cgroup_tree(tmp_path, "max", 200 << 20)
    assert cgroups.set_memory_guard() is None
    assert not (cgroups.kernels / "memory.high").exists()


def test_memory_runs_short_only_when_the_boxes_pass_their_high_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_box, "CGROUP_ROOT", tmp_path)
    cgroups = cgroup_tree(tmp_path, str(1024 << 20), 200 << 20)
    events, used = cgroups.kernels / "memory.events", cgroups.kernels / "memory.current"
    events.write_text("low 0\nhigh 3\nmax 0\noom 0\noom_kill 0\n")
    high = cgroups.set_memory_guard()  # what happened before the guard was set is not news
    assert high is not None
    used.write_text(f"{high}\n")
    assert not cgroups.memory_ran_short()
    events.write_text("low 0\nhigh 5\nmax 0\noom 0\noom_kill 0\n")
    assert cgroups.memory_ran_short()
    assert not cgroups.memory_ran_short()
    # Throttled a moment ago, but the box behind it has died and given its memory back: nothing is short now.
    events.write_text("low 0\nhigh 9\nmax 0\noom 0\noom_kill 0\n")
    used.write_text(f"{high // 2}\n")
    assert not cgroups.memory_ran_short()


def test_the_largest_box_is_the_one_holding_the_most_memory(tmp_path: Path) -> None:
    boxes = []
    for name, used in (("idle", 30 << 20), ("hog", 700 << 20), ("bomb", 120 << 20)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "memory.current").write_text(f"{used}\n")
        boxes.append(tmp_path / name)
    assert KernelCgroups.largest(boxes) == tmp_path / "hog"
    assert KernelCgroups.largest([tmp_path / "gone"]) == tmp_path / "gone"
    assert KernelCgroups.largest([]) is None


def test_cgroup_events_wake_on_a_change_of_a_watched_file(tmp_path: Path) -> None:
    watched, other = tmp_path / "cgroup.events", tmp_path / "other"
    watched.write_text("populated 1\n")
    other.write_text("")
    events = kernel_box.CgroupEvents()
    try:
        assert events.watch(watched)
        assert not events.watch(tmp_path / "gone" / "cgroup.events")
        assert events.drain() == 0
        other.write_text("changed\n")
        assert events.drain() == 0, "an unwatched file woke the provider"
        watched.write_text("populated 0\n")
        assert events.drain() > 0
        assert events.drain() == 0, "one change is read once"
    finally:
        events.close()
