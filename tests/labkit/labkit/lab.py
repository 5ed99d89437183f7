"""The running lab as the cluster tests and the lab benchmarks see it: SSH to its VMs, the load balancer's
runtime API, playbooks."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from labkit.network import interface_address, interface_address_command
from labkit.roles import default
from labkit.waiting import until

ROOT = Path(__file__).resolve().parents[3]
INVENTORY = ROOT / "inventory" / "lab" / "hosts.yml"
SSH_KEY = "/var/lib/cellfleet/lab/ssh/id_ed25519"


def group_addresses(group: str, inventory: Path = INVENTORY) -> dict[str, str]:
    """Each host of an inventory group, by name, and the address Ansible reaches it at."""
    hosts = yaml.safe_load(inventory.read_text())["all"]["children"][group]["hosts"]
    return {name: settings["ansible_host"] for name, settings in hosts.items()}


def group_variables(group: str, inventory: Path = INVENTORY) -> dict[str, Any]:
    """What the inventory sets for a group's hosts: group_vars/all, then the group's own files over it."""
    found: dict[str, Any] = {}
    for directory in ("all", group):
        for path in sorted((inventory.parent / "group_vars" / directory).glob("*.yml")):
            found.update(yaml.safe_load(path.read_text()) or {})
    return found


def inventory_setting(group: str, name: str) -> Any:
    """A variable's value for a group's hosts: the inventory's, else the role's documented default."""
    return default(name, group_variables(group))


[LOAD_BALANCER] = group_addresses("loadbalancers").values()
CELLS = group_addresses("cells")
[DATA_HOST] = group_addresses("permalink_db").values()
LIBVIRT = "qemu:///system"
EXEMPT_LIST = "/etc/haproxy/rate-limit-exempt.lst"
NEW_CELL, NEW_CELL_ADDRESS = "cell3", "10.77.0.15"
MESH_INTERFACE = inventory_setting("all", "private_network_interface")
MESH_CONFIG_DIR = inventory_setting("all", "private_network_config_dir")
PERMALINK_PORT = int(inventory_setting("permalink_db", "cellfleet_permalink_port"))
ADMIN_SOCKET = inventory_setting("loadbalancers", "haproxy_admin_socket")
CELLS_BACKEND = inventory_setting("loadbalancers", "haproxy_cells_backend")


def ssh_command(address: str, command: str, *arguments: str) -> list[str]:
    """The argv that runs command (with arguments) as root on the lab VM at address, through the lab namespace."""
    return [
        "ssh", "-q", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=20", "-o", "ProxyCommand=ip netns exec cellfleet nc %h %p", "-i", SSH_KEY,
        f"root@{address}", command, *arguments,
    ]  # fmt: skip


def ssh(address: str, command: str, *arguments: str, check: bool = True, timeout: float = 1800) -> str:
    """Standard output of command (with arguments) run as root on the lab VM at address."""
    return subprocess.run(ssh_command(address, command, *arguments), check=check, capture_output=True, text=True,
                          timeout=timeout).stdout  # fmt: skip


def mesh_address(address: str) -> str:
    """The WireGuard mesh address of the lab VM at address, read from its interface."""
    found = interface_address(ssh(address, interface_address_command(MESH_INTERFACE)))
    assert found, f"{address} has no address on {MESH_INTERFACE}"
    return found


def admin(command: str, load_balancer: str = LOAD_BALANCER) -> str:
    """One command on the load balancer's HAProxy runtime API, its answer."""
    return ssh(load_balancer, f"echo {shlex.quote(command)} | socat stdio unix-connect:{ADMIN_SOCKET}")


@contextmanager
def out_of_rotation(server: str) -> Iterator[None]:
    """The cell in maintenance in the load balancer while the block runs: no requests and no health checks reach
    it, so a measurement on the cell sees only its own load."""
    admin(f"set server {CELLS_BACKEND}/{server} state maint")
    try:
        yield
    finally:
        admin(f"set server {CELLS_BACKEND}/{server} state ready")


# The stick tables HAProxy counts requests in for its rate limits (roles/haproxy's configuration).
RATE_TABLES = ("rate_compute_per_ip", "rate_compute_total", "rate_permalink_per_ip", "rate_permalink_total")


def forget_request_rates(load_balancer: str = LOAD_BALANCER) -> None:
    """Start from no counted requests: the limits count the last 10 s, and what ran before sent many."""
    for table in RATE_TABLES:
        admin(f"clear table {table}", load_balancer)
    for table in RATE_TABLES:
        listed = admin(f"show table {table}", load_balancer)
        assert "used:0" in listed, listed


def server_stats(server: str, backend: str = CELLS_BACKEND) -> dict[str, str] | None:
    """One server's row of the runtime API's CSV statistics, by column name; None when it has no such server.

    Raises ConnectionError when the runtime API gives no answer (HAProxy down or restarting): that says
    nothing about the server."""
    lines = admin("show stat").splitlines()
    if not lines:
        raise ConnectionError("the load balancer's runtime API gave no answer to 'show stat'")
    columns = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        fields = line.split(",")
        if fields[:2] == [backend, server]:
            return dict(zip(columns, fields, strict=False))
    return None


def server_state(server: str) -> str:
    stats = server_stats(server)
    assert stats is not None, f"{CELLS_BACKEND}/{server} not in the load balancer's stats"
    return stats["status"]


def playbook(name: str, *extra: str, inventories: tuple[Path, ...] = (INVENTORY,)) -> subprocess.CompletedProcess[str]:
    """ansible-playbook against the lab with the Makefile's settings; the output is kept for the report."""
    binary = Path(sys.executable).with_name("ansible-playbook")
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "false"}
    sources = [argument for inventory in inventories for argument in ("-i", str(inventory))]
    command = [str(binary), *sources, str(ROOT / "playbooks" / name), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600, check=False)


def virsh(*arguments: str) -> str:
    return subprocess.run(["virsh", "-c", LIBVIRT, *arguments], check=True, capture_output=True, text=True).stdout


@contextmanager
def rate_limits_exempted(source: str, load_balancer: str = LOAD_BALANCER) -> Iterator[None]:
    """The lab's rate limits are small; a load from source must not meet them (this machine, the lab bridge, is
    exempt in the lab's inventory already). Runtime only: the next reload forgets it."""
    admin(f"add acl {EXEMPT_LIST} {source}", load_balancer)
    try:
        yield
    finally:
        admin(f"del acl {EXEMPT_LIST} {source}", load_balancer)


def installed_release(address: str) -> str:
    return ssh(address, "/opt/cellserver/venv/bin/cellserver --version").split()[-1]


def release_of_app(target: Path, version: str, broken: bool = False) -> Path:
    """A copy of app/ that installs as `version`; a broken one cannot start its server."""
    shutil.copytree(ROOT / "app", target, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    package = target / "src" / "cellserver" / "__init__.py"
    package.write_text(package.read_text().replace('__version__ = "0.1.0"', f'__version__ = "{version}"', 1))
    if broken:
        with (target / "src" / "cellserver" / "service.py").open("a") as module:
            module.write('\nraise RuntimeError("a release that cannot serve, made by the rolling-update test")\n')
    return target


def wheelhouse_for(source: Path) -> Path:
    """A release of its own builds into a wheelhouse of its own, beside its sources: the lab's stays as it is."""
    return ROOT / ".cache" / "wheelhouse" if source == ROOT / "app" else source.parent / "wheelhouse"


def inventory_with_new_cell(directory: Path) -> Path:
    """The operator's first step: the new cell declared in the inventory (a second source beside the lab's)."""
    extra = directory / "new-cell.yml"
    extra.write_text(f"all:\n  children:\n    cells:\n      hosts:\n        {NEW_CELL}:\n"
                     f"          ansible_host: {NEW_CELL_ADDRESS}\n")  # fmt: skip
    return extra


class StatusWatch:
    """Streams one server's status from the load balancer (every 0.1 s), stamped with this machine's clock."""

    def __init__(self, server: str, limit_seconds: int = 3600) -> None:
        # The loop must end with its reader: SSH leaves a remote command running when the client goes, and a
        # forgotten loop (one per watch) starves the load balancer's single CPU. awk dies writing to the closed
        # pipe, which ends the loop; `timeout` bounds it whatever happens.
        loop = (
            f"while echo 'show stat' | socat stdio unix-connect:{ADMIN_SOCKET}"
            f' | awk -F, \'$1=="{CELLS_BACKEND}" && $2=="{server}" {{print $18; fflush()}}\'; do sleep 0.1; done'
        )
        script = f"timeout {limit_seconds} sh -c {shlex.quote(loop)}"
        self.process = subprocess.Popen(ssh_command(LOAD_BALANCER, script), stdout=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.samples.append((time.monotonic(), line.strip()))

    def out_of_rotation_since(self, since: float) -> float | None:
        """When the server was first seen in any state but UP (DOWN, going down, drained...) at or after since."""
        samples = list(self.samples)  # the reader thread appends meanwhile
        return next((stamp for stamp, status in samples if stamp >= since and not status.startswith("UP")), None)

    def wait_streaming(self, limit: float = 30) -> None:
        """Returns once a status has arrived: a fault timed before that would be timed by the SSH connect."""
        if not until(lambda: self.samples, limit, interval=0.2):
            raise TimeoutError(f"no status from the load balancer within {limit:.0f} s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
