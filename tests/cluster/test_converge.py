"""A converge of the running lab under a steady load through the load balancer: a changed cell server setting
restarts the cells one at a time, each drained first, and no request fails.

Runs with `make cluster-test` after `make up` (root, on the lab's machine); minutes under emulation.
"""

from __future__ import annotations

import time
from itertools import combinations

import pytest
from lab import CELLS, LOAD_BALANCER, StatusWatch, playbook
from load import SteadyLoad, in_lab_namespace_possible

pytestmark = pytest.mark.skipif(not in_lab_namespace_possible(), reason="needs root and the lab (make up)")


def out_of_rotation(watch: StatusWatch, since: float) -> list[tuple[float, float]]:
    """The spans (start, end) in which the server was seen in any state but UP, from since on."""
    spans: list[tuple[float, float]] = []
    start = None
    for stamp, status in [sample for sample in list(watch.samples) if sample[0] >= since]:
        if not status.startswith("UP") and start is None:
            start = stamp
        elif status.startswith("UP") and start is not None:
            spans.append((start, stamp))
            start = None
    if start is not None:
        spans.append((start, time.monotonic()))
    return spans


def overlapping(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> bool:
    return any(a_start < b_end and b_start < a_end for a_start, a_end in first for b_start, b_end in second)


def test_a_changed_setting_restarts_one_cell_at_a_time_and_fails_no_request() -> None:
    watches = {name: StatusWatch(name) for name in CELLS}
    try:
        for watch in watches.values():
            watch.wait_streaming()
        started = time.monotonic()
        with SteadyLoad(f"https://{LOAD_BALANCER}/service") as load:
            changed = playbook("cell_servers.yml", "-e", "cell_server_health_max_age=7")
            restored = playbook("cell_servers.yml")
        spans = {name: out_of_rotation(watch, started) for name, watch in watches.items()}
    finally:
        for watch in watches.values():
            watch.stop()
    assert changed.returncode == 0, changed.stdout[-3000:]
    assert restored.returncode == 0, restored.stdout[-3000:]
    outcomes = load.outcomes()
    print(f"two converges that restart every cell, under load: {dict(outcomes)}; out of rotation: {spans}")
    assert all(spans.values()), f"a cell was restarted without leaving the load balancer: {spans}"
    for (first, first_spans), (second, second_spans) in combinations(sorted(spans.items()), 2):
        assert not overlapping(first_spans, second_spans), f"{first} and {second} were out at once: {spans}"
    assert set(outcomes) == {"200"}, (outcomes, load.wrong_answers())
