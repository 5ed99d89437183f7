"""cellfleet-cell-health's verdict on one try, against a stand-in cell server on loopback that answers as the
real one does: the server's own reason reaches the log, and only "every kernel is busy" counts as alive."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType

import pytest

from installed_scripts import load_script


@pytest.fixture(scope="module")
def health() -> ModuleType:
    return load_script("roles/cell_server/files/usr/local/sbin/cellfleet-cell-health")


SUM = re.compile(r"print\((-?\d+) \+ (-?\d+)\)$")


class StandInCell:
    """Answers every POST /service with the status and body it is told to; with an answer of None, as a
    working cell does: the sum the code prints."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes | None = b""
        self.requests: list[dict[str, list[str]]] = []
        self.success = True
        self.delay = 0.0  # seconds before each answer: a starved cell
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                fields = urllib.parse.parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                stand_in.requests.append(fields)
                time.sleep(stand_in.delay)
                body = stand_in.body if stand_in.body is not None else stand_in.computed(fields["code"][0])
                self.send_response(stand_in.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # a peer's /health: the status it is told to answer
                self.send_response(stand_in.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def answer(self, status: int, body: object) -> None:
        self.status = status
        self.body = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()

    def computed(self, code: str) -> bytes:
        found = SUM.search(code)
        stdout = f"{int(found.group(1)) + int(found.group(2))}\n" if found else ""
        return json.dumps({"success": self.success, "stdout": stdout}).encode()


@pytest.fixture
def cell() -> Iterator[StandInCell]:
    stand_in = StandInCell()
    thread = threading.Thread(target=stand_in.server.serve_forever, daemon=True)
    thread.start()
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


@pytest.mark.parametrize("kernel", ["python3", "sage"])
def test_a_computation_that_prints_its_sum_passes(health: ModuleType, cell: StandInCell, kernel: str) -> None:
    cell.answer(200, None)
    assert health.one_try(cell.port, 5, kernel) is None
    [fields] = cell.requests
    # SageMathCell's own monitoring request: a plot first with Sage, and the terms accepted.
    assert fields["code"][0].startswith("show(plot(sin)); print(") == (kernel == "sage")
    assert fields["accepted_tos"] == ["true"]


def test_a_wrong_sum_is_a_failure_that_says_what_it_printed(health: ModuleType, cell: StandInCell) -> None:
    cell.answer(200, {"success": True, "stdout": "42\n"})
    reason = health.one_try(cell.port, 5)
    assert reason is not None and reason.startswith("printed '42\\n', not ")


def test_a_failed_computation_is_a_failure_even_with_the_right_sum(health: ModuleType, cell: StandInCell) -> None:
    cell.answer(200, None)
    cell.success = False
    reason = health.one_try(cell.port, 5)
    assert reason is not None and reason.startswith("printed '")


def test_a_full_pool_counts_as_alive(health: ModuleType, cell: StandInCell) -> None:
    cell.answer(503, {"error": "every kernel is busy; retry later", "status": 503})
    assert health.one_try(cell.port, 5) == health.BUSY


@pytest.mark.parametrize(
    "reason", ["the kernel provider went away; retry later", "a kernel failed to start; retry later"]
)
def test_other_refusals_fail_with_the_servers_reason(health: ModuleType, cell: StandInCell, reason: str) -> None:
    cell.answer(503, {"error": reason, "status": 503})
    assert health.one_try(cell.port, 5) == f"HTTP 503: {reason}"


def test_a_refusal_without_a_json_reason_still_names_its_status(health: ModuleType, cell: StandInCell) -> None:
    cell.answer(502, b"<html>bad gateway</html>")
    assert health.one_try(cell.port, 5) == "HTTP 502"


def run_main(
    health: ModuleType, monkeypatch: pytest.MonkeyPatch, port: int, tries: int, timeout: float, *peers: str
) -> list:
    restarts: list = []
    monkeypatch.setattr(health.subprocess, "run", lambda argv, **_kwargs: restarts.append(argv))
    monkeypatch.setattr(health, "PAUSE_BETWEEN_TRIES", 0.0)
    arguments = [str(port), str(tries), str(timeout), "python3", *peers]
    monkeypatch.setattr("sys.argv", ["cellfleet-cell-health", *arguments])
    health.main()
    return restarts


def test_a_slow_but_right_answer_is_alive_and_not_restarted(
    health: ModuleType, cell: StandInCell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cell.answer(200, None)
    cell.delay = 1.0
    assert run_main(health, monkeypatch, cell.port, 3, 0.4) == []
    assert "slow, alive, not restarted" in capsys.readouterr().out
    assert len(cell.requests) == 1, "a late answer was abandoned and asked again"


def test_a_server_that_never_answers_right_is_restarted(
    health: ModuleType, cell: StandInCell, monkeypatch: pytest.MonkeyPatch
) -> None:
    cell.answer(503, {"error": "the kernel provider went away; retry later", "status": 503})
    restarts = run_main(health, monkeypatch, cell.port, 2, 0.4)
    assert restarts == [["systemctl", "restart", "--no-block", "cellserver.service"]]


def test_a_failing_server_whose_peers_all_fail_too_is_not_restarted(
    health: ModuleType, cell: StandInCell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cell.answer(503, {"error": "the kernel provider went away; retry later", "status": 503})
    # The stand-in is also the only peer, and its /health fails the same way.
    assert run_main(health, monkeypatch, cell.port, 2, 0.4, f"http://127.0.0.1:{cell.port}/health") == []
    assert "the cause is shared" in capsys.readouterr().out


def test_a_failing_server_with_a_healthy_peer_is_restarted(
    health: ModuleType, cell: StandInCell, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = StandInCell()
    threading.Thread(target=peer.server.serve_forever, daemon=True).start()
    try:
        peer.answer(200, {"success": True})
        cell.answer(503, {"error": "the kernel provider went away; retry later", "status": 503})
        restarts = run_main(health, monkeypatch, cell.port, 2, 0.4, f"http://127.0.0.1:{peer.port}/health")
    finally:
        peer.server.shutdown()
        peer.server.server_close()
    assert restarts == [["systemctl", "restart", "--no-block", "cellserver.service"]]
