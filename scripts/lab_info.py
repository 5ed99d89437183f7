#!/usr/bin/env python3
"""Print where the lab's VMs are and how to reach them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SSH_KEY = "/var/lib/cellfleet/lab/ssh/id_ed25519"
NETNS = os.environ.get("CELLFLEET_NETNS", "cellfleet")


def host_groups(inventory: dict) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for group, data in inventory.items():
        if group in ("_meta", "all", "ungrouped") or not isinstance(data, dict):
            continue
        for host in data.get("hosts", []):
            groups.setdefault(host, []).append(group)
    return groups


def main(argv: list[str]) -> int:
    inventory_path = argv[1] if len(argv) > 1 else "inventory/lab/hosts.yml"
    ansible_inventory = str(Path(sys.executable).parent / "ansible-inventory")
    listing = subprocess.run(
        [ansible_inventory, "-i", inventory_path, "--list"], check=True, capture_output=True, text=True
    ).stdout
    inventory = json.loads(listing)
    hostvars = inventory["_meta"]["hostvars"]
    groups = host_groups(inventory)
    print(f"\ncellfleet lab is up (namespace '{NETNS}'; the VMs are reachable only through it):")
    for host in sorted(hostvars):
        address = hostvars[host].get("ansible_host", "?")
        print(f"  {host:8} {address:12} {' '.join(sorted(groups.get(host, [])))}")
    print(
        f"""
  ssh        ssh -i {SSH_KEY} -o ProxyCommand='ip netns exec {NETNS} nc %h %p' root@<address>
  ansible    .venv/bin/ansible all -m ansible.builtin.ping
  https      https://127.0.0.1:8443/ (forwarded to port 443 of the first load balancer)
  consoles   /var/lib/cellfleet/lab/logs/<vm>.console.log
  tear down  make down"""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
