"""The HTTP API fuzzed against its OpenAPI document (app/openapi.yaml) with schemathesis: generated valid and
invalid requests to every operation, and undeclared methods. Every answer must match the document, invalid
input must be refused (4xx), and no request may get a server error or go unanswered (--request-timeout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compute_server

APP = Path(__file__).resolve().parents[1]
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.mark.skipif(not SCHEMATHESIS.exists() and shutil.which("schemathesis") is None, reason="needs schemathesis")
def test_the_api_answers_generated_requests_as_its_openapi_document_says(tmp_path: Path) -> None:
    # Requests come one at a time and each computation ends within 5 s; kernel sessions hold at most two
    # kernels (two per client) and only for a second of idleness: a kernel is always free for /service, so a
    # 503 ("every kernel is busy") there would be a fault too.
    settings = tmp_path / "cellserver.toml"
    settings.write_text(
        "max_kernels = 4\npreforked = 1\ntimeout = 5\nsession_idle_seconds = 1\nsessions_per_client = 2\n"
    )
    server = compute_server(tmp_path, "--config", str(settings))
    server.start()
    try:
        command = [
            str(SCHEMATHESIS if SCHEMATHESIS.exists() else shutil.which("schemathesis")),
            "--config-file", str(APP / "tests" / "schemathesis.toml"),
            "run", str(APP / "openapi.yaml"), "--url", server.url,
            "--checks", "all", "--max-examples", "25", "--request-timeout", "30", "--seed", "20261128",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
