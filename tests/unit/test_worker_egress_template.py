"""The worker pool's egress ruleset, rendered with and without an allowlist and checked by nft itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from labkit import roles
from test_base_firewall import nft_check

ROLE = Path(__file__).resolve().parents[2] / "roles/worker_pool"


def render(**overrides: Any) -> str:
    variables = dict(roles.defaults_of("worker_pool"))
    variables.update(ansible_managed="managed", **overrides)
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True)
    template = ROLE / "templates/etc/nftables.d/cellfleet-worker-egress.nft.j2"
    return environment.from_string(template.read_text()).render(variables)


def worker_chain(ruleset: str) -> list[str]:
    lines = ruleset.split("chain worker {", 1)[1].split("}", 1)[0].splitlines()
    return [line.strip() for line in lines if line.strip()]


def test_default_drops_everything_a_worker_sends(tmp_path: Path) -> None:
    ruleset = render(worker_pool_size=8)  # the default size is computed from the host's memory
    assert "meta skuid 20001-20008 jump worker" in ruleset
    assert "meta skgid 20000 jump worker" in ruleset
    assert worker_chain(ruleset)[-1] == "counter drop"
    assert not [line for line in worker_chain(ruleset) if "accept" in line]
    assert nft_check(tmp_path, ruleset).returncode == 0


def test_allowlist_and_loopback_come_before_the_drop(tmp_path: Path) -> None:
    ruleset = render(
        worker_pool_size=8,
        worker_pool_egress_allow_loopback=True,
        worker_pool_egress_allowlist=[
            {"address": "10.0.0.0/8", "port": 5432, "protocol": "tcp"},
            {"address": "2001:db8::/32", "port": 53, "protocol": "udp"},
        ],
    )
    chain = worker_chain(ruleset)
    assert chain[:3] == [
        'oifname "lo" accept comment "loopback allowed"',
        "ip daddr 10.0.0.0/8 tcp dport 5432 accept",
        "ip6 daddr 2001:db8::/32 udp dport 53 accept",
    ]
    assert chain[-1] == "counter drop"
    assert nft_check(tmp_path, ruleset).returncode == 0


def test_pool_size_moves_the_uid_range(tmp_path: Path) -> None:
    ruleset = render(worker_pool_size=3, worker_pool_first_uid=30001)
    assert "meta skuid 30001-30003 jump worker" in ruleset
    assert nft_check(tmp_path, ruleset).returncode == 0
