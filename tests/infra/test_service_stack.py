"""The cluster serves through its load balancer: TLS, redirects, permalinks shared by the cells, and rate
limits per client and in total, separately for computations and permalinks.

Clients are the lab's own VMs (each has its own address, so per-client limits can be told apart); they run
python3 against the load balancer's address inside the lab network.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cells import cell_server_python
from conftest import Node
from labkit import units
from labkit.lab import RATE_TABLES
from labkit.sending import SCRIPTS, answers_from, requests_command, script_command
from labkit.waiting import until


@pytest.fixture(scope="module")
def lab(nodes: dict[str, Node]) -> dict[str, Node]:
    needed = {"loadbalancers", "cells", "permalink_db"}
    groups = {group for node in nodes.values() for group in node.groups}
    if not needed <= groups:
        pytest.skip(f"needs hosts in {sorted(needed)}")
    return nodes


@pytest.fixture(autouse=True)
def serving(lab: dict[str, Node]) -> None:
    """Each test starts from a cluster that serves: a test before it, here or in another module (a frozen
    provider, a killed server, a flood), may have left a cell DOWN while it recovers."""
    wait_until_every_cell_is_up(load_balancer(lab), cells(lab))


def load_balancer(lab: dict[str, Node]) -> Node:
    return next(node for node in lab.values() if "loadbalancers" in node.groups)


def cells(lab: dict[str, Node]) -> list[Node]:
    return sorted((node for node in lab.values() if "cells" in node.groups), key=lambda node: node.name)


def send(client: Node, url: str, method: str = "GET", fields: dict | None = None, count: int = 1) -> list:
    return answers_from(client.host.check_output(requests_command(url, method, fields, count)))


def forget_request_rates(lb: Node) -> None:
    """Start from no counted requests: the limits count the last 10 s, and the tests before sent many."""
    for table in RATE_TABLES:
        admin(lb, f"clear table {table}")
    for table in RATE_TABLES:
        listed = admin(lb, f"show table {table}")
        assert "used:0" in listed, listed


def test_a_computation_through_the_load_balancer(lab: dict[str, Node]) -> None:
    lb = load_balancer(lab)
    [(status, headers, body)] = send(cells(lab)[0], f"https://{lb.address}/service", "POST", {"code": "print(6*7)"})
    assert status == 200, body
    assert json.loads(body)["stdout"] == "42\n"
    assert headers["strict-transport-security"].startswith("max-age=")


CLIENTS = Path(__file__).resolve().parents[1] / "clients"
SESSIONS = 6


def test_sagemathcells_own_monitoring_probe_passes_through_the_load_balancer(lab: dict[str, Node]) -> None:
    # Upstream's sagecell-service.py request and check: show(plot(sin)) then a random sum, accepted_tos=true.
    # Sent from the load balancer host itself: each test here uses its own client, under the per-client limit.
    # Up to 120 s per try instead of upstream's 15: an emulated cell spends tens of seconds on the plot.
    lb = load_balancer(lab)
    probe = lb.host.run(
        script_command(CLIENTS / "sagecell_service_probe.py", f"https://{lb.address}", "--insecure", "--timeout", "120")
    )
    assert probe.rc == 0, probe.stdout + probe.stderr


def test_webwork_requests_get_sages_answers_through_the_load_balancer(lab: dict[str, Node]) -> None:
    lb = load_balancer(lab)
    data = next(node for node in lab.values() if "permalink_db" in node.groups)
    for code, stdout in json.loads((CLIENTS / "webwork_requests.json").read_text())["requests"]:
        [(status, _headers, body)] = send(data, f"https://{lb.address}/service", "POST",
                                          {"code": code, "accepted_tos": "true"})  # fmt: skip
        assert status == 200, body
        assert json.loads(body)["stdout"] == stdout, (code, body)


def stuck_sessions(lb: Node) -> dict[str, str]:
    """HAProxy's routing of kernel sessions: kernel id (or CellSessionID) -> the cell it is kept with."""
    table = admin(lb, "show table cells")
    pairs = (dict(field.split("=", 1) for field in line.split()[1:]) for line in table.splitlines()[1:] if line)
    return {pair["key"]: pair["server_key"] for pair in pairs}


def servers_log(lab: dict[str, Node], since: str) -> str:
    """Each cell's cell server, kernel provider and health check journals since a time: what a failed session
    left there."""
    journals = f"-u {units.CELL_SERVER} -u {units.KERNEL_PROVIDER} -u {units.CELL_HEALTH}"
    command = f"journalctl {journals} --since {shlex.quote(since)} --no-pager -o short-monotonic"
    return "\n".join(f"--- {cell.name}\n" + cell.host.run(command).stdout[-6000:] for cell in cells(lab))


def test_interactive_sessions_reach_their_own_cell_through_the_load_balancer(lab: dict[str, Node]) -> None:
    # Upstream's interactive client: POST /kernel on one connection, then the kernel's WebSocket (wss, as
    # the cell reports it behind TLS) on another; with two cells, leastconn alone sends the WebSocket to the
    # other cell half the time, which answers 404 "no such kernel".
    lb = load_balancer(lab)
    client = cells(lab)[0]  # its venv has tornado, which the client uses
    before = stuck_sessions(lb)
    arguments = (f"https://{lb.address}", "print(2^10)", "--insecure", "--timeout", "120")
    command = script_command(CLIENTS / "sagecell_session_client.py", *arguments)
    command = command.replace("python3", cell_server_python(client.host), 1)
    since = client.host.check_output("date '+%Y-%m-%d %H:%M:%S'")
    for _ in range(SESSIONS):
        session = client.host.run(command)
        assert session.rc == 0, session.stderr + servers_log(lab, since)
        streams = [m["content"] for m in json.loads(session.stdout)["iopub"] if m["header"]["msg_type"] == "stream"]
        assert "".join(stream["text"] for stream in streams) == "1024\n", streams
    routed = {key: cell for key, cell in stuck_sessions(lb).items() if key not in before}
    assert len(routed) == SESSIONS, routed
    if len(cells(lab)) > 1:
        assert len(set(routed.values())) > 1, f"every session went to one cell, the routing was not tried: {routed}"


# A plot the page fetches once its computation is done, and a link planted to read beyond the kernel's files.
WRITE_AND_PLANT = "import os; open('plot.png', 'wb').write(bytes(range(256)) * 4); os.symlink('/etc/passwd', 'pw.txt')"


def test_the_files_a_computation_wrote_reach_the_page_through_the_load_balancer(lab: dict[str, Node]) -> None:
    # Upstream's page asks for no idle timeout: the session ends with its computation, and the page fetches
    # the files the reply announced after that, from the cell that ran it (the worker's home is reset by then).
    lb = load_balancer(lab)
    client = cells(lab)[0]
    arguments = (f"https://{lb.address}", WRITE_AND_PLANT, "--insecure", "--timeout", "120", "--fetch-files")
    command = script_command(CLIENTS / "sagecell_session_client.py", *arguments)
    session = client.host.run(command.replace("python3", cell_server_python(client.host), 1))
    assert session.rc == 0, session.stderr
    files = json.loads(session.stdout)["files"]
    plot = hashlib.sha256(bytes(range(256)) * 4).hexdigest()
    assert files.get("plot.png") == {"status": 200, "type": "image/png", "sha256": plot}, files
    # Refused while the session lives, not kept once it ended: never served.
    assert files.get("pw.txt", {}).get("status") in (403, 404), files


def test_plain_http_is_redirected_to_https(lab: dict[str, Node]) -> None:
    lb = load_balancer(lab)
    [(status, headers, _body)] = send(cells(lab)[0], f"http://{lb.address}/service?x=1")
    assert status == 301
    assert headers["location"].startswith(f"https://{lb.address}/service")


def clients(lab: dict[str, Node]) -> list[Node]:
    """Every node can be a client: each has its own address, so the load balancer tells them apart."""
    return sorted(lab.values(), key=lambda node: ("loadbalancers" in node.groups, node.name))


def test_a_permalink_made_through_the_load_balancer_opens_on_every_cell(
    lab: dict[str, Node], mesh_addresses: dict[str, str]
) -> None:
    lb = load_balancer(lab)
    code = f"print('permalink {time.time()}')"
    [(status, _headers, body)] = send(cells(lab)[0], f"https://{lb.address}/permalink", "POST", {"code": code})
    assert status == 200, body
    ident = json.loads(body)["query"]
    for cell in cells(lab):
        # Straight at each cell's nginx over the mesh, from the load balancer (the only host let in there).
        [(status, _headers, page)] = send(lb, f"http://{mesh_addresses[cell.name]}/?q={ident}")
        assert status == 200 and json.dumps(code)[1:-1] in page, cell.name
    # Read back through the load balancer from the last cell (the other one, where there are two).
    [(status, _headers, body)] = send(cells(lab)[-1], f"https://{lb.address}/permalink?q={ident}")
    assert status == 200 and json.loads(body)[0] == code


def test_static_assets_come_from_nginx_with_long_caching(lab: dict[str, Node]) -> None:
    lb = load_balancer(lab)
    [(status, _headers, page)] = send(cells(lab)[0], f"https://{lb.address}/")
    assert status == 200
    script = page.split('src="', 2)[1].split('"')[0]
    [(status, headers, body)] = send(cells(lab)[0], f"https://{lb.address}{script}")
    assert status == 200 and "addEventListener" in body
    assert "immutable" in headers.get("cache-control", "")


def statuses(answers: list) -> list[int]:
    return [status for status, _headers, _body in answers]


def test_a_flooding_client_gets_429_while_another_is_served(lab: dict[str, Node]) -> None:
    lb = load_balancer(lab)
    flooder, other = clients(lab)[:2]
    limit = int(lb.setting("haproxy_rate_limit_per_ip"))
    forget_request_rates(lb)
    # Twice the per-client limit, so the flood alone stays within the total limit and others are served.
    flood = statuses(send(flooder, f"https://{lb.address}/service", "POST", {"code": "1"}, limit * 2))
    assert flood.count(429) >= limit, flood
    assert flood.count(200) <= limit, flood
    # A flood starves molecule's one emulated cell: its health checks answer late, and must not take it out
    # of rotation for that. The other client sends one request after the other, as a person at a page does.
    # The bodies say whose refusal it was if one comes: HAProxy's 429 or 503, or the cell's own 503.
    served = [send(other, f"https://{lb.address}/service", "POST", {"code": "1"})[0] for _ in range(2)]
    assert statuses(served) == [200, 200], [(status, body[:200]) for status, _headers, body in served]
    # Computations and permalinks are counted apart: the flooder may still fetch a permalink.
    [(status, _headers, _body)] = send(flooder, f"https://{lb.address}/permalink?q=aaaaaa")
    assert status in (200, 404)


def test_the_total_limit_holds_across_clients(lab: dict[str, Node]) -> None:
    lb = load_balancer(lab)
    per_ip = int(lb.setting("haproxy_rate_limit_per_ip"))
    total = int(lb.setting("haproxy_rate_limit_total"))
    senders = clients(lab)
    if per_ip * len(senders) <= total:
        pytest.skip("the clients cannot exceed the total limit while each stays under its own")
    forget_request_rates(lb)
    # Every client at once, each staying within its own limit.
    with ThreadPoolExecutor(len(senders)) as background:
        batches = background.map(
            lambda client: send(client, f"https://{lb.address}/service", "POST", {"code": "1"}, per_ip), senders
        )
        answers = [status for batch in batches for status in statuses(batch)]
    assert answers.count(429) >= len(answers) - total, answers
    assert answers.count(429) > 0


def test_the_stats_page_is_local_only(lab: dict[str, Node]) -> None:
    lb = load_balancer(lab)
    assert lb.host.socket("tcp://127.0.0.1:8404").is_listening
    assert not lb.host.socket(f"tcp://{lb.address}:8404").is_listening
    state = admin(lb, f"show servers state {lb.setting('haproxy_cells_backend')}")
    assert all(cell.name in state for cell in cells(lab))


def admin(lb: Node, command: str) -> str:
    socket = lb.setting("haproxy_admin_socket")
    return lb.host.check_output(f"echo {shlex.quote(command)} | socat stdio unix-connect:{socket}")


def server_stats(lb: Node, server: str) -> tuple[str, int]:
    """Status and weight of one cell server, from the runtime API's CSV statistics."""
    backend = lb.setting("haproxy_cells_backend")
    for line in admin(lb, "show stat").splitlines():
        fields = line.split(",")
        if fields[:2] == [backend, server]:
            return fields[17], int(fields[18])
    raise AssertionError(f"{backend}/{server} not in the stats")


def serving_worker(lb: Node) -> tuple[str, int]:
    """The pid of the HAProxy worker that serves now, and the sessions its https frontend has taken since it
    started (a reload starts a new worker, whose counters start at 0)."""
    info = dict(line.split(": ", 1) for line in admin(lb, "show info").splitlines() if ": " in line)
    for line in admin(lb, "show stat").splitlines():
        fields = line.split(",")
        if fields[:2] == ["https", "FRONTEND"]:
            return info["Pid"], int(fields[7])
    raise AssertionError("no https frontend in the stats")


def wait_until_every_cell_is_up(lb: Node, backends: list[Node], seconds: float = 120) -> None:
    """The floods before this test can keep an emulated cell too busy to answer its health checks: HAProxy
    then marks it DOWN and answers 503 until the checks pass again. Start from a backend that serves."""
    started = time.monotonic()

    states: dict[str, str] = {}

    def every_cell_up() -> bool:
        states.update({cell.name: server_stats(lb, cell.name)[0] for cell in backends})
        return set(states.values()) == {"UP"}

    assert until(every_cell_up, seconds, interval=1), f"cells not back UP after {seconds:g} s: {states}"
    print(f"every cell UP after {time.monotonic() - started:.1f} s")


RELOADS = 5


@pytest.mark.load
def test_reloads_refuse_no_connection_and_keep_runtime_server_states(lab: dict[str, Node]) -> None:
    lb = load_balancer(lab)
    backends = cells(lab)
    wait_until_every_cell_is_up(lb, backends)
    reweighted = backends[-1].name
    backend = lb.setting("haproxy_cells_backend")
    # Draining leaves a backend without servers when there is one cell (molecule): only drain with two.
    drained = backends[0].name if len(backends) > 1 else None
    [(status, _headers, page)] = send(clients(lab)[0], f"https://{lb.address}/")
    assert status == 200
    asset = page.split('src="', 2)[1].split('"')[0]
    _status, weight = server_stats(lb, reweighted)
    new_weight = weight + 1 if weight < 256 else weight - 1  # never 0: that would drain it too
    admin(lb, f"set weight {backend}/{reweighted} {new_weight}")
    if drained:
        admin(lb, f"set server {backend}/{drained} state drain")
    try:
        # A reload on the emulated lb1 takes seconds (the configuration is checked first): the load outlasts
        # RELOADS of them, and the test says so if it did not.
        load_spec = {"urls": [f"https://{lb.address}{asset}"], "method": "GET", "concurrency": 4,
                     "seconds": 30 * RELOADS, "fresh_connections": True}  # fmt: skip
        command = script_command(SCRIPTS / "http_load.py", json.dumps(load_spec))
        with ThreadPoolExecutor(1) as background:
            load = background.submit(clients(lab)[0].host.check_output, command)
            # Each reload once the worker before it has taken new connections of the load: every worker
            # hands over while connections arrive.
            for reload in range(RELOADS + 1):
                worker, _ = serving_worker(lb)
                taking = until(lambda: serving_worker(lb)[1] >= 3, 30, interval=0.2)
                assert taking, f"HAProxy worker {worker} (after {reload} reloads) took no new connection in 30 s"
                if reload < RELOADS:
                    lb.host.run_test("systemctl reload haproxy.service")
                    assert until(lambda: serving_worker(lb)[0] != worker, 30, interval=0.2), "no new worker"  # noqa: B023
            outcomes = json.loads(load.result(timeout=120))["outcomes"]
        print(f"{RELOADS} reloads under load: {outcomes}")
        assert set(outcomes) == {"200"}, outcomes
        assert outcomes["200"] > 50, outcomes
        # The new workers read the states saved before each reload.
        assert server_stats(lb, reweighted)[1] == new_weight
        if drained:
            assert server_stats(lb, drained)[0] == "DRAIN"
    finally:
        admin(lb, f"set weight {backend}/{reweighted} {weight}")
        if drained:
            admin(lb, f"set server {backend}/{drained} state ready")
    # A restart saves the states first (ExecStop), so it brings back what runs now, not the drain of a reload ago.
    lb.host.run_test("systemctl restart haproxy.service")
    restored = until(lambda: server_stats(lb, reweighted) == ("UP", weight), 30, interval=1)
    assert restored, f"after a restart {backend}/{reweighted} is {server_stats(lb, reweighted)}, not UP"
    if drained:
        assert server_stats(lb, drained)[0] != "DRAIN"
