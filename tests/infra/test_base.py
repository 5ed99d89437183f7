"""The base role's promises, checked on real VMs by what they do, not by what their config files say."""

from __future__ import annotations

import itertools

from testinfra.host import Host

from conftest import CONNECTED, DROPPED, Node

Reachability = dict[tuple[str, str, int], int]
SSH_OPTIONS = (
    "-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 "
    "-o LogLevel=ERROR"
)


def peer_pairs(nodes: dict[str, Node]) -> list[tuple[Node, Node]]:
    return list(itertools.permutations(nodes.values(), 2))


def test_every_node_has_a_distinct_identity(nodes: dict[str, Node]) -> None:
    hostnames, machine_ids, macs = set(), set(), set()
    for node in nodes.values():
        hostname = node.host.check_output("hostname")
        assert hostname == node.name
        assert node.host.file("/etc/hostname").content_string.strip() == node.name
        hostnames.add(hostname)
        machine_ids.add(node.host.file("/etc/machine-id").content_string.strip())
        interface = node.host.check_output("ip -o -4 addr show | awk '$4 ~ /^%s\\// {print $2}'", node.address)
        macs.add(node.host.file(f"/sys/class/net/{interface}/address").content_string.strip())
    assert len(hostnames) == len(machine_ids) == len(macs) == len(nodes)


def test_nodes_reach_each_other_over_ssh_port(nodes: dict[str, Node], reachability: Reachability) -> None:
    for source, target in peer_pairs(nodes):
        assert reachability[(source.name, target.name, 22)] == CONNECTED, f"{source.name} -> {target.name}:22"


def test_lab_vms_have_no_default_route(nodes: dict[str, Node]) -> None:
    # Only the routing table is read: no packet leaves for any outside address.
    for node in nodes.values():
        assert node.host.check_output("ip route show default") == "", f"{node.name} has a route out"


def test_port_no_group_opens_is_dropped_not_refused(nodes: dict[str, Node], reachability: Reachability) -> None:
    for source, target in peer_pairs(nodes):
        # Something listens there (the probe listener answers locally), yet peers time out: the firewall
        # drops instead of refusing, so a scanner learns nothing.
        assert target.host.run("exec 3<>/dev/tcp/127.0.0.1/8099").rc == 0
        assert reachability[(source.name, target.name, 8099)] == DROPPED, f"{source.name} -> {target.name}:8099"


def test_group_ports_are_open_only_to_their_sources(nodes: dict[str, Node], reachability: Reachability) -> None:
    checked = 0
    for source, target in peer_pairs(nodes):
        if "loadbalancers" in target.groups:
            assert reachability[(source.name, target.name, 443)] == CONNECTED, f"{source.name} -> {target.name}:443"
            checked += 1
        else:
            assert reachability[(source.name, target.name, 443)] == DROPPED, f"{source.name} -> {target.name}:443"
        if "cells" in target.groups:
            # Backend traffic comes over the mesh only (see test_private_network.py), never the outer address.
            assert reachability[(source.name, target.name, 80)] == DROPPED, f"{source.name} -> {target.name}:80"
            checked += 1
    assert checked > 0, "the inventory has no load balancer or cell to test group ports with"


def test_backend_port_is_open_over_the_mesh_to_load_balancers_and_peer_cells_only(
    nodes: dict[str, Node], mesh_reachability: Reachability
) -> None:
    checked = 0
    for source, target in peer_pairs(nodes):
        if "cells" in target.groups:
            # The load balancers' backend traffic, and the peer cells' health checks (see the nginx role).
            expected = CONNECTED if {"loadbalancers", "cells"} & set(source.groups) else DROPPED
            assert mesh_reachability[(source.name, target.name, 80)] == expected, f"{source.name} -> {target.name}:80"
            checked += 1
        assert mesh_reachability[(source.name, target.name, 8099)] == DROPPED, f"{source.name} -> {target.name}:8099"
    assert checked > 0, "the inventory has no cell to test the backend port with"


def ssh_attempt(source: Host, options: str, address: str) -> tuple[int, str]:
    """Exit status and messages of an ssh from source; testinfra mistakes a bare 255 for its own failure."""
    output = source.check_output(f"ssh {SSH_OPTIONS} {options} root@{address} true 2>&1; echo ssh-exit=$?")
    messages, _, status = output.rpartition("ssh-exit=")
    return int(status), messages


def test_sshd_offers_no_password_login(nodes: dict[str, Node]) -> None:
    for source, target in peer_pairs(nodes):
        options = "-o PubkeyAuthentication=no -o PreferredAuthentications=password,keyboard-interactive"
        status, messages = ssh_attempt(source.host, options, target.address)
        assert status == 255
        # The server lists the methods it still accepts: public keys and nothing else.
        assert "Permission denied (publickey)." in messages, messages


def test_sshd_disconnects_at_the_fourth_failed_key(nodes: dict[str, Node]) -> None:
    source, target = peer_pairs(nodes)[0]
    source.host.run_test(
        "rm -rf /tmp/cf-keys && mkdir -m 700 /tmp/cf-keys && "
        "for i in 1 2 3 4; do ssh-keygen -q -t ed25519 -N '' -f /tmp/cf-keys/k$i; done"
    )
    try:
        outcomes = {}
        for count in (3, 4):
            keys = " ".join(f"-i /tmp/cf-keys/k{i}" for i in range(1, count + 1))
            outcomes[count] = ssh_attempt(source.host, f"-o IdentitiesOnly=yes {keys}", target.address)
    finally:
        source.host.run("rm -rf /tmp/cf-keys")
    # Three wrong keys: an ordinary refusal. The fourth reaches MaxAuthTries 4 and sshd hangs up
    # (with sshd's default of 6, four keys would be an ordinary refusal too).
    assert outcomes[3][0] == 255 and "Permission denied (publickey)." in outcomes[3][1], outcomes[3]
    assert outcomes[4][0] == 255 and "isconnect" in outcomes[4][1], outcomes[4]
    assert "Permission denied" not in outcomes[4][1], outcomes[4]


def test_root_still_logs_in_with_its_key(host: Host) -> None:
    # The connection this suite runs over is root with a key; a trivial command proves it.
    assert host.check_output("id -u") == "0"


def test_firewall_is_nftables_with_default_drop(host: Host) -> None:
    ruleset = host.check_output("nft list chain inet cellfleet_filter input")
    assert "policy drop;" in ruleset
    assert host.service("nftables").is_enabled


def test_journal_persists_on_disk(host: Host) -> None:
    machine_id = host.file("/etc/machine-id").content_string.strip()
    journal_dir = host.file(f"/var/log/journal/{machine_id}")
    assert journal_dir.is_directory
    host.run_test("logger -t cellfleet-test journal-probe && journalctl --flush")
    assert (
        host.run(
            "journalctl --file '/var/log/journal/%s/*.journal' -t cellfleet-test | grep -q journal-probe", machine_id
        ).rc
        == 0
    )


def test_time_sync_service_runs(host: Host) -> None:
    service = (
        "chronyd"
        if host.system_info.distribution in ("rocky", "almalinux", "centos", "redhat")
        else ("systemd-timesyncd")
    )
    assert host.service(service).is_running
    assert host.service(service).is_enabled


def test_selinux_is_enforcing(host: Host) -> None:
    assert host.check_output("getenforce") == "Enforcing"


def test_the_recorded_machine_id_is_this_machines(host: Host) -> None:
    assert host.service("cellfleet-clone-identity").is_enabled
    recorded = host.file("/var/lib/cellfleet/machine-id").content_string.strip()
    assert recorded == host.file("/etc/machine-id").content_string.strip()
    listed = host.file("/etc/cellfleet/clone-reset.d/base.list").content_string
    assert "/etc/ssh/ssh_host_*_key" in listed


def test_a_clone_removes_what_the_lists_name_and_keeps_the_rest(host: Host) -> None:
    """The boot-time tool, run against a scratch directory as if this disk came from another machine."""
    scratch = host.check_output("mktemp -d")
    try:
        host.run_test(
            f"mkdir {scratch}/lists {scratch}/left && touch {scratch}/left/key {scratch}/left/key.pub {scratch}/kept"
            f" && printf '# secrets\\n{scratch}/left/*\\n' > {scratch}/lists/test.list"
            f" && echo 0123456789abcdef0123456789abcdef > {scratch}/record"
        )
        tool = (
            f"CELLFLEET_MACHINE_ID_RECORD={scratch}/record CELLFLEET_CLONE_RESET_DIR={scratch}/lists "
            "/usr/local/sbin/cellfleet-clone-identity"
        )
        first = host.run_test(tool)
        assert f"removed {scratch}/left/key, left by machine 0123456789abcdef0123456789abcdef" in first.stdout
        assert host.check_output(f"ls {scratch}/left") == ""
        assert host.file(f"{scratch}/kept").exists
        this_machine = host.file("/etc/machine-id").content_string.strip()
        assert host.file(f"{scratch}/record").content_string.strip() == this_machine
        # The same machine booting again removes nothing.
        host.run_test(f"touch {scratch}/left/new")
        assert host.run_test(tool).stdout == ""
        assert host.file(f"{scratch}/left/new").exists
    finally:
        host.run(f"rm -rf {scratch}")
