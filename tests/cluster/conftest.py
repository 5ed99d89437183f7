"""Fixtures every cluster test shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lab import LAB_BRIDGE, admin
from load import in_lab_namespace_possible

EXEMPT_LIST = "/etc/haproxy/rate-limit-exempt.lst"


@pytest.fixture(scope="session", autouse=True)
def exempt_this_machine() -> Iterator[None]:
    """The lab's rate limits are small; the steady load from the lab bridge must not meet them."""
    if not in_lab_namespace_possible():
        yield
        return
    admin(f"add acl {EXEMPT_LIST} {LAB_BRIDGE}")
    yield
    admin(f"del acl {EXEMPT_LIST} {LAB_BRIDGE}")
