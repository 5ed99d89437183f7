"""The base role's nftables template, rendered for edge cases and checked by nft itself."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from ansible.plugins.filter.core import FilterModule
from ansible.plugins.test.core import TestModule as AnsibleTests

ROLE = Path(__file__).resolve().parents[2] / "roles/base"
NFT = shutil.which("nft")


def render(tmp_path: Path, rules: list[dict[str, Any]], **overrides: Any) -> str:
    variables = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    variables.update(
        ansible_managed="managed",
        base_nftables_include_dir=str(tmp_path / "nftables.d"),
        __base_firewall_rules=rules,
        **overrides,
    )
    # Ansible renders templates with trim_blocks on and keeps the final newline; do the same.
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True)
    # Add the Ansible tests and filters Jinja lacks; Ansible's own versions of Jinja built-ins assume its templar.
    environment.tests.update({k: v for k, v in AnsibleTests().tests().items() if k not in environment.tests})
    environment.filters.update({k: v for k, v in FilterModule().filters().items() if k not in environment.filters})
    return environment.from_string((ROLE / "templates/etc/nftables.conf.j2").read_text()).render(variables)


def accept_lines(ruleset: str) -> list[str]:
    """The rules that open a service port (the fixed DHCP-reply rule aside)."""
    return [line.strip() for line in ruleset.splitlines() if "dport" in line and "DHCP replies" not in line]


def nft_check(tmp_path: Path, ruleset: str) -> subprocess.CompletedProcess[str]:
    if NFT is None:
        pytest.fail("nft is missing: run `make host-deps`")
    (tmp_path / "nftables.d").mkdir(exist_ok=True)
    path = tmp_path / "ruleset.nft"
    path.write_text(ruleset)
    return subprocess.run([NFT, "-c", "-f", str(path)], capture_output=True, text=True, check=False)


def test_default_ruleset_opens_only_ssh_and_is_valid(tmp_path: Path) -> None:
    ruleset = render(tmp_path, [])
    assert accept_lines(ruleset) == ['tcp dport 22 accept comment "ssh"']
    assert "policy drop;" in ruleset
    assert nft_check(tmp_path, ruleset).returncode == 0


def test_rule_without_sources_is_open_to_any_source(tmp_path: Path) -> None:
    ruleset = render(tmp_path, [{"port": 443, "proto": "tcp", "comment": "https"}])
    assert 'tcp dport 443 accept comment "https"' in accept_lines(ruleset)
    assert nft_check(tmp_path, ruleset).returncode == 0


def test_rule_with_an_empty_source_list_lets_nobody_in(tmp_path: Path) -> None:
    ruleset = render(tmp_path, [{"port": 80, "sources": [], "comment": "backend"}])
    assert not any("dport 80" in line for line in accept_lines(ruleset))
    assert nft_check(tmp_path, ruleset).returncode == 0


def test_mixed_families_get_one_line_each(tmp_path: Path) -> None:
    rule = {"port": 2514, "proto": "tcp", "sources": ["10.0.0.0/24", "fd00::/64"], "interface": "wg0"}
    lines = [line for line in accept_lines(render(tmp_path, [rule])) if "2514" in line]
    assert lines == [
        'iifname "wg0" ip saddr { 10.0.0.0/24 } tcp dport 2514 accept comment ""',
        'iifname "wg0" ip6 saddr { fd00::/64 } tcp dport 2514 accept comment ""',
    ]
    assert nft_check(tmp_path, render(tmp_path, [rule])).returncode == 0


def test_ssh_sources_restrict_ssh(tmp_path: Path) -> None:
    ruleset = render(tmp_path, [], base_ssh_sources=["192.0.2.0/24"], base_ssh_port=2222)
    assert accept_lines(ruleset) == ['ip saddr { 192.0.2.0/24 } tcp dport 2222 accept comment "ssh"']
    assert nft_check(tmp_path, ruleset).returncode == 0


def test_nft_refuses_what_the_role_must_never_install(tmp_path: Path) -> None:
    # The role's `validate: nft -c` is the last guard; prove it bites on a bad address.
    ruleset = render(tmp_path, [{"port": 80, "sources": ["10.0.0.300/24"]}])
    result = nft_check(tmp_path, ruleset)
    assert result.returncode != 0 and "10.0.0.300" in result.stderr
