"""Every typed input of every role, given a value of the wrong kind, is refused before any change.

For each role, one run gives every option it can type-check a wrong value at once (a word for a number or a
boolean, a mapping for a list, a list for a mapping, a word outside the choices, a wrong element in a typed
list): the run must fail, name every one of those options, and change nothing. Options typed `str` or
`path` accept anything that converts to text, so only their `choices` can be broken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_role_inputs import run_role

ROLES_DIR = Path(__file__).resolve().parents[2] / "roles"
ROLES = sorted(path.name for path in ROLES_DIR.iterdir() if (path / "meta" / "argument_specs.yml").is_file())
WRONG_BY_TYPE: dict[str, Any] = {
    "int": "not-a-number",
    "float": "not-a-number",
    "bool": "perhaps",
    "list": {"not": "a list"},
    "dict": ["not", "a mapping"],
}
# How Ansible's argument validator words each refusal.
COMPLAINTS = ("unable to convert", "must be one of", "must be one or more of", "Elements value for option")
WRONG_ELEMENT: dict[str, Any] = {"int": ["not-a-number"], "bool": ["perhaps"], "dict": [["not a mapping"]]}


def wrong_value(option: dict[str, Any]) -> Any | None:
    """A value of the wrong kind for this option, or None when any value converts (untyped text)."""
    if "choices" in option:
        return "not-one-of-the-choices"
    kind = option.get("type", "str")
    if kind == "list" and option.get("elements") in WRONG_ELEMENT:
        return WRONG_ELEMENT[option["elements"]]
    return WRONG_BY_TYPE.get(kind)


def main_options(role: str) -> dict[str, Any]:
    specs = yaml.safe_load((ROLES_DIR / role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    return specs["main"].get("options", {})


def wrong_inputs(role: str) -> dict[str, Any]:
    options = main_options(role)
    wrong = {name: wrong_value(option) for name, option in options.items()}
    return {name: value for name, value in wrong.items() if value is not None}


def test_every_role_has_inputs_that_can_be_wrong() -> None:
    assert sum(len(wrong_inputs(role)) for role in ROLES) > 60


@pytest.mark.parametrize("role", ROLES)
def test_each_wrong_input_is_named_and_nothing_changes(tmp_path: Path, role: str) -> None:
    wrong = wrong_inputs(role)
    if not wrong:
        pytest.skip(f"{role} has no input that can be of the wrong kind")
    result = run_role(tmp_path, role, wrong)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "changed=0" in result.stdout
    # Only the validator's complaints count: the output also dumps the whole spec, which names everything.
    complaints = [line for line in result.stdout.splitlines() if any(mark in line for mark in COMPLAINTS)]
    unnamed = [name for name in wrong if not any(name in line for line in complaints)]
    assert unnamed == [], f"{role}: refused, but the message does not name {unnamed}:\n{result.stdout[-3000:]}"


def numbers_as_text(role: str) -> dict[str, str]:
    """Every int option with a default, given as text: what `-e name=value` on the command line passes."""
    options = main_options(role)
    return {name: str(option["default"]) for name, option in options.items()
            if option.get("type") == "int" and "default" in option}  # fmt: skip


# What a run on localhost needs besides the defaults: groups that hold it, its own mesh address.
LOCALHOST_CONTEXT: dict[str, dict[str, str]] = {
    "haproxy": {"haproxy_cells_group": "all"},
    "private_network": {
        "private_network_address": "10.78.0.1",
        "private_network_group": "all",
        "ansible_host": "127.0.0.1",
    },
    "rsyslog": {"rsyslog_servers_group": "all"},
}


@pytest.mark.parametrize("role", [role for role in ROLES if numbers_as_text(role)])
def test_numbers_given_as_text_are_accepted(tmp_path: Path, role: str) -> None:
    # The argument spec converts them for its check only: the role's own checks compared the text with numbers
    # and failed with a template error (`-e haproxy_rate_limit_per_ip=6`).
    result = run_role(tmp_path, role, numbers_as_text(role) | LOCALHOST_CONTEXT.get(role, {}))
    assert result.returncode == 0, result.stdout[-3000:]
