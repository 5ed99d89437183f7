#!/usr/bin/env python3
"""Render the EL9 kickstart for a production node (virt-install --initrd-inject).

The package list is derived from the roles' own `vars/RedHat.yml` (`__<role>_packages`), as the Debian
golden image's is from `vars/Debian.yml`, so a kickstarted node already holds what the roles install.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jinja2

from build_image import role_packages

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = PROJECT_ROOT / "templates" / "el9" / "kickstart.cfg.j2"
HOSTNAME_PATTERN = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
SSH_KEY_PATTERN = re.compile(r"^(ssh-ed25519|ecdsa-sha2-nistp\d+|ssh-rsa) [A-Za-z0-9+/=]+( [^\n\"]*)?$")


class KickstartError(ValueError):
    """Input that would produce a broken or unsafe kickstart."""


def render(
    *,
    hostname: str,
    ssh_key: str,
    repo_url: str,
    appstream_url: str = "",
    disk: str = "vda",
    timezone: str = "UTC",
    lang: str = "en_US.UTF-8",
    keymap: str = "us",
    roles_dir: Path = PROJECT_ROOT / "roles",
) -> str:
    if not HOSTNAME_PATTERN.match(hostname):
        raise KickstartError(f"hostname {hostname!r} is not one lowercase DNS label")
    ssh_key = ssh_key.strip()
    if not SSH_KEY_PATTERN.match(ssh_key):
        raise KickstartError("ssh_key must be one OpenSSH public key line")
    if not repo_url.startswith(("http://", "https://", "nfs:", "file:")):
        raise KickstartError(f"repo_url {repo_url!r} is not an installation source URL")
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True
    )
    template = environment.from_string(TEMPLATE.read_text())
    return template.render(
        hostname=hostname,
        ssh_key=ssh_key,
        repo_url=repo_url,
        appstream_url=appstream_url,
        disk=disk,
        timezone=timezone,
        lang=lang,
        keymap=keymap,
        packages=role_packages(roles_dir, family="RedHat"),
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--ssh-key-file", type=Path, required=True, help="public key allowed to log in as root")
    parser.add_argument("--repo-url", required=True, help="BaseOS installation tree of your EL9 mirror")
    parser.add_argument("--appstream-url", default="", help="AppStream repository of the same mirror")
    parser.add_argument("--disk", default="vda")
    parser.add_argument("--timezone", default="UTC")
    args = parser.parse_args(argv)
    try:
        print(
            render(
                hostname=args.hostname,
                ssh_key=args.ssh_key_file.read_text(),
                repo_url=args.repo_url,
                appstream_url=args.appstream_url,
                disk=args.disk,
                timezone=args.timezone,
            ),
            end="",
        )
    except (KickstartError, OSError) as error:
        print(f"render_kickstart: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
