"""Shared fixtures for the testinfra suites: the inventory, each host's peers, throwaway TCP listeners."""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
import testinfra
from testinfra.host import Host
from testinfra.utils.ansible_runner import AnsibleRunner

from labkit import roles
from labkit.network import interface_address, interface_address_command

if TYPE_CHECKING:
    from cells import Cell

# Ports the probe listeners take: two that groups open, one that no group opens.
PROBE_PORTS = (80, 443, 8099)
CONNECT_TIMEOUT_SECONDS = 4


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    groups: frozenset[str]
    host: Host
    # The host's inventory variables as testinfra reads them (untemplated).
    variables: dict[str, Any] = field(compare=False, hash=False)

    def setting(self, name: str) -> Any:
        """A role variable as the converge saw it on this host: the inventory's value, else the role's default
        (where the default names another variable, that one's value)."""
        return roles.default(name, self.variables)


@pytest.fixture(scope="session")
def inventory_path(request: pytest.FixtureRequest) -> str:
    path = request.config.option.ansible_inventory
    if not path:
        pytest.fail("run with --ansible-inventory (molecule and `make verify` pass it)")
    return str(path)


@pytest.fixture(scope="session")
def nodes(inventory_path: str) -> dict[str, Node]:
    runner = AnsibleRunner(inventory_path)
    result: dict[str, Node] = {}
    for name in runner.get_hosts("all"):
        variables = runner.get_variables(name)
        result[name] = Node(
            name=name,
            address=variables["ansible_host"],
            groups=frozenset(variables.get("group_names", [])),
            host=testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory_path}"),
            variables=variables,
        )
    return result


def main_pid(host: Host, unit: str) -> int:
    """The unit's main process id on host (0 when it has none)."""
    return int(host.check_output(f"systemctl show -p MainPID --value {unit}"))


def seconds_until_back(node: Node, unit: str, old_pid: int, limit: float) -> float:
    """Seconds until unit runs again under a main process other than old_pid; fails after limit."""
    started = time.monotonic()
    while True:
        pid = main_pid(node.host, unit)
        if pid not in (0, old_pid) and node.host.service(unit).is_running:
            return time.monotonic() - started
        assert time.monotonic() - started < limit, f"{unit} not back within {limit:.0f} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cell(nodes: dict[str, Node]) -> Cell:
    from cells import first_cell  # cells.py imports this module: imported here, once both are loaded

    return first_cell(nodes)


# Exit statuses of a TCP connect probe.
CONNECTED, REFUSED, DROPPED = 0, 1, 124


def tcp_connect_many(source: Host, targets: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Connect from source to every (address, port) at once; a dropped port costs its whole timeout."""
    probes = []
    for address, port in targets:
        probe = shlex.quote(f"exec 3<>/dev/tcp/{address}/{port}")
        probes.append(f'(timeout {CONNECT_TIMEOUT_SECONDS} bash -c {probe} 2>/dev/null; echo "{address} {port} $?") &')
    output = source.check_output(" ".join(probes) + " wait")
    results: dict[tuple[str, int], int] = {}
    for line in output.splitlines():
        address, port, status = line.split()
        results[(address, int(port))] = int(status)
    assert len(results) == len(targets), output
    return results


def start_listener(host: Host, port: int) -> str | None:
    """A transient unit accepting TCP on port, unless something already listens there."""
    if host.socket(f"tcp://0.0.0.0:{port}").is_listening:
        return None
    unit = f"cf-probe-{port}"
    host.run(f"systemctl stop {unit} 2>/dev/null; systemctl reset-failed {unit} 2>/dev/null")
    host.run_test(f"systemd-run --unit={unit} python3 -m http.server {port} --bind 0.0.0.0")
    return unit


@pytest.fixture(scope="session")
def listeners(nodes: dict[str, Node]) -> Iterator[None]:
    """Every probe port is listening on every node for the whole session, so a failed connect is the firewall."""
    started: list[tuple[Host, str]] = []
    for node in nodes.values():
        for port in PROBE_PORTS:
            unit = start_listener(node.host, port)
            if unit:
                started.append((node.host, unit))
    for node in nodes.values():
        for port in PROBE_PORTS:
            waited = node.host.run(
                f"for i in $(seq 50); do ss -Hltn 'sport = :{port}' | grep -q . && exit 0; sleep 0.2; done; exit 1"
            )
            assert waited.rc == 0, f"nothing listens on {node.name}:{port}"
    yield
    for host, unit in started:
        host.run(f"systemctl stop {unit}")


@pytest.fixture(scope="session")
def reachability(nodes: dict[str, Node], listeners: None) -> dict[tuple[str, str, int], int]:
    """Probe status of (source, target, port) for every ordered pair of nodes and every probe port."""
    matrix: dict[tuple[str, str, int], int] = {}
    for source in nodes.values():
        targets = [(t.address, port) for t in nodes.values() if t is not source for port in (22, *PROBE_PORTS)]
        statuses = tcp_connect_many(source.host, targets)
        for target in nodes.values():
            if target is not source:
                for port in (22, *PROBE_PORTS):
                    matrix[(source.name, target.name, port)] = statuses[(target.address, port)]
    return matrix


def mesh_address(node: Node) -> str | None:
    """The node's address on the WireGuard mesh, read from the interface itself; None off the mesh."""
    result = node.host.run(interface_address_command(node.setting("private_network_interface")))
    return interface_address(result.stdout) if result.rc == 0 else None


@pytest.fixture(scope="session")
def mesh_addresses(nodes: dict[str, Node]) -> dict[str, str]:
    """Mesh address of every node; the suites that need the mesh skip when a node is not on it."""
    addresses = {name: mesh_address(node) for name, node in nodes.items()}
    missing = sorted(name for name, address in addresses.items() if address is None)
    if missing:
        pytest.skip(f"not on the WireGuard mesh: {', '.join(missing)}")
    return {name: address for name, address in addresses.items() if address}


@pytest.fixture(scope="session")
def mesh_reachability(
    nodes: dict[str, Node], mesh_addresses: dict[str, str], listeners: None
) -> dict[tuple[str, str, int], int]:
    """Probe status of (source, target, port) for every ordered pair of nodes, over the mesh."""
    matrix: dict[tuple[str, str, int], int] = {}
    for source in nodes.values():
        targets = [(mesh_addresses[t.name], port) for t in nodes.values() if t is not source for port in PROBE_PORTS]
        statuses = tcp_connect_many(source.host, targets)
        for target in nodes.values():
            if target is not source:
                for port in PROBE_PORTS:
                    matrix[(source.name, target.name, port)] = statuses[(mesh_addresses[target.name], port)]
    return matrix


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "load: saturates a cell or the cluster, or takes a host down under traffic; `make verify-load` runs these "
        "against the lab, `make test` leaves them out",
    )
