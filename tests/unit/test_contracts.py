"""One source per contract: the whole site rendered with other shared ports and paths than the defaults, and
every file that names one of them names the new value and never the default.

The shared values live in roles/cellfleet/defaults/main.yml; a template or a role default that writes one of
them as a literal again keeps the default here and fails this test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from site_render import render, rendered_files

from labkit import roles

SHARED = roles.defaults_of("cellfleet")
OTHER_VALUES = {
    "cellfleet_cell_port": 9788,
    "cellfleet_cells_http_port": 9780,
    "cellfleet_permalink_port": 9789,
    "cellfleet_kernel_runtime_dir": "/run/contract-test-kernels",
    "cellfleet_worker_home_base": "/srv/contract-homes",
    "cellfleet_peer_address_var": "contract_peer_address",
    "cellfleet_peer_interface": "wgcontract",
    "cellfleet_computation_seconds": 71,
    "cellfleet_kernel_start_seconds": 37,
}
# Shared values the others give when the inventory leaves them out: the computation, two kernel starts and 10 s.
DERIVED = {"cellfleet_answer_seconds": 71 + 2 * 37 + 10}
GIVEN_OR_DERIVED = {**OTHER_VALUES, **DERIVED}
# What a file that reads a shared value shows of it, where that is not the value itself: a host variable's name
# shows as the address it holds (every host gets this one, as an extra variable).
SHOWN_AS = {"cellfleet_peer_address_var": "10.99.0.7"}
# Durations show with their unit; the load balancer waits a little longer than nginx on the cell, so nginx
# answers a stuck cell server first.
NGINX = "cell1/nginx/etc__nginx__nginx.conf.j2"
HAPROXY = "lb1/haproxy/etc__haproxy__haproxy.cfg.j2"
SHOWN_IN = {
    (NGINX, "cellfleet_answer_seconds"): f"{DERIVED['cellfleet_answer_seconds']}s",
    (HAPROXY, "cellfleet_answer_seconds"): f"{DERIVED['cellfleet_answer_seconds'] + 5}s",
}
# host/role/template (slashes as __) -> the shared values it must name: each contract's writer and readers.
NAMED_IN = {
    "cell1/cell_server/etc__cellserver__cellserver.toml.j2": [
        "cellfleet_cell_port",
        "cellfleet_permalink_port",
        "cellfleet_peer_address_var",
        "cellfleet_computation_seconds",
        "cellfleet_kernel_start_seconds",
    ],
    "cell1/cell_server/etc__systemd__system__cellfleet-cell-health.service.j2": ["cellfleet_cell_port"],
    "cell1/cell_server/etc__systemd__system__cellfleet-kernel-provider.service.j2": [
        "cellfleet_kernel_runtime_dir",
        "cellfleet_worker_home_base",
    ],
    "cell1/worker_pool/etc__selinux__cellfleet_worker_pool.cil.j2": ["cellfleet_kernel_runtime_dir"],
    "cell1/worker_pool/etc__cellfleet__worker-pool.json.j2": ["cellfleet_worker_home_base"],
    "cell1/nginx/etc__nginx__nginx.conf.j2": [
        "cellfleet_cell_port",
        "cellfleet_cells_http_port",
        "cellfleet_answer_seconds",
    ],
    "cell1/nginx/etc__nftables.d__cellfleet-open.nft.j2": [
        "cellfleet_cells_http_port",
        "cellfleet_peer_address_var",
        "cellfleet_peer_interface",
    ],
    "cell1/rsyslog/etc__rsyslog.d__20-cellfleet-forward.conf.j2": ["cellfleet_peer_address_var"],
    "lb1/haproxy/etc__haproxy__haproxy.cfg.j2": [
        "cellfleet_cells_http_port",
        "cellfleet_permalink_port",
        "cellfleet_peer_address_var",
        "cellfleet_answer_seconds",
    ],
    "data1/permalink_db/etc__systemd__system__cellfleet-permalinks.service.j2": ["cellfleet_permalink_port"],
    "data1/permalink_db/etc__nftables.d__cellfleet-open.nft.j2": [
        "cellfleet_permalink_port",
        "cellfleet_peer_address_var",
        "cellfleet_peer_interface",
    ],
}
# Defaults distinctive enough to search every rendered file for (port 80 is also the load balancers' own).
DISTINCTIVE = ["cellfleet_cell_port", "cellfleet_permalink_port", "cellfleet_kernel_runtime_dir"]


def mention(value: object) -> re.Pattern[str]:
    """A value as a whole word: 9788 is not found in 197880, /run/x not in /run/xy."""
    return re.compile(rf"(?<![\w/.-]){re.escape(str(value))}(?![\w.-])")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shown = {OTHER_VALUES["cellfleet_peer_address_var"]: SHOWN_AS["cellfleet_peer_address_var"]}
    return render(tmp_path_factory.mktemp("contracts"), "Debian", {**OTHER_VALUES, **shown})


def test_the_other_values_differ_from_the_defaults() -> None:
    assert set(GIVEN_OR_DERIVED) == set(SHARED)
    assert all(GIVEN_OR_DERIVED[name] != SHARED[name] for name in SHARED)


@pytest.mark.parametrize("file", sorted(NAMED_IN))
def test_every_writer_and_reader_names_the_shared_value_it_was_given(rendered: Path, file: str) -> None:
    text = (rendered / file).read_text()
    for name in NAMED_IN[file]:
        shown = str(SHOWN_IN.get((file, name), SHOWN_AS.get(name, GIVEN_OR_DERIVED[name])))
        # An address shows inside a URL too (http://10.99.0.7:...), so it is only kept apart from other digits.
        pattern = re.compile(rf"(?<![\d.]){re.escape(shown)}(?![\d])") if name in SHOWN_AS else mention(shown)
        assert pattern.search(text), f"{file} does not name {name} = {GIVEN_OR_DERIVED[name]} ({shown})"


def test_no_rendered_file_names_a_default_it_was_not_given(rendered: Path) -> None:
    files = rendered_files(rendered)
    assert len(files) > 30
    found = [
        f"{path.relative_to(rendered)}: {SHARED[name]}"
        for path in files
        for name in DISTINCTIVE
        if mention(SHARED[name]).search(path.read_text())
    ]
    assert found == []
