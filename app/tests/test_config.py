"""One settings file, checked at start: a bad value stops the server with one line that names it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cellserver.cli import pool_settings
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
        ('allowed_origins = "https://a.example/page"', "'https://a.example/page' is not an origin"),
        ('allowed_origins = "a.example"', "'a.example' is not an origin"),
        ('tos_file = "/nonexistent/tos.html"', "tos_file '/nonexistent/tos.html' is not a readable file"),
        ('kernel = "octave"', "kernel must be python3 or sage"),
        ("kernel_start_timeout = 0", "kernel_start_timeout must be from 1 to 600, got 0"),
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
    assert result.stderr.strip().splitlines() == [
        f"cellserver: {path}: memory_mb must be 0 (the kernel's own need) or at least 64, got 1"
    ]


def test_a_good_file_starts_the_server(tmp_path: Path) -> None:
    path = write(tmp_path, "max_kernels = 1\npreforked = 0\n")
    server: Service = compute_server(tmp_path, "--config", str(path))
    server.start()
    try:
        status, _headers, body = server.request("POST", "/service", {"code": "print(3)"})
    finally:
        server.stop()
    assert status == 200 and '"stdout": "3\\n"' in body


def test_a_kernel_gets_the_address_space_its_kind_needs_unless_set() -> None:
    # A Sage kernel maps over 2 GiB before any user code: a Python-sized limit kills every Sage kernel at start.
    assert ServerConfig(kernel="sage").kernel_memory_mb() > 2.4 * 1024
    assert ServerConfig(kernel="python3").kernel_memory_mb() == 2048
    assert ServerConfig(kernel="sage", memory_mb=3000).kernel_memory_mb() == 3000


def test_allowed_origins_are_a_list() -> None:
    config = load(None, {"allowed_origins": "https://a.example  http://127.0.0.1:8000"})
    assert config.origins() == ("https://a.example", "http://127.0.0.1:8000")


def test_a_sage_kernel_without_passagemath_is_refused_at_the_check(tmp_path: Path) -> None:
    # The app's own venv has no passagemath: the check says what is missing instead of a provider that dies.
    path = write(tmp_path, 'kernel = "sage"\n')
    result = subprocess.run(
        [sys.executable, "-m", "cellserver", "serve", "--config", str(path), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "kernel = sage needs passagemath" in result.stderr


def test_the_pool_gets_the_kernel_start_timeout_and_limits_of_the_file(tmp_path: Path) -> None:
    text = "kernel_start_timeout = 75\ncpu_seconds = 12\nmemory_mb = 512\nidle_seconds = 60\npreforked = 3\n"
    settings = pool_settings(load(write(tmp_path, text), {}))
    assert (settings.start_timeout, settings.cpu_seconds, settings.memory_bytes) == (75, 12, 512 << 20)
    assert (settings.idle_seconds, settings.preforked) == (60, 3)
