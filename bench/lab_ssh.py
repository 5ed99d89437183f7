"""Commands on the lab's VMs from this machine, through the lab namespace, for the benchmarks."""

from __future__ import annotations

import subprocess

SSH_KEY = "/var/lib/cellfleet/lab/ssh/id_ed25519"
NETNS = "cellfleet"


def ssh(address: str, command: str, *arguments: str, check: bool = True, timeout: float = 1800) -> str:
    """Standard output of command (with arguments) run as root on the lab VM at address."""
    argv = [
        "ssh", "-q", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", f"ProxyCommand=ip netns exec {NETNS} nc %h %p", "-i", SSH_KEY, f"root@{address}", command, *arguments,
    ]  # fmt: skip
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout).stdout
