"""The WireGuard mesh: every node talks to every other over it, keys never leave their node, and the
database, log and backend ports answer over the mesh only."""

from __future__ import annotations

import itertools
import shlex
import shutil
import subprocess
import time

import pytest

from conftest import CONNECT_TIMEOUT_SECONDS, CONNECTED, Node, tcp_connect_many

POSTGRESQL_PORT = 5432  # PostgreSQL's own, which the role does not change
LAB_NETNS = "cellfleet"


def interface(node: Node) -> str:
    return str(node.setting("private_network_interface"))


def key_path(node: Node) -> str:
    return f"{node.setting('private_network_config_dir')}/{interface(node)}.key"


def wg(node: Node, subcommand: str) -> str:
    """What `wg show <the mesh interface> subcommand` prints on node."""
    return node.host.check_output(f"wg show {interface(node)} {subcommand}")


def data_hosts(nodes: dict[str, Node]) -> list[Node]:
    found = [node for node in nodes.values() if {"permalink_db", "log_servers"} & node.groups]
    if not found:
        pytest.skip("no permalink_db or log_servers host in the inventory")
    return found


def test_every_node_has_completed_a_handshake_with_every_peer(
    nodes: dict[str, Node], mesh_addresses: dict[str, str]
) -> None:
    for source, target in itertools.permutations(nodes.values(), 2):
        # Traffic to each peer first: a handshake is made on demand.
        tcp_connect_many(source.host, [(mesh_addresses[target.name], 22)])
    for node in nodes.values():
        deadline = time.monotonic() + 30
        while True:
            handshakes = wg(node, "latest-handshakes").splitlines()
            stamps = [int(line.split()[1]) for line in handshakes]
            if len(stamps) == len(nodes) - 1 and all(stamps):
                break
            assert time.monotonic() < deadline, f"{node.name}: peers without a handshake: {handshakes}"
            time.sleep(2)


def test_private_keys_stay_on_their_node(nodes: dict[str, Node]) -> None:
    public_keys = {}
    for node in nodes.values():
        key_file = node.host.file(key_path(node))
        assert (key_file.user, key_file.group, key_file.mode) == ("root", "root", 0o600), node.name
        private_key = key_file.content_string.strip()
        assert wg(node, "private-key") == private_key, node.name
        public_keys[node.name] = wg(node, "public-key")
        for other in nodes.values():
            if other is not node:
                places = f"{other.setting('private_network_config_dir')} /etc /root /tmp"
                leaked = other.host.run(f"grep -rlF -e {shlex.quote(private_key)} {places}")
                assert leaked.stdout == "", f"{node.name}'s private key found on {other.name}: {leaked.stdout}"
    for node in nodes.values():
        peers = set(wg(node, "peers").split())
        assert peers == {key for name, key in public_keys.items() if name != node.name}, node.name


def lab_bridge_reachable() -> bool:
    """Whether this runner can enter the lab's namespace (root on the lab's own machine)."""
    if not shutil.which("ip"):
        return False
    return subprocess.run(["ip", "netns", "pids", LAB_NETNS], capture_output=True, check=False).returncode == 0


def probe_from_lab_bridge(address: str, port: int) -> int:
    """Connect from the lab bridge (outside the mesh, inside the lab's namespace), as tcp_connect_many does."""
    probe = f"exec 3<>/dev/tcp/{address}/{port}"
    command = ["ip", "netns", "exec", LAB_NETNS, "timeout", str(CONNECT_TIMEOUT_SECONDS), "bash", "-c", probe]
    return subprocess.run(command, capture_output=True, check=False).returncode


def test_database_and_log_ports_answer_over_the_mesh_only(
    nodes: dict[str, Node], mesh_addresses: dict[str, str]
) -> None:
    for data in data_hosts(nodes):
        relp_port = int(data.setting("rsyslog_relp_port"))
        services = (("permalink_db", int(data.setting("cellfleet_permalink_port"))), ("log_servers", relp_port))
        ports = [port for group, port in services if group in data.groups]
        for port in ports:
            assert data.host.socket(f"tcp://0.0.0.0:{port}").is_listening, f"nothing listens on {data.name}:{port}"
        for source in nodes.values():
            if source is data:
                continue
            outer = tcp_connect_many(source.host, [(data.address, port) for port in [*ports, POSTGRESQL_PORT]])
            for (_address, port), status in outer.items():
                assert status != CONNECTED, f"{source.name} reached {data.name}:{port} outside the mesh"
            inner = tcp_connect_many(source.host, [(mesh_addresses[data.name], port) for port in ports])
            for (_address, port), status in inner.items():
                allowed = port == relp_port or {"cells", "loadbalancers"} & source.groups
                assert (status == CONNECTED) == bool(allowed), f"{source.name} -> {data.name}:{port} over the mesh"
            database = tcp_connect_many(source.host, [(mesh_addresses[data.name], POSTGRESQL_PORT)])
            assert CONNECTED not in database.values(), f"{source.name} reached PostgreSQL on {data.name}"
        if lab_bridge_reachable():
            for port in ports:
                assert probe_from_lab_bridge(data.address, port) != 0, f"the lab bridge reached {data.name}:{port}"


def test_a_reload_keeps_the_tunnels_and_the_key(nodes: dict[str, Node], mesh_addresses: dict[str, str]) -> None:
    node, peer = sorted(nodes.values(), key=lambda n: n.name)[:2]
    private_key = node.host.file(key_path(node)).content_string.strip()
    node.host.run_test(f"systemctl reload wg-quick@{interface(node)}")
    assert wg(node, "private-key") == private_key
    assert node.host.service(f"wg-quick@{interface(node)}").is_running
    target = (mesh_addresses[peer.name], 22)
    assert tcp_connect_many(node.host, [target]) == {target: CONNECTED}
