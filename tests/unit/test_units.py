"""The unit names tests and benchmarks use are the ones the roles install: a template renamed in a role
without labkit.units following it fails here, not as a test on a VM that waits for a unit that never runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit import units

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("unit", "role"), sorted(units.WRITTEN_BY.items()))
def test_each_unit_name_is_a_unit_its_role_installs(unit: str, role: str) -> None:
    installed = sorted(path.name.removesuffix(".j2") for path in (ROOT / "roles" / role).glob("*/etc/systemd/system/*"))
    assert unit in installed, f"roles/{role} installs {installed}, not {unit}"


def test_every_unit_name_says_which_role_installs_it() -> None:
    names = {value for name, value in vars(units).items() if name.isupper() and isinstance(value, str)}
    assert names == set(units.WRITTEN_BY), names ^ set(units.WRITTEN_BY)
