"""Central logging: every node's lines reach the log host in per-host, per-program files over RELP; a log
host that is down loses nothing (its clients queue, in memory then on disk, across their own restarts); the
per-host files rotate without losing what comes next."""

from __future__ import annotations

import json
import os
import shlex
import time
import uuid
from collections.abc import Callable

import pytest

from cells import first_cell
from conftest import Node
from labkit.sending import SCRIPTS, fetch, script_command
from labkit.waiting import until

LOG_DIR = "/var/log/cellfleet-hosts"
# The acceptance asks for 60 s; a shorter outage can be asked for when iterating by hand.
OUTAGE_SECONDS = int(os.environ.get("CELLFLEET_LOG_OUTAGE_SECONDS", "60"))
DELIVERY_TIMEOUT_SECONDS = 180


@pytest.fixture(scope="module")
def log_host(nodes: dict[str, Node], mesh_addresses: dict[str, str]) -> Node:
    hosts = [node for node in nodes.values() if "log_servers" in node.groups]
    if not hosts:
        pytest.skip("no log_servers host in the inventory")
    return hosts[0]


@pytest.fixture(scope="module")
def clients(nodes: dict[str, Node], log_host: Node) -> list[Node]:
    return sorted((node for node in nodes.values() if node is not log_host), key=lambda node: node.name)


def tag() -> str:
    return f"cftest-{uuid.uuid4().hex[:10]}"


def received(log_host: Node, client: Node, program: str) -> list[str]:
    path = f"{LOG_DIR}/{client.name}/{program}.log"
    return log_host.host.run(f"cat {path} {path}.1 2>/dev/null").stdout.splitlines()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    assert until(condition, timeout, interval=2), f"not within {timeout:.0f} s: {what}"


def test_lines_from_every_node_reach_their_own_file(log_host: Node, clients: list[Node]) -> None:
    program = tag()
    for client in clients:
        client.host.run_test(f"logger -t {program} -p user.notice {shlex.quote('hello from ' + client.name)}")
    for client in clients:
        wait_for(
            lambda client=client: any(f"from {client.name}" in line for line in received(log_host, client, program)),
            60,
            f"{client.name}'s line in {LOG_DIR}/{client.name}/{program}.log",
        )
        [line] = received(log_host, client, program)
        assert f" {client.name} user.notice {program}:" in line, line


def test_the_computation_log_reaches_the_log_host(log_host: Node, nodes: dict[str, Node]) -> None:
    cell = first_cell(nodes)
    marker = tag()
    assert marker in cell.stdout(f"print({marker!r})")

    def logged() -> list[str]:
        return [line for line in received(log_host, cell.node, "cellserver") if marker in line]

    wait_for(lambda: bool(logged()), 60, "the computation log")
    [line] = logged()
    assert " local3.info cellserver:" in line, line
    assert json.loads(line.split("cellserver: ", 1)[1])["type"] == "service"


def test_nginx_logs_requests_but_not_passing_health_checks(log_host: Node, clients: list[Node]) -> None:
    # Load balancers check /health several times a second per cell: logged, those lines would bury the rest.
    cells = [client for client in clients if "cells" in client.groups]
    if not cells:
        pytest.skip("no cell in the inventory")
    cell, health, other = cells[0], tag(), tag()
    for url in (f"http://127.0.0.1/health?probe={health}", f"http://127.0.0.1/static/{other}.css"):
        fetch(cell.host, url, timeout=60)  # the .css is not there: a 404, logged
    wait_for(lambda: any(other in line for line in received(log_host, cell, "nginx")), 60, "nginx's line for a request")
    assert not any(health in line for line in received(log_host, cell, "nginx")), "a passing /health was logged"


def start_writer(client: Node, program: str, lines: int, interval: float) -> None:
    """A transient unit on the client writing numbered lines, one every interval seconds."""
    writer = script_command(SCRIPTS / "syslog_writer.py", program, str(lines), str(interval))
    client.host.run_test(f"systemd-run --unit={program} --collect {writer}")


def numbers_received(log_host: Node, client: Node, program: str) -> set[int]:
    return {int(line.split("line ")[1].split()[0]) for line in received(log_host, client, program) if "line " in line}


@pytest.mark.load
def test_nothing_is_lost_while_the_log_host_is_down(log_host: Node, clients: list[Node]) -> None:
    program = tag()
    interval = 0.25
    lines = int(OUTAGE_SECONDS / interval)
    # The socket too: journald writing to it would start rsyslog again at once (socket activation).
    log_host.host.run_test("systemctl stop syslog.socket rsyslog.service")
    try:
        for client in clients:
            start_writer(client, program, lines, interval)
        time.sleep(OUTAGE_SECONDS / 2)
        # A client restarted mid-outage keeps its queue: saved to disk on shutdown, read back on start.
        clients[0].host.run_test("systemctl restart rsyslog.service")
        time.sleep(OUTAGE_SECONDS / 2 + 2)
        for client in clients:
            assert numbers_received(log_host, client, program) == set(), "lines arrived while the log host was down"
        queued = clients[0].host.run("ls /var/spool/rsyslog | grep -c forward_ || true").stdout.strip()
    finally:
        log_host.host.run_test("systemctl start rsyslog.service")
    restarted = time.monotonic()
    for client in clients:
        wait_for(
            lambda client=client: not client.host.service(program).is_running, 60, f"the writer on {client.name} to end"
        )
        wait_for(
            lambda client=client: numbers_received(log_host, client, program) == set(range(1, lines + 1)),
            DELIVERY_TIMEOUT_SECONDS,
            f"all {lines} lines from {client.name}: missing "
            f"{sorted(set(range(1, lines + 1)) - numbers_received(log_host, client, program))[:20]}",
        )
    print(
        f"log host down {OUTAGE_SECONDS} s: {lines} lines from each of {len(clients)} nodes, all delivered "
        f"{time.monotonic() - restarted:.0f} s after it came back; {queued} queue files on {clients[0].name}'s disk"
    )
    assert int(queued) > 0, "the restarted client kept no queue file on disk during the outage"


def test_the_per_host_files_rotate_and_logging_goes_on(log_host: Node, clients: list[Node]) -> None:
    program = tag()
    client = clients[0]
    path = f"{LOG_DIR}/{client.name}/{program}.log"
    client.host.run_test(f"logger -t {program} before-rotation")
    wait_for(lambda: log_host.host.file(path).exists, 60, f"{path} to appear")
    log_host.host.run_test("logrotate --force /etc/logrotate.d/cellfleet-hosts")
    assert "before-rotation" in log_host.host.file(f"{path}.1").content_string
    client.host.run_test(f"logger -t {program} after-rotation")
    wait_for(
        lambda: log_host.host.file(path).exists and "after-rotation" in log_host.host.file(path).content_string,
        60,
        "the line after the rotation in a fresh file",
    )
    assert "before-rotation" not in log_host.host.file(path).content_string
