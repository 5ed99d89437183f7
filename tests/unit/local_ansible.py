"""Running this checkout's Ansible on this machine from a unit test: the playbook command and its environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")


def ansible_environment(**settings: str) -> dict[str, str]:
    """The caller's environment with the project's ansible.cfg, plain output and the linear strategy (a strategy
    plugin path set for the lab does not apply to a local run); settings add ANSIBLE_* variables."""
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "false",
        "ANSIBLE_STRATEGY": "linear",
        **settings,
    }
    env.pop("ANSIBLE_STRATEGY_PLUGINS", None)
    return env
