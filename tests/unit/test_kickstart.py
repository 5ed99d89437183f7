"""The EL9 kickstart: rendered with EL facts and checked against the RHEL9 kickstart grammar."""

from __future__ import annotations

from pathlib import Path

import pytest
from pykickstart.errors import KickstartError as GrammarError
from pykickstart.parser import KickstartParser
from pykickstart.version import RHEL9, makeVersion

from build_image import role_packages
from render_kickstart import KickstartError, render

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ1exampleexampleexampleexampleexampleexample operator@example"
REPO = "https://mirror.example.invalid/9/BaseOS/x86_64/os"


def parse_rhel9(text: str) -> KickstartParser:
    parser = KickstartParser(makeVersion(RHEL9))
    parser.readKickstartFromString(text)
    return parser


def test_rendered_kickstart_is_valid_rhel9() -> None:
    parser = parse_rhel9(render(hostname="cell3", ssh_key=KEY, repo_url=REPO))
    handler = parser.handler
    assert handler.selinux.selinux == 1  # enforcing
    assert handler.rootpw.lock
    assert handler.sshkey.sshUserList[0].username == "root"
    assert handler.sshkey.sshUserList[0].key == KEY
    assert handler.network.network[0].hostname == "cell3"
    root = next(part for part in handler.partition.partitions if part.mountpoint == "/")
    assert "uquota" in root.fsopts and "gquota" in root.fsopts


def test_kickstart_installs_every_package_the_roles_install_on_el() -> None:
    parser = parse_rhel9(render(hostname="cell3", ssh_key=KEY, repo_url=REPO))
    packages = set(parser.handler.packages.packageList)
    expected = set(role_packages(PROJECT_ROOT / "roles", family="RedHat"))
    assert expected and expected <= packages
    assert "firewalld" in parser.handler.packages.excludedList


def test_the_grammar_check_catches_a_broken_kickstart() -> None:
    text = render(hostname="cell3", ssh_key=KEY, repo_url=REPO).replace("selinux --enforcing", "selinux --bogus")
    with pytest.raises(GrammarError):
        parse_rhel9(text)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hostname", "Cell_3", "is not one lowercase DNS label"),
        ("ssh_key", "not a key", "must be one OpenSSH public key line"),
        ("ssh_key", KEY + '"\nrootpw --plaintext x', "must be one OpenSSH public key line"),
        ("repo_url", "mirror.example.invalid/9", "is not an installation source URL"),
    ],
)
def test_bad_input_is_refused(field: str, value: str, message: str) -> None:
    arguments = {"hostname": "cell3", "ssh_key": KEY, "repo_url": REPO, field: value}
    with pytest.raises(KickstartError, match=message):
        render(**arguments)
