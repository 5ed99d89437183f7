#!/usr/bin/env python3
"""Check that the collections pinned in requirements.yml are installed at those versions.

They normally come inside the pinned `ansible` package from PyPI. Only when one is missing or at another
version does this fall back to `ansible-galaxy collection install`, which needs Galaxy to be reachable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml


def pinned(requirements: Path) -> dict[str, str]:
    data = yaml.safe_load(requirements.read_text())
    return {entry["name"]: str(entry["version"]) for entry in data["collections"]}


# The ansible-galaxy of the interpreter's own venv, whatever PATH says.
ANSIBLE_GALAXY = str(Path(sys.executable).parent / "ansible-galaxy")


def installed() -> dict[str, str]:
    output = subprocess.run(
        [ANSIBLE_GALAXY, "collection", "list", "--format", "json"], check=True, capture_output=True, text=True
    ).stdout
    versions: dict[str, str] = {}
    # Earlier paths win, as they do for Ansible itself.
    for collections in reversed(list(json.loads(output).values())):
        for name, info in collections.items():
            versions[name] = info["version"]
    return versions


def main(argv: list[str]) -> int:
    requirements = Path(argv[1] if len(argv) > 1 else "requirements.yml")
    wanted = pinned(requirements)
    have = installed()
    wrong = {name: version for name, version in wanted.items() if have.get(name) != version}
    if not wrong:
        print(f"[setup] collections pinned in {requirements} are installed")
        return 0
    for name, version in wrong.items():
        print(f"[setup] {name}: want {version}, have {have.get(name, 'none')}; installing from Galaxy")
    result = subprocess.run([ANSIBLE_GALAXY, "collection", "install", "-r", str(requirements)], check=False)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv))
