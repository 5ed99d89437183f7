"""Each role's defaults/main.yml and meta/argument_specs.yml describe the same variables, the same way."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROLES_DIR = Path(__file__).resolve().parents[2] / "roles"
ROLES = sorted(p.parent.parent.name for p in ROLES_DIR.glob("*/meta/argument_specs.yml"))


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) or {}


def spec_options(role: str) -> dict[str, dict[str, Any]]:
    """Options of every entry point of the role."""
    specs = load(ROLES_DIR / role / "meta/argument_specs.yml")["argument_specs"]
    options: dict[str, dict[str, Any]] = {}
    for entry in specs.values():
        options.update(entry.get("options") or {})
    return options


def test_every_role_has_argument_specs() -> None:
    roles = sorted(p.name for p in ROLES_DIR.iterdir() if (p / "tasks/main.yml").exists())
    assert roles == ROLES


@pytest.mark.parametrize("role", ROLES)
def test_every_default_is_specified_with_the_same_value(role: str) -> None:
    defaults = load(ROLES_DIR / role / "defaults/main.yml")
    options = spec_options(role)
    for name, value in defaults.items():
        assert name in options, f"{role}: {name} is in defaults but not in argument_specs"
        is_template = isinstance(value, str) and "{{" in value
        if "default" in options[name] or not is_template:
            assert options[name].get("default") == value, f"{role}: default of {name} differs from the spec"


@pytest.mark.parametrize("role", ROLES)
def test_every_variable_carries_the_role_prefix(role: str) -> None:
    for name in spec_options(role):
        assert name.startswith(f"{role}_"), f"{role}: {name} lacks the prefix {role}_"
    for family in ("Debian", "RedHat"):
        vars_file = ROLES_DIR / role / "vars" / f"{family}.yml"
        for name in load(vars_file) if vars_file.exists() else {}:
            assert name.startswith(f"__{role}_"), f"{role}: internal {name} should be __{role}_..."


@pytest.mark.parametrize("role", ROLES)
def test_every_default_has_a_comment_above_it(role: str) -> None:
    lines = (ROLES_DIR / role / "defaults/main.yml").read_text().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^[a-z_][a-z0-9_]*:", line):
            assert index > 0 and lines[index - 1].startswith("#"), f"{role}: {line.split(':')[0]} has no comment"


@pytest.mark.parametrize("role", [r for r in ROLES if (ROLES_DIR / r / "vars").is_dir()])
def test_both_os_families_define_the_same_internals(role: str) -> None:
    debian = set(load(ROLES_DIR / role / "vars/Debian.yml"))
    redhat = set(load(ROLES_DIR / role / "vars/RedHat.yml"))
    assert debian == redhat, f"{role}: only one family defines {debian ^ redhat}"
