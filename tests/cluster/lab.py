"""The running lab as the cluster tests see it: SSH to its VMs, the load balancer's runtime API, playbooks."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = ROOT / "inventory" / "lab" / "hosts.yml"
SSH_KEY = "/var/lib/cellfleet/lab/ssh/id_ed25519"
LOAD_BALANCER = "10.77.0.11"
CELLS = {"cell1": "10.77.0.12", "cell2": "10.77.0.13"}
LAB_BRIDGE = "10.77.0.1"
LIBVIRT = "qemu:///system"


def ssh(address: str, command: str, timeout: float = 300) -> str:
    arguments = [
        "ssh", "-q", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=20", "-o", "ProxyCommand=ip netns exec cellfleet nc %h %p", "-i", SSH_KEY,
        f"root@{address}", command,
    ]  # fmt: skip
    return subprocess.run(arguments, check=True, capture_output=True, text=True, timeout=timeout).stdout


def admin(command: str) -> str:
    return ssh(LOAD_BALANCER, f"echo {shlex.quote(command)} | socat stdio unix-connect:/run/haproxy/admin.sock")


def server_stats(server: str, backend: str = "cells") -> dict[str, str] | None:
    """One server's row of the runtime API's CSV statistics, by column name; None when it has no such server."""
    lines = admin("show stat").splitlines()
    columns = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        fields = line.split(",")
        if fields[:2] == [backend, server]:
            return dict(zip(columns, fields, strict=False))
    return None


def server_state(server: str) -> str:
    stats = server_stats(server)
    assert stats is not None, f"cells/{server} not in the load balancer's stats"
    return stats["status"]


def playbook(name: str, *extra: str, inventories: tuple[Path, ...] = (INVENTORY,)) -> subprocess.CompletedProcess[str]:
    """ansible-playbook against the lab with the Makefile's settings; the output is kept for the report."""
    binary = Path(sys.executable).with_name("ansible-playbook")
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "false"}
    sources = [argument for inventory in inventories for argument in ("-i", str(inventory))]
    command = [str(binary), *sources, str(ROOT / "playbooks" / name), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600, check=False)


def virsh(*arguments: str) -> str:
    return subprocess.run(["virsh", "-c", LIBVIRT, *arguments], check=True, capture_output=True, text=True).stdout
