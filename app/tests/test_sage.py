"""The Sage kernel on a laptop server (`make serve-sage`): Sage's answers, SageMathCell's own monitoring probe,
and the requests WeBWorK servers send. Needs the Sage environment `make sage` builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Service, compute_server, sage_python

CLIENTS = Path(__file__).resolve().parents[2] / "tests" / "clients"
PROBE = CLIENTS / "sagecell_service_probe.py"
WEBWORK = [tuple(request) for request in json.loads((CLIENTS / "webwork_requests.json").read_text())["requests"]]


@pytest.fixture(scope="module")
def sage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A laptop server with the Sage kernel, two kernels, one preforked, and terms to accept."""
    directory = tmp_path_factory.mktemp("sage")
    terms = directory / "tos.html"
    terms.write_text("<p>Terms.</p>")
    settings = directory / "cellserver.toml"
    settings.write_text(f'kernel = "sage"\nmax_kernels = 2\npreforked = 1\ntos_file = {str(terms)!r}\n')
    running = compute_server(directory, "--config", str(settings), python=sage_python())
    running.start()
    yield running
    running.stop()


def compute(server: Service, code: str) -> dict:
    status, _headers, body = server.request("POST", "/service", {"code": code, "accepted_tos": "true"})
    assert status == 200, body
    return json.loads(body)


def test_sagemathcells_own_monitoring_probe_passes(sage: Service) -> None:
    # The request and check of upstream's contrib/sagecell-client/sagecell-service.py: a plot, then a sum.
    result = subprocess.run([sys.executable, str(PROBE), sage.url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("code", "stdout"), WEBWORK)
def test_webwork_requests_get_sages_answers(sage: Service, code: str, stdout: str) -> None:
    answer = compute(sage, code)
    assert (answer["success"], answer["stdout"]) == (True, stdout), answer


def test_cells_are_sage_not_python(sage: Service) -> None:
    # The preparser: ^ is a power and 1/3 exact; Sage's names are there without an import.
    assert compute(sage, "print(2^10, 1/3, factorial(10))")["stdout"] == "1024 1/3 3628800\n"
    # Python as upstream's page sends it to the Sage kernel: wrapped in exec, so ^ stays XOR.
    assert compute(sage, 'exec("""print(2^10)""")')["stdout"] == "8\n"


def test_show_and_html_succeed_without_printing(sage: Service) -> None:
    answer = compute(sage, "show(plot(sin)); html('<b>x</b>'); print('after')")
    assert answer["success"] is True and answer["stdout"] == "after\n", answer


def test_the_terms_must_be_accepted(sage: Service) -> None:
    status, _headers, body = sage.request("POST", "/service", {"code": "print(1)"})
    assert status == 403 and "accepted_tos=true" in json.loads(body)["error"]


def test_the_page_offers_sage_and_python(sage: Service) -> None:
    page = sage.request("GET", "/?c=1")[2]
    assert '"languages": ["sage", "python"]' in page and '"language": "sage"' in page


def test_the_cpu_limit_holds_for_sage_kernels(tmp_path: Path) -> None:
    settings = tmp_path / "cellserver.toml"
    settings.write_text('kernel = "sage"\ncpu_seconds = 2\ntimeout = 20\nmax_kernels = 1\npreforked = 0\n')
    server = compute_server(tmp_path, "--config", str(settings), python=sage_python())
    server.start()
    try:
        answer = json.loads(server.request("POST", "/service", {"code": "while True: pass"})[2])
    finally:
        server.stop()
    assert answer["success"] is False and answer["execute_reply"]["ename"] == "KernelDied", answer


WARM_UP = "from cellserver import sage_environment as s; {keep}s.provide_sage_globals(); s.warm_up(); print('warm')"


@pytest.mark.parametrize("kept", [True, False])
def test_a_provider_without_a_writable_home_keeps_sages_state_elsewhere(tmp_path: Path, kept: bool) -> None:
    # The provider service's home is read-only: Sage (~/.sage), Maxima (~/.maxima) and matplotlib write at
    # import and warm-up, and without a directory of their own the provider cannot start at all.
    keep = f"s.keep_state_in(__import__('pathlib').Path({str(tmp_path)!r})); " if kept else ""
    environment = {
        key: value for key, value in os.environ.items() if key not in ("DOT_SAGE", "MAXIMA_USERDIR", "MPLCONFIGDIR")
    }
    result = subprocess.run([sage_python(), "-c", WARM_UP.format(keep=keep)], capture_output=True, text=True,
                            timeout=300, env={**environment, "HOME": "/proc/1"}, check=False)  # fmt: skip
    assert (result.returncode == 0 and result.stdout == "warm\n") == kept, result.stderr[-2000:]
