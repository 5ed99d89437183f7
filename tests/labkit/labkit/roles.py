"""The roles' documented defaults, read one way by every test: a test that needs a default reads it here
instead of writing it again, so a changed default changes what the tests expect."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

ROLES = Path(__file__).resolve().parents[3] / "roles"
# A default that is another variable, unchanged: `"{{ cellfleet_cell_port }}"`.
REFERENCE = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@functools.cache
def defaults_of(role: str) -> Mapping[str, Any]:
    """One role's defaults/main.yml, as written (references to other variables left in). Read-only: every
    caller shares the one cached copy, so a test that adds variables makes its own dict from it."""
    return MappingProxyType(yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {})


@functools.cache
def all_defaults() -> Mapping[str, Any]:
    """Every role's defaults in one mapping: each role prefixes its variables, so none collide."""
    merged: dict[str, Any] = {}
    for path in sorted(ROLES.glob("*/defaults/main.yml")):
        merged.update(defaults_of(path.parent.parent.name))
    return MappingProxyType(merged)


def default(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """A variable's value when only overrides (an inventory's variables) and the defaults give it: where the
    value only names another variable, that one's value, looked up the same way."""
    given = overrides or {}
    value = given[name] if name in given else all_defaults()[name]
    reference = REFERENCE.fullmatch(value) if isinstance(value, str) else None
    return default(reference.group(1), given) if reference else value
