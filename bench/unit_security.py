#!/usr/bin/env python3
"""`systemd-analyze security` exposure of each cellfleet service on the running lab (lower is better).

Prints one line per unit and writes bench/results/unit_security.json. Run with `make unit-security`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from labkit.lab import ssh

PROJECT_ROOT = Path(__file__).resolve().parent.parent

RESULTS = PROJECT_ROOT / "bench" / "results" / "unit_security.json"
UNITS = {
    "10.77.0.12": ["cellserver.service", "cellfleet-kernel-provider.service", "nginx.service"],
    "10.77.0.14": ["cellfleet-permalinks.service"],
    "10.77.0.11": ["haproxy.service"],
}
EXPOSURE = re.compile(r"Overall exposure level for \S+: ([0-9.]+) (\S+)")


def exposure(address: str, unit: str) -> tuple[float, str]:
    output = ssh(address, f"systemd-analyze security --no-pager {unit}", check=False, timeout=300)
    found = EXPOSURE.search(output)
    if not found:
        raise RuntimeError(f"{unit} on {address}: no exposure level in the output")
    return float(found.group(1)), found.group(2)


def main() -> None:
    results = {}
    print(f"{'unit':38} {'exposure':>8}  level   (systemd-analyze security; 0 safest, 10 unconfined)")
    for address, units in UNITS.items():
        for unit in units:
            score, level = exposure(address, unit)
            results[unit] = {"exposure": score, "level": level}
            print(f"{unit:38} {score:8.1f}  {level}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
