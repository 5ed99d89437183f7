#!/usr/bin/env python3
"""Build the cell server's wheel and a wheelhouse of its dependencies, for hosts with no internet access.

Dependencies are pinned to the versions of the controller's own environment (the ones the tests ran
with). The wheelhouse is rebuilt in a scratch directory and only files whose bytes differ are replaced,
so a second run changes nothing; the app's wheel is reproducible (SOURCE_DATE_EPOCH from git).
Writes requirements.txt there with every wheel pinned. Prints one JSON line:
{"changed": bool, "wheels": [...], "app_wheel": name}.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

APP_DISTRIBUTION = "cellfleet_cellserver"


def source_date_epoch(source: Path) -> str:
    """Time of the last commit that touched the app, so the same sources give the same wheel bytes (any later
    commit elsewhere in the repository leaves the wheel alone); a fixed date without git."""
    command = ["git", "-C", str(source), "log", "-1", "--format=%ct", "--", "."]
    result = subprocess.run(command, capture_output=True, text=True)
    return result.stdout.strip() or "315532800"


def pinned_environment(python: str) -> str:
    frozen = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    return "\n".join(line for line in frozen.splitlines() if not line.lower().startswith("cellfleet"))


def build(source: Path, scratch: Path, python: str, epoch: str) -> None:
    constraints = scratch / "constraints.txt"
    constraints.write_text(pinned_environment(python) + "\n")
    wheels = scratch / "wheels"
    env = {**os.environ, "SOURCE_DATE_EPOCH": epoch, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # The app itself is built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), "--constraint",
                    str(constraints), f"{source}[postgres]"], check=True, env=env)  # fmt: skip


def sync(built: Path, target: Path) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    changed = False
    names = {wheel.name for wheel in built.glob("*.whl")}
    for stale in target.glob("*.whl"):
        if stale.name not in names:
            stale.unlink()
            changed = True
    for wheel in sorted(built.glob("*.whl")):
        destination = target / wheel.name
        if not destination.exists() or not filecmp.cmp(wheel, destination, shallow=False):
            wheel.replace(destination)
            changed = True
    return changed


def write_pins(wheelhouse: Path) -> bool:
    """requirements.txt with every wheel's exact version, so an install matches the wheelhouse exactly."""
    pins = sorted("==".join(wheel.name.split("-")[:2]) for wheel in wheelhouse.glob("*.whl"))
    target = wheelhouse / "requirements.txt"
    text = "".join(f"{pin}\n" for pin in pins)
    if target.exists() and target.read_text() == text:
        return False
    target.write_text(text)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the app's directory (with pyproject.toml)")
    parser.add_argument("--wheelhouse", type=Path, required=True, help="directory that receives the wheels")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose environment pins versions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cellfleet-wheelhouse-") as scratch_name:
        scratch = Path(scratch_name)
        copy = scratch / "app"
        subprocess.run(["cp", "-r", str(args.source.resolve()), str(copy)], check=True)
        for leftover in ("build", "src/cellfleet_cellserver.egg-info"):
            subprocess.run(["rm", "-rf", str(copy / leftover)], check=True)
        build(copy, scratch, args.python, source_date_epoch(args.source))
        changed = sync(scratch / "wheels", args.wheelhouse)
    changed = write_pins(args.wheelhouse) or changed
    wheels = sorted(wheel.name for wheel in args.wheelhouse.glob("*.whl"))
    app_wheel = next((name for name in wheels if name.startswith(APP_DISTRIBUTION + "-")), "")
    print(json.dumps({"changed": changed, "wheels": wheels, "app_wheel": app_wheel}))


if __name__ == "__main__":
    main()
