"""Waiting on a condition, not for a fixed time: the tests' one way to let a starved VM catch up."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

Found = TypeVar("Found")


def until(look: Callable[[], Found], seconds: float, interval: float = 0.5) -> Found:
    """look()'s first truthy answer; once seconds are up, its last answer, whatever it is.

    The caller asserts on what comes back, so a failure shows what was last seen, not only that time ran out.
    """
    deadline = time.monotonic() + seconds
    while True:
        found = look()
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(interval)


def until_gone(look: Callable[[], str], seconds: float, interval: float = 0.5) -> str:
    """'' as soon as look() finds nothing (its answer stripped); once seconds are up, what it still finds."""
    deadline = time.monotonic() + seconds
    while (left := look().strip()) and time.monotonic() < deadline:
        time.sleep(interval)
    return left
