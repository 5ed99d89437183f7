"""The base role's nftables template, rendered for edge cases and checked by nft itself."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
from ansible.plugins.filter.core import FilterModule
from ansible.plugins.filter.mathstuff import FilterModule as MathFilters
from ansible.plugins.test.core import TestModule as AnsibleTests

from labkit import roles

ROLE = Path(__file__).resolve().parents[2] / "roles/base"
OPENINGS = "etc/nftables.d/cellfleet-open.nft.j2"
NFT = shutil.which("nft")


def environment() -> jinja2.Environment:
    # Ansible renders templates with trim_blocks on and keeps the final newline; do the same.
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True)
    # Add the Ansible tests and filters Jinja lacks; Ansible's own versions of Jinja built-ins assume its templar.
    env.tests.update({k: v for k, v in AnsibleTests().tests().items() if k not in env.tests})
    for filters in (FilterModule().filters(), MathFilters().filters()):
        env.filters.update({k: v for k, v in filters.items() if k not in env.filters})
    return env


def role_variables(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    variables = {**roles.defaults_of("base"), **roles.defaults_of("cellfleet")}
    variables.update(ansible_managed="managed", base_nftables_include_dir=str(tmp_path / "nftables.d"), **overrides)
    return variables


def render_opening(tmp_path: Path, name: str, rules: list[dict[str, Any]], **overrides: Any) -> str:
    """The file the base role's `open` entry point writes for name, written to the include directory."""
    variables = role_variables(tmp_path, base_open_name=name, base_open_rules=rules, **overrides)
    text = environment().from_string((ROLE / "templates" / OPENINGS).read_text()).render(variables)
    (tmp_path / "nftables.d").mkdir(exist_ok=True)
    (tmp_path / "nftables.d" / f"cellfleet-open-{name}.nft").write_text(text)
    return text


def render(tmp_path: Path, rules: list[dict[str, Any]], **overrides: Any) -> str:
    """The base ruleset with the inventory's rules as the role writes them (tmp_path/nftables.conf and its
    include directory); both files' text."""
    opening = render_opening(tmp_path, "inventory", rules, **overrides)
    variables = role_variables(tmp_path, **overrides)
    ruleset = environment().from_string((ROLE / "templates/etc/nftables.conf.j2").read_text()).render(variables)
    (tmp_path / "nftables.conf").write_text(ruleset)
    return ruleset + opening


def accept_lines(ruleset: str) -> list[str]:
    """The rules that open a service port (the fixed DHCP-reply rule aside)."""
    return [line.strip() for line in ruleset.splitlines() if "dport" in line and "DHCP replies" not in line]


def nft_check(tmp_path: Path, ruleset: str | None = None) -> subprocess.CompletedProcess[str]:
    """nft -c of ruleset, or of the base ruleset render wrote (with what its include directory holds)."""
    if NFT is None:
        pytest.fail("nft is missing: run `make host-deps`")
    path = tmp_path / "nftables.conf"
    if ruleset is not None:
        path = tmp_path / "checked.nft"
        path.write_text(ruleset)
    return subprocess.run([NFT, "-c", "-f", str(path)], capture_output=True, text=True, check=False)


def test_default_ruleset_opens_only_ssh_and_is_valid(tmp_path: Path) -> None:
    ruleset = render(tmp_path, [])
    assert accept_lines(ruleset) == ['tcp dport 22 accept comment "ssh"']
    assert "policy drop;" in ruleset
    assert nft_check(tmp_path).returncode == 0


def test_rule_without_sources_is_open_to_any_source(tmp_path: Path) -> None:
    ruleset = render(tmp_path, [{"port": 443, "proto": "tcp", "comment": "https"}])
    assert 'tcp dport 443 accept comment "https"' in accept_lines(ruleset)
    assert nft_check(tmp_path).returncode == 0


def test_rule_with_an_empty_source_list_lets_nobody_in(tmp_path: Path) -> None:
    ruleset = render(tmp_path, [{"port": 80, "sources": [], "comment": "backend"}])
    assert not any("dport 80" in line for line in accept_lines(ruleset))
    assert nft_check(tmp_path).returncode == 0


def test_mixed_families_get_one_line_each(tmp_path: Path) -> None:
    rule = {"port": 2514, "proto": "tcp", "sources": ["10.0.0.0/24", "fd00::/64"], "interface": "wg0"}
    lines = [line for line in accept_lines(render(tmp_path, [rule])) if "2514" in line]
    assert lines == [
        'iifname "wg0" ip saddr { 10.0.0.0/24 } tcp dport 2514 accept comment ""',
        'iifname "wg0" ip6 saddr { fd00::/64 } tcp dport 2514 accept comment ""',
    ]
    assert nft_check(tmp_path).returncode == 0


def test_ssh_sources_restrict_ssh(tmp_path: Path) -> None:
    ruleset = render(tmp_path, [], base_ssh_sources=["192.0.2.0/24"], base_ssh_port=2222)
    assert accept_lines(ruleset) == ['ip saddr { 192.0.2.0/24 } tcp dport 2222 accept comment "ssh"']
    assert nft_check(tmp_path).returncode == 0


def test_nft_refuses_what_the_role_must_never_install(tmp_path: Path) -> None:
    # The role's `validate: nft -c` is the last guard; prove it bites on a bad address.
    render(tmp_path, [{"port": 80, "sources": ["10.0.0.300/24"]}])
    result = nft_check(tmp_path)
    assert result.returncode != 0 and "10.0.0.300" in result.stderr


def test_a_service_opens_its_port_to_its_client_groups_on_the_peer_interface(tmp_path: Path) -> None:
    hosts = ["lb1", "cell1", "cell2"]
    peers = {
        "groups": {"all": hosts, "loadbalancers": ["lb1"], "cells": ["cell1", "cell2"]},
        "hostvars": {host: {"private_network_address": f"10.78.0.{n}"} for n, host in enumerate(hosts, 11)},
        "cellfleet_peer_address_var": "private_network_address",
        "cellfleet_peer_interface": "wg0",
    }  # fmt: skip
    render(tmp_path, [], **peers)
    rule = {"port": 80, "from_groups": ["loadbalancers", "cells", "not_in_this_inventory"], "comment": "backend"}
    opening = render_opening(tmp_path, "nginx", [rule], **peers)
    assert accept_lines(opening) == [
        'iifname "wg0" ip saddr { 10.78.0.11/32, 10.78.0.12/32, 10.78.0.13/32 } tcp dport 80 accept comment "backend"'
    ]
    assert nft_check(tmp_path).returncode == 0
    nobody = render_opening(tmp_path, "nginx", [{**rule, "from_groups": ["not_in_this_inventory"]}], **peers)
    assert accept_lines(nobody) == []


def test_the_openings_come_after_the_fixed_rules_and_before_the_drop(tmp_path: Path) -> None:
    ruleset = render(tmp_path, [{"port": 443, "comment": "https"}])
    input_chain = ruleset[ruleset.index("chain input") : ruleset.index("chain forward")]
    assert input_chain.index('accept comment "ssh"') < input_chain.index("jump openings")
    assert input_chain.index("jump openings") < input_chain.index("log prefix")
    assert ruleset.index("chain openings") < ruleset.index("chain input"), "jump to a chain not yet declared"
