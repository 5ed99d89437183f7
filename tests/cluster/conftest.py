"""Fixtures every cluster test shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lab import rate_limits_exempted
from load import in_lab_namespace_possible


@pytest.fixture(scope="session", autouse=True)
def exempt_this_machine() -> Iterator[None]:
    """The steady loads come from the lab bridge, exempted from the lab's small rate limits."""
    if not in_lab_namespace_possible():
        yield
        return
    with rate_limits_exempted():
        yield
