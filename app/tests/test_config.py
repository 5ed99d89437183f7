"""One settings file, checked at start: a bad value stops the server with one line that names it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cellserver.config import ConfigError, ServerConfig, load
from conftest import Service, compute_server


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cellserver.toml"
    path.write_text(text)
    return path


def test_file_values_then_flags_override(tmp_path: Path) -> None:
    path = write(tmp_path, 'max_kernels = 4\npreforked = 1\ntimeout = 10\nbind = "0.0.0.0"\n')
    config = load(path, {"timeout": 5.0, "port": None})
    assert config == ServerConfig(max_kernels=4, preforked=1, timeout=5.0, bind="0.0.0.0")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_kernels = 0", "max_kernels must be from 1 to 1000, got 0"),
        ('port = "80"', "port must be an integer, got '80'"),
        ("timeout = true", "timeout must be a number, got True"),
        ("max_kernel = 3", "unknown setting 'max_kernel' (did you mean max_kernels?)"),
        ("max_kernels = 2\npreforked = 3", "preforked (3) must not exceed max_kernels (2)"),
        ("port = ", "not valid TOML"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(write(tmp_path, text), {})


def test_a_bad_file_stops_the_start_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "memory_mb = 1")
    result = subprocess.run(
        [sys.executable, "-m", "cellserver", "serve", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"cellserver: {path}: memory_mb must be from 64 to 1048576, got 1"]


def test_a_good_file_starts_the_server(tmp_path: Path) -> None:
    path = write(tmp_path, "max_kernels = 1\npreforked = 0\n")
    server: Service = compute_server(tmp_path, "--config", str(path))
    server.start()
    try:
        status, _headers, body = server.request("POST", "/service", {"code": "print(3)"})
    finally:
        server.stop()
    assert status == 200 and '"stdout": "3\\n"' in body
