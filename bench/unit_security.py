#!/usr/bin/env python3
"""`systemd-analyze security` exposure of each cellfleet service on the running lab (lower is better).

Prints one line per unit and writes bench/results/unit_security.json. Run with `make unit-security`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from labkit import units
from labkit.lab import CELLS, DATA_HOST, LOAD_BALANCER, ssh

PROJECT_ROOT = Path(__file__).resolve().parent.parent

RESULTS = PROJECT_ROOT / "bench" / "results" / "unit_security.json"
UNITS = {
    CELLS["cell1"]: [units.CELL_SERVER, units.KERNEL_PROVIDER, "nginx.service"],
    DATA_HOST: [units.PERMALINKS],
    LOAD_BALANCER: ["haproxy.service"],
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
    for address, host_units in UNITS.items():
        for unit in host_units:
            score, level = exposure(address, unit)
            results[unit] = {"exposure": score, "level": level}
            print(f"{unit:38} {score:8.1f}  {level}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
