"""Servers coming and going on the running lab under a steady load through the load balancer: a snapshot of a
serving cell, a new cell cloned from it and added, the same cell removed again, and a cell VM lost abruptly.

Runs with `make cluster-test` after `make up` (root, on the lab's machine); minutes each under emulation.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labkit import lab
from labkit.lab import (
    CELLS,
    LOAD_BALANCER,
    NEW_CELL,
    NEW_CELL_ADDRESS,
    ROOT,
    StatusWatch,
    playbook,
    server_state,
    server_stats,
    ssh,
    virsh,
)
from labkit.load import SteadyLoad, in_lab_namespace_possible
from labkit.waiting import until

pytestmark = pytest.mark.skipif(not in_lab_namespace_possible(), reason="needs root and the lab (make up)")

SNAPSHOTS = Path("/var/cache/cellfleet/snapshots")
URL = f"https://{LOAD_BALANCER}/service"


@pytest.fixture
def snapshot() -> Iterator[str]:
    """A snapshot of cell1, taken while it serves; removed afterwards."""
    name = f"cftest-cell1-{int(time.time())}"
    result = playbook("snapshot.yml", "-e", "snapshot_source=cell1", "-e", f"snapshot_name={name}")
    assert result.returncode == 0, result.stdout[-3000:]
    yield name
    subprocess.run(["rm", "-rf", str(SNAPSHOTS / name)], check=True)


@pytest.fixture
def inventory_with_new_cell(tmp_path: Path) -> Path:
    return lab.inventory_with_new_cell(tmp_path)


def failures(load: SteadyLoad) -> dict[str, int]:
    return {outcome: count for outcome, count in load.outcomes().items() if outcome != "200"}


def test_snapshot_of_a_serving_cell_drops_nothing_and_its_clone_has_its_own_identity(
    snapshot: str, inventory_with_new_cell: Path
) -> None:
    """Snapshot taken (fixture) before the load; then cell3 from it, added and removed under load."""
    inventories = (ROOT / "inventory" / "lab" / "hosts.yml", inventory_with_new_cell)
    assert server_stats(NEW_CELL) is None, "cell3 is already in the load balancer"
    try:
        with SteadyLoad(URL) as load:
            load.wait_for_answers(2)
            started = time.monotonic()
            added = playbook(
                "add-server.yml", "-e", f"name={NEW_CELL}", "-e", f"add_server_from={snapshot}", inventories=inventories
            )
            took = time.monotonic() - started
            assert added.returncode == 0, added.stdout[-4000:]
            # Up when add-server returns; an emulated fresh clone may still miss a 10 s check now and then.
            assert until(lambda: server_state(NEW_CELL) == "UP", 180, interval=2), (
                f"{NEW_CELL} not UP in the load balancer 3 min after add-server"
            )
            # Cloned from cell1's disk, it kept none of cell1's identity.
            identity = (
                f"cat /etc/machine-id {lab.MESH_CONFIG_DIR}/{lab.MESH_INTERFACE}.pub /etc/ssh/ssh_host_ed25519_key.pub"
            )
            source, clone = (ssh(address, identity).split("\n") for address in (CELLS["cell1"], NEW_CELL_ADDRESS))
            assert all(mine != theirs for mine, theirs in zip(source[:3], clone[:3], strict=True)), (source, clone)
            assert len(ssh(CELLS["cell1"], f"wg show {lab.MESH_INTERFACE} latest-handshakes").splitlines()) == 4
            # leastconn sends the new cell its share once it is up.
            until(lambda: int(server_stats(NEW_CELL)["stot"]) > 0, 120, interval=2)
            served_by_new = int(server_stats(NEW_CELL)["stot"])
            added_outcomes = dict(load.outcomes())
            started = time.monotonic()
            removed = playbook("remove-server.yml", "-e", f"name={NEW_CELL}")
            took_removal = time.monotonic() - started
            load.wait_for_answers(2, since=started + took_removal)
        print(f"add-server from {snapshot} in {took:.0f} s; cell3 served {served_by_new} requests; remove-server"
              f" in {took_removal:.0f} s; load: {added_outcomes} then {dict(load.outcomes())}")  # fmt: skip
        assert removed.returncode == 0, removed.stdout[-4000:]
        assert served_by_new > 0, "cell3 was added but took no request"
        assert failures(load) == {}, (load.outcomes(), load.wrong_answers())
        assert server_stats(NEW_CELL) is None, "cell3 is still in the running load balancer"
        assert NEW_CELL not in virsh("list", "--all", "--name").split()
        assert f"server {NEW_CELL} " not in ssh(LOAD_BALANCER, "cat /etc/haproxy/haproxy.cfg")
    finally:
        if NEW_CELL in virsh("list", "--all", "--name").split():
            playbook("remove-server.yml", "-e", f"name={NEW_CELL}")


def test_a_cell_vm_lost_abruptly_is_out_of_rotation_in_seconds() -> None:
    victim = "cell2"
    watch = StatusWatch(victim)
    try:
        with SteadyLoad(URL) as load:
            load.wait_for_answers(4)
            assert watch.samples and watch.samples[-1][1] == "UP", watch.samples[-3:]
            destroyed = time.monotonic()
            virsh("destroy", victim)
            out = until(lambda: watch.out_of_rotation_since(destroyed), 60, interval=0.2)
            assert out is not None, f"{victim} still UP a minute after its VM was destroyed"
            load.wait_for_answers(8, since=out)
        before = [s for s in load.samples if s.started < out]
        after = [s for s in load.samples if s.started >= out]
        failed_before = [s.outcome for s in before if s.outcome != "200"]
        failed_after = [s.outcome for s in after if s.outcome != "200"]
        slowest_before = max((s.seconds for s in before if s.started + s.seconds > destroyed), default=0.0)
        print(f"{victim} destroyed: out of rotation after {out - destroyed:.1f} s; requests sent before that: "
              f"{len(before)}, failed {failed_before}, slowest in flight {slowest_before:.1f} s; "
              f"after: {len(after)}, failed {failed_after}")  # fmt: skip
        assert out - destroyed <= 5, f"{out - destroyed:.1f} s to take a lost cell out of rotation"
        assert failed_after == [], failed_after
        assert len(after) > 5
    finally:
        watch.stop()
        # Back as it was: the same VM boots from its own disk and HAProxy's checks bring it back.
        if virsh("domstate", victim).strip() != "running":
            virsh("start", victim)
        assert until(lambda: server_state(victim) == "UP", 600, interval=5), (
            f"{victim} not back UP 10 min after its restart"
        )
