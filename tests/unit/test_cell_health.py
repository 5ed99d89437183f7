"""cellfleet-cell-health's verdict on one try, against a stand-in cell server on loopback that answers as the
real one does: the server's own reason reaches the log, and only "every kernel is busy" counts as alive."""

from __future__ import annotations

import json
import re
import threading
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
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                fields = urllib.parse.parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                stand_in.requests.append(fields)
                body = stand_in.body if stand_in.body is not None else stand_in.computed(fields["code"][0])
                self.send_response(stand_in.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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
