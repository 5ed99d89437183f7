"""Every role's templates rendered for EL9 hosts, by Ansible itself: the role's defaults, vars/main.yml and
vars/RedHat.yml, the lab inventory's group variables, and EL9 facts (Rocky 9, Python 3.9). No EL9 machine
can be fetched here; this is what shows the RedHat side renders at all, and renders EL paths and names.

Each rendered file is then checked with what this machine has: nft -c for nftables, logrotate's parser,
TOML, JSON and XML parsers, systemd's unit-file grammar, EL paths and accounts present and Debian's absent
(the same roles rendered for Debian must show Debian's, or that probe is blind). Not checked here: haproxy
-c, nginx -t, rsyslogd -N1 and sshd -t of the EL files (none of those programs is on this machine, and the
lab's are Debian's builds, which refuse EL accounts such as nginx).
"""

from __future__ import annotations

import configparser
import json
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from site_render import ROLE_HOSTS, render, rendered_files, rendered_names, templates_of

# Names that exist only on Debian (from the roles' vars/Debian.yml, where a template uses them): an EL9 file
# naming one was rendered with Debian's values. The Debian rendering must show them, or the probe is blind.
DEBIAN_ONLY = ["/usr/lib/openssh/sftp-server", "user www-data;", "/usr/lib/rsyslog/rsyslog-rotate", "initrc_t"]
EL_ONLY = ["/usr/libexec/openssh/sftp-server", "user nginx;", "systemctl kill -s HUP rsyslog", "unconfined_service_t"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("el9"), "RedHat")


@pytest.fixture(scope="module")
def rendered_for_debian(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("debian"), "Debian")


def names_in(output: Path, names: list[str]) -> set[str]:
    texts = [path.read_text() for path in rendered_files(output)]
    return {name for name in names if any(name in text for text in texts)}


def test_every_template_of_every_role_renders_for_el9(rendered: Path) -> None:
    for role, hosts in ROLE_HOSTS.items():
        for host in hosts:
            names = sorted(path.name for path in (rendered / host / role).glob("*")) if templates_of(role) else []
            assert names == rendered_names(role), (role, host)


def test_el9_files_name_el_paths_and_accounts_and_no_debian_ones(rendered: Path, rendered_for_debian: Path) -> None:
    assert names_in(rendered_for_debian, DEBIAN_ONLY) == set(DEBIAN_ONLY), "the probe no longer sees Debian's names"
    assert names_in(rendered, DEBIAN_ONLY) == set()
    assert names_in(rendered, EL_ONLY) == set(EL_ONLY)


def test_el9_nftables_rules_parse(rendered: Path, tmp_path: Path) -> None:
    # Each host's ruleset as nftables loads it: the base file, then what its include directory would hold (the
    # openings of every role the host runs, the workers' egress rules).
    hosts = sorted(path.parent.parent.name for path in rendered.glob("*/base/etc__nftables.conf.j2"))
    assert hosts == ["cell1", "data1", "lb1"]
    for host in hosts:
        base = (rendered / host / "base" / "etc__nftables.conf.j2").read_text()
        included = sorted((rendered / host).glob("*/etc__nftables.d__*.nft.j2"))
        assert len(included) >= 2, included  # the inventory's openings and at least one service's
        text = base.replace("include ", "# include ") + "".join(path.read_text() for path in included)
        checked = tmp_path / f"{host}.nft"
        checked.write_text(text)
        result = subprocess.run(["nft", "-c", "-f", str(checked)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, (host, result.stderr)


def test_el9_unit_files_are_well_formed(rendered: Path) -> None:
    units = [path for path in rendered_files(rendered) if path.name.endswith((".service.j2", ".timer.j2", ".slice.j2"))]
    units += [path for path in rendered_files(rendered, ".conf.j2") if "system__" in path.name]
    assert units
    for path in units:
        parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(path.read_text(), source=path.name)
        assert parser.sections(), path.name
        for section in parser.sections():
            assert section in {"Unit", "Service", "Timer", "Slice", "Install"}, (path.name, section)
        for command in ("ExecStart", "ExecStartPre", "ExecReload"):
            for section in parser.sections():
                value = parser[section].get(command, "").lstrip("-+!@:")
                assert not value or value.startswith("/") or value.startswith("$"), (path.name, command, value)


def test_el9_structured_files_parse(rendered: Path) -> None:
    assert len(rendered_files(rendered, ".toml.j2") + rendered_files(rendered, ".json.j2")) == 2
    assert len(rendered_files(rendered, ".xml.j2")) == 2
    for path in rendered_files(rendered, ".toml.j2"):
        tomllib.loads(path.read_text())
    for path in rendered_files(rendered, ".json.j2"):
        json.loads(path.read_text())
    for path in rendered_files(rendered, ".xml.j2"):
        ET.fromstring(path.read_text())


def test_el9_logrotate_configuration_parses(rendered: Path, tmp_path: Path) -> None:
    configurations = [path for path in rendered_files(rendered) if "logrotate.d" in path.name]
    assert configurations
    for path in configurations:
        state = tmp_path / "state"
        result = subprocess.run(["logrotate", "--debug", "--state", str(state), str(path)],
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert "error" not in result.stderr.lower(), (path.name, result.stderr)
