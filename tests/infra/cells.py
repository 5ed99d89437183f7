"""A client for the cell server on a cell: requests go to the server on the cell's loopback (python3 on the cell
posts them), exactly as nginx and the load balancer reach it."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import pytest

from conftest import main_pid
from labkit import units
from labkit.sending import SCRIPTS, script_command
from labkit.waiting import until, until_gone

if TYPE_CHECKING:
    from testinfra.host import Host

    from conftest import Node


def cell_server_python(host: Host) -> str:
    """The python of the cell server's venv, read from its unit: it has tornado, the system python3 has not."""
    start = host.check_output(f"systemctl show -p ExecStart --value {units.CELL_SERVER}")
    return str(PurePosixPath(start.split("path=", 1)[1].split()[0]).parent / "python3")


HEALTH_CHECK_UNITS = (units.CELL_HEALTH_TIMER, units.CELL_HEALTH)


def stop_health_checks(host: Host) -> None:
    """Stop the health timer and a check it already started. A running check outlives its timer, and after its
    failed tries it restarts the server, whose kernel provider resets the workers when it starts."""
    host.run_test(f"systemctl stop {' '.join(HEALTH_CHECK_UNITS)}")


def start_health_checks(host: Host) -> None:
    host.run(f"systemctl start {HEALTH_CHECK_UNITS[0]}")


@dataclass(frozen=True)
class Cell:
    node: Node
    port: int
    uids: dict[int, str]  # worker uid -> name
    context: str

    @property
    def host(self) -> Host:
        return self.node.host

    def compute(self, code: str) -> dict:
        [answer] = self.compute_many(code, 1)
        return answer

    def compute_many(self, code: str, count: int, retry_busy_seconds: float = 0, patience: float = 120) -> list[dict]:
        """count computations of code at once, from threads of one process on the cell; each one refused as
        busy (503) is sent again, as a client honouring Retry-After would, for up to retry_busy_seconds. Each
        answer is waited for up to patience seconds."""
        return json.loads(self.host.check_output(self._post_command(code, count, retry_busy_seconds, patience)))

    def serves(self) -> bool:
        """Whether the cell server answers a computation now (a refused connection or a busy cell is a no)."""
        posted = self.host.run(self._post_command("1"))
        return posted.rc == 0 and json.loads(posted.stdout)[0]["status"] == 200

    def _post_command(self, code: str, count: int = 1, retry_busy_seconds: float = 0, patience: float = 120) -> str:
        """post_service.py on the cell, posting code to this cell's server (see compute_many)."""
        options = ("--count", str(count), "--retry-busy", str(retry_busy_seconds), "--patience", str(patience))
        return script_command(SCRIPTS / "post_service.py", *options, "--", str(self.port), code)

    def stdout(self, code: str) -> str:
        answer = self.compute(code)
        assert answer["status"] == 200, answer
        return answer["body"]["stdout"]

    def find_in_kernels_view(self, roots: str, tests: str) -> str:
        """What find prints for tests under roots, seen from the kernel provider's mount namespace (the
        kernels' private /tmp, /var/tmp, /dev). A worker's reset may remove entries while find walks past
        them: an entry gone by the time find reads it is no error."""
        provider = main_pid(self.host, units.KERNEL_PROVIDER)
        command = f"find {roots} -xdev -ignore_readdir_race {tests}"
        found = self.host.run(f"nsenter -t {provider} -m sh -c {shlex.quote(command)}")
        errors = [line for line in found.stderr.splitlines() if not line.endswith("No such file or directory")]
        assert found.rc == 0 or (found.rc == 1 and not errors), found
        return found.stdout

    def a_kernel_sees(self, path: str) -> bool:
        """Whether some process of a worker has path in its own view of the filesystem (a box's private /tmp or
        home exist only in the mount namespace of that box's processes)."""
        uids = ",".join(str(uid) for uid in self.uids)
        look = f"for pid in $(pgrep -u {uids}); do test -e /proc/$pid/root{shlex.quote(path)} && exit 0; done; exit 1"
        return self.host.run(look).rc == 0

    def reserve_kernels(self) -> set[str]:
        """The pids of the kernels the provider runs as workers (with nobody computing: the reserve)."""
        provider = main_pid(self.host, units.KERNEL_PROVIDER)
        children = [line.split() for line in self.host.run(f"ps -o pid=,uid= --ppid {provider}").stdout.splitlines()]
        return {pid for pid, uid in children if int(uid) in self.uids}

    def wait_for_full_reserve(self, patience: float = 120) -> set[str]:
        """Wait until the provider holds its whole reserve of ready kernels (cell_server_preforked); their pids."""
        wanted = int(self.node.setting("cell_server_preforked"))

        def full_reserve() -> set[str]:
            kernels = self.reserve_kernels()
            return kernels if len(kernels) >= wanted else set()

        kernels = until(full_reserve, patience, interval=1)
        assert kernels, f"the reserve holds {len(self.reserve_kernels())} of {wanted} kernels after {patience} s"
        return kernels

    def wait_until_idle(self) -> None:
        """No worker still being reset from an earlier computation, so every slot can take one."""
        # A reset's command line names its worker after the tool; the provider's (and its kernels') name the
        # tool as an option's value, followed by the next option. The bracket keeps pgrep's own shell out.
        resetting = until_gone(lambda: self.host.run("pgrep -af '[c]ellfleet-worker-reset [^-]'").stdout, 60)
        assert not resetting, f"{self.node.name}: workers still being reset after 60 s:\n{resetting}"


def first_cell(nodes: dict[str, Node]) -> Cell:
    """The first host of the cells group, its services started and answering a computation."""
    cells = [node for node in nodes.values() if "cells" in node.groups]
    if not cells:
        pytest.skip("no host in the cells group")
    node = cells[0]
    pool = json.loads(node.host.file("/etc/cellfleet/worker-pool.json").content_string)
    port = int(node.setting("cell_server_port"))
    found = Cell(node, port, {entry["uid"]: name for name, entry in pool["workers"].items()}, pool["selinux_context"])
    # Another suite may have reset every worker (killing the reserve) or restarted the services.
    node.host.run(f"systemctl start {units.KERNEL_PROVIDER} {units.CELL_SERVER}")
    assert until(found.serves, 120, interval=2), f"{node.name}: the cell server answered no computation in 120 s"
    return found
