"""How the scripts in tests/remote reach a lab VM: their source as `python3 -c`, their arguments quoted.

The VMs have python3 but not this checkout, so a script travels inside the command line.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Protocol

SCRIPTS = Path(__file__).resolve().parents[3] / "tests" / "remote"

# [status or error name, lower-cased headers, body], as tests/remote/http_requests.py prints each answer.
Answer = tuple[int | str, dict[str, str], str]


class Runs(Protocol):
    """Runs a shell command on a VM and returns its output, as a testinfra host does."""

    def check_output(self, command: str) -> str: ...


def script_command(script: Path, *arguments: str, python: str = "python3") -> str:
    """Shell command for a VM that runs a script of this checkout with its arguments (with python, the VM's
    interpreter to run it: the system's, or a venv's that has what the script imports)."""
    return shlex.join([python, "-c", script.read_text(), *arguments])


def requests_command(
    url: str, method: str = "GET", form: dict[str, str] | None = None, count: int = 1, timeout: float = 120
) -> str:
    """Shell command for a VM: `count` requests to url at once; it prints their answers as JSON."""
    options = ["--method", method, "--form", json.dumps(form or {}), "--count", str(count), "--timeout", str(timeout)]
    return script_command(SCRIPTS / "http_requests.py", url, *options)


def answers_from(output: str) -> list[Answer]:
    return [(status, headers, body) for status, headers, body in json.loads(output)]


def fetch(host: Runs, url: str, timeout: float = 10) -> Answer:
    """One GET of url from the VM `host` runs commands on."""
    [answer] = answers_from(host.check_output(requests_command(url, timeout=timeout)))
    return answer
