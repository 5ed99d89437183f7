"""How the scripts in tests/remote reach a lab VM: their source as `python3 -c`, their arguments quoted.

The VMs have python3 but not this checkout, so a script travels inside the command line.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[3] / "tests" / "remote"


def concurrent_requests_command(url: str, method: str, fields: dict[str, str], count: int) -> str:
    """Shell command for a VM: `count` requests to url at once; it prints [[status, headers, body], ...] as JSON."""
    script = (SCRIPTS / "concurrent_requests.py").read_text()
    return shlex.join(["python3", "-c", script, url, method, json.dumps(fields), str(count)])


def script_command(script: Path, *arguments: str, python: str = "python3") -> str:
    """Shell command for a VM that runs a script of this checkout with its arguments (with python, the VM's
    interpreter to run it: the system's, or a venv's that has what the script imports)."""
    return shlex.join([python, "-c", script.read_text(), *arguments])
