"""The cell_server role and the app it configures agree on every setting the role writes to cellserver.toml:
its type, its default (or a stated reason why a cell differs from a laptop server) and the range each side
accepts, so a value the role lets through is never one the app refuses at start, and the other way round."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import yaml
from local_ansible import ROOT

from cellserver.config import RANGES, ServerConfig
from labkit import roles

ROLE = ROOT / "roles" / "cell_server"
SPEC = yaml.safe_load((ROLE / "meta/argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
ROLE_RANGES = yaml.safe_load((ROLE / "vars/main.yml").read_text())["__cell_server_setting_ranges"]
APP_FIELDS = {field.name: field for field in fields(ServerConfig)}
# `setting = {{ cell_server_setting }}`, quoted or not: the role variable the TOML file takes unchanged.
WRITTEN = re.compile(r'^(\w+) = "?\{\{ cell_server_(\w+)(?: \| trim)? \}\}"?$', re.MULTILINE)
WRITTEN_AS = dict(WRITTEN.findall((ROLE / "templates/etc/cellserver/cellserver.toml.j2").read_text()))
# Where a cell is meant to differ from the app's own default, and why.
CELL_DEFAULTS = {
    "kernel": "a cell runs Sage, the language of SageMathCell; the app alone defaults to the Python kernel",
    "max_kernels": "on a cell the worker pool's size is the limit; the app alone keeps a laptop's 8",
    "sessions_per_client": "a cell takes upstream's production value; the app alone keeps upstream's default",
    "permalink_url": "a cell forwards permalinks to the permalink host when the inventory has one",
}
SPEC_TYPES = {"int": "int", "float": "float", "str": "str"}


def role_default(setting: str) -> object:
    return roles.default(f"cell_server_{setting}")


def test_the_role_writes_the_settings_by_their_own_names() -> None:
    assert len(WRITTEN_AS) >= 15
    assert {setting for setting, variable in WRITTEN_AS.items() if setting != variable} == set()
    assert set(WRITTEN_AS) <= set(APP_FIELDS)


@pytest.mark.parametrize("setting", sorted(WRITTEN_AS))
def test_the_role_and_the_app_give_a_setting_the_same_type(setting: str) -> None:
    assert SPEC_TYPES[SPEC[f"cell_server_{setting}"]["type"]] == str(APP_FIELDS[setting].type)


@pytest.mark.parametrize("setting", sorted(set(WRITTEN_AS) - set(CELL_DEFAULTS)))
def test_the_role_and_the_app_default_a_setting_alike(setting: str) -> None:
    assert role_default(setting) == APP_FIELDS[setting].default


@pytest.mark.parametrize("setting", sorted(CELL_DEFAULTS))
def test_a_cell_default_stated_as_different_is_different(setting: str) -> None:
    assert role_default(setting) != APP_FIELDS[setting].default


def test_the_role_checks_exactly_the_ranges_the_app_checks() -> None:
    app_ranges = {setting: list(bounds) for setting, bounds in RANGES.items() if setting in WRITTEN_AS}
    assert app_ranges == ROLE_RANGES
