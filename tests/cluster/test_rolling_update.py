"""Rolling updates on the running lab, under a steady load through the load balancer: no request fails, every
cell ends on the new release, and a canary that fails its check stops the rollout with the other cell serving.

Runs with `make cluster-test` after `make up` (root, on the lab's machine); each test takes minutes under
emulation, so this suite is not part of `make test`.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from cellserver.sessions import DRAINED
from labkit.lab import (
    CELLS,
    CELLS_BACKEND,
    LOAD_BALANCER,
    ROOT,
    admin,
    installed_release,
    playbook,
    release_of_app,
    server_state,
    wheelhouse_for,
)  # fmt: skip
from labkit.load import HeldSessions, SteadyLoad, in_lab_namespace_possible

pytestmark = pytest.mark.skipif(not in_lab_namespace_possible(), reason="needs root and the lab (make up)")


@pytest.fixture(scope="module")
def baseline() -> str:
    """The release the lab runs now; each test leaves every cell on it, in rotation."""
    releases = {installed_release(address) for address in CELLS.values()}
    assert len(releases) == 1, f"the cells run different releases: {releases}"
    return releases.pop()


def roll_out(source: Path, version: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return playbook(
        "rolling-update.yml", "-e", f"cellserver_app_source={source}",
        "-e", f"cellserver_app_wheelhouse={wheelhouse_for(source)}", "-e", f"rolling_update_expect_version={version}",
        *extra,
    )  # fmt: skip


def test_a_rolling_update_under_load_fails_no_request(tmp_path: Path, baseline: str) -> None:
    version = f"0.1.{int(time.time())}"
    release = release_of_app(tmp_path / "app", version)
    url = f"https://{LOAD_BALANCER}/service"
    try:
        with SteadyLoad(url) as load:
            load.wait_for_answers(4)
            started = time.monotonic()
            result = roll_out(release, version)
            took = time.monotonic() - started
            finished = time.monotonic()
            load.wait_for_answers(4, since=finished)
        assert result.returncode == 0, result.stdout[-3000:]
        outcomes = load.outcomes()
        print(f"rolling update of {len(CELLS)} cells in {took:.0f} s under load: {dict(outcomes)}")
        assert set(outcomes) == {"200"}, (outcomes, load.wrong_answers())
        assert outcomes["200"] > 20, outcomes
        assert {installed_release(address) for address in CELLS.values()} == {version}
        assert set(load.releases(since=finished)) == {version}
    finally:
        # Back to the release the lab had, the same way (a rollback is one more rolling update).
        rollback = roll_out(ROOT / "app", baseline)
        assert rollback.returncode == 0, rollback.stdout[-3000:]


def test_a_rolling_update_ends_open_sessions_with_a_reason_and_fails_no_request(tmp_path: Path, baseline: str) -> None:
    # Pages holding kernels (linked cells, interacts) on both cells while /service traffic goes on: each cell's
    # sessions get the drain's time, then end with the reason the page shows; none is left hanging.
    version = f"0.1.{int(time.time())}"
    release = release_of_app(tmp_path / "app", version)
    try:
        with SteadyLoad(f"https://{LOAD_BALANCER}/service") as load, HeldSessions(f"https://{LOAD_BALANCER}") as pages:
            pages.wait_open(patience=180)
            result = roll_out(release, version)
            pages.wait_ended(patience=60)
        assert result.returncode == 0, result.stdout[-3000:]
        outcomes = load.outcomes()
        ended = [(held.kernel_id, held.ended_after, held.last.get("content")) for held in pages.sessions]
        print(f"rolling update with {len(ended)} open sessions: /service {dict(outcomes)}; sessions {ended}")
        assert set(outcomes) == {"200"}, (outcomes, load.wrong_answers())
        for held in pages.sessions:
            assert held.ended_after is not None, f"session {held.kernel_id} still open after the update: {held}"
            assert held.last.get("content") == {"execution_state": "dead", "reason": DRAINED}, held
    finally:
        rollback = roll_out(ROOT / "app", baseline)
        assert rollback.returncode == 0, rollback.stdout[-3000:]


def test_a_failing_canary_stops_the_rollout_while_the_other_cell_serves(tmp_path: Path, baseline: str) -> None:
    version = f"0.1.{int(time.time())}"
    broken = release_of_app(tmp_path / "app", version, broken=True)
    canary, other = sorted(CELLS)
    before = installed_release(CELLS[other])
    url = f"https://{LOAD_BALANCER}/service"
    with SteadyLoad(url) as load:
        load.wait_for_answers(2)
        result = roll_out(broken, version, "-e", "cell_server_check_seconds=10")
        finished = time.monotonic()
        load.wait_for_answers(4, since=finished)
    try:
        assert result.returncode != 0, "the rollout went on past a canary that cannot serve"
        assert server_state(canary) == "MAINT", "the failed canary is back in rotation"
        assert server_state(other) == "UP"
        assert installed_release(CELLS[other]) == before
        outcomes = load.outcomes()
        print(f"failed canary: {dict(outcomes)}; after the stop only {dict(load.releases(since=finished))} answered")
        assert set(outcomes) == {"200"}, (outcomes, load.wrong_answers())
        assert set(load.releases(since=finished)) == {before}
    finally:
        # The next rollout that passes its check puts the canary back where the failed one took it out.
        repaired = roll_out(ROOT / "app", baseline)
        assert repaired.returncode == 0, repaired.stdout[-3000:]
        assert server_state(canary) == "UP", "the repaired canary is still out of rotation"


def test_a_cell_set_to_maintenance_by_hand_stays_out_through_a_rollout(baseline: str) -> None:
    # The rollout puts back only what a drain of its own took out: an operator's maintenance is theirs to end.
    _, held_out = sorted(CELLS)
    admin(f"set server {CELLS_BACKEND}/{held_out} state maint")
    try:
        result = roll_out(ROOT / "app", baseline)
        assert result.returncode == 0, result.stdout[-3000:]
        assert server_state(held_out) == "MAINT", "the rollout put a cell the operator held out back in rotation"
    finally:
        admin(f"set server {CELLS_BACKEND}/{held_out} state ready")
