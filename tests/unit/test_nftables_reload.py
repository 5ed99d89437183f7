"""What a reload of nftables leaves running: the base ruleset and the worker egress table are loaded, changed and
loaded again inside a throwaway network namespace, and only the new rules remain. A reload that appended
instead would keep a closed port open and a shrunk pool's uid range matched until the next reboot."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_worker_egress_template import render as render_egress

from test_base_firewall import render as render_base

IP = shutil.which("ip")
NFT = shutil.which("nft")


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0 or IP is None or NFT is None:
        if os.environ.get("CI"):
            pytest.fail("loading rulesets needs root, ip and nft (make host-deps)")
        pytest.skip("loading rulesets needs root, ip and nft")
    name = f"cellfleet-nft-{uuid.uuid4().hex[:8]}"
    subprocess.run([IP, "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run([IP, "netns", "delete", name], check=True)


def load(namespace: str, tmp_path: Path, opened: list[dict], pool_size: int) -> str:
    """Write both files as the roles would, load the base file as `systemctl reload nftables` does, and return
    the namespace's running ruleset."""
    include_dir = tmp_path / "nftables.d"
    include_dir.mkdir(exist_ok=True)
    (include_dir / "cellfleet-worker-egress.nft").write_text(render_egress(worker_pool_size=pool_size))
    render_base(tmp_path, opened)
    base = tmp_path / "nftables.conf"
    subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", str(base)], check=True)
    listed = subprocess.run(["ip", "netns", "exec", namespace, "nft", "list", "ruleset"], check=True,
                            capture_output=True, text=True)  # fmt: skip
    return listed.stdout


def test_a_reload_replaces_the_running_rules_instead_of_adding_to_them(namespace: str, tmp_path: Path) -> None:
    first = load(namespace, tmp_path, [{"port": 443, "proto": "tcp", "comment": "https"}], pool_size=8)
    assert "tcp dport 443 accept" in first and "meta skuid 20001-20008 jump worker" in first
    second = load(namespace, tmp_path, [], pool_size=7)
    assert "dport 443" not in second, "a port closed in the inventory stays open after the reload"
    assert "20001-20008" not in second, "the removed worker's uid range is still matched"
    assert second.count("meta skuid 20001-20007 jump worker") == 1
    assert second.count("counter packets") == 1, second


def test_the_egress_file_loaded_alone_replaces_its_table(namespace: str, tmp_path: Path) -> None:
    load(namespace, tmp_path, [], pool_size=8)
    egress = tmp_path / "alone.nft"
    egress.write_text(render_egress(worker_pool_size=7))
    subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", str(egress)], check=True)
    listed = subprocess.run(["ip", "netns", "exec", namespace, "nft", "list", "table", "inet",
                             "cellfleet_worker_egress"], check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert "20001-20008" not in listed and listed.count("jump worker") == 2, listed
