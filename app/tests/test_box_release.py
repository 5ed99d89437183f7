"""How the provider frees a worker once its kernel's box was killed: waiting for a slow box, resetting a stuck one."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellserver import kernel_provider
from cellserver.kernel_box import BoxLimits, Worker
from cellserver.kernel_provider import Box, KernelRecord, Provider, ProviderSettings


class Clock:
    """Stands in for the time module the provider reads, so seconds pass when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class ScriptedCgroups:
    """A killed box whose task count follows a script: one count per second since the kill."""

    def __init__(self, clock: Clock, counts: list[int]) -> None:
        self.clock, self.counts, self.start = clock, counts, clock.now
        self.removed = False

    def task_count(self, path: Path) -> int:
        second = int(self.clock.now - self.start)
        return self.counts[min(second, len(self.counts) - 1)]

    def is_empty(self, path: Path) -> bool:
        return self.task_count(path) == 0

    def remove(self, path: Path) -> bool:
        self.removed = True
        return True


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    clock = Clock()
    monkeypatch.setattr(kernel_provider, "time", clock)
    monkeypatch.setattr(kernel_provider, "unmount_home", lambda worker: None)
    yield clock
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def killed_box(
    tmp_path: Path, clock: Clock, counts: list[int]
) -> tuple[Provider, list[tuple[str, float]], ScriptedCgroups]:
    """A provider holding one killed box; the list collects the workers sent to the full reset, and when."""
    cgroups = ScriptedCgroups(clock, counts)
    settings = ProviderSettings(runtime_dir=tmp_path, box=BoxLimits())
    provider = Provider(settings, cgroups)  # type: ignore[arg-type]
    provider.free_workers.clear()
    worker = Worker("w1", 60001, 60001, tmp_path / "home")
    record = KernelRecord("k1", os.getpid(), tmp_path / "k1", None, worker)  # type: ignore[arg-type]
    record.box = Box(tmp_path / "cgroup", -1)
    record.release_id, record.released_at = (None, None), clock.now
    provider.dying["k1"] = record
    full_resets: list[tuple[str, float]] = []
    provider.queue_reset = lambda worker, record: full_resets.append((worker.name, clock.now))  # type: ignore[method-assign]
    return provider, full_resets, cgroups


def poll_for(provider: Provider, clock: Clock, seconds: int) -> None:
    for _ in range(seconds * 4):
        provider.collect_boxes()
        clock.now += 0.25


def test_a_box_that_keeps_emptying_is_waited_for_past_the_death_time(tmp_path: Path, clock: Clock) -> None:
    # A fork bomb's tasks ending slowly on a starved cell: the count drops every 4 s, for 16 s in all.
    counts = [count for count in (900, 600, 300, 100) for _second in range(4)] + [0]
    assert len(counts) - 1 > 3 * kernel_provider.BOX_DEATH_SECONDS

    provider, full_resets, cgroups = killed_box(tmp_path, clock, counts)
    poll_for(provider, clock, 20)

    assert full_resets == []
    assert [worker.name for worker in provider.free_workers] == ["w1"]
    assert cgroups.removed and not provider.dying


def test_a_box_whose_count_stops_dropping_gets_the_full_reset_once(tmp_path: Path, clock: Clock) -> None:
    counts = [50, 20] + [3] * 30  # two processes the kill could not end, and one more the count still holds

    provider, full_resets, _cgroups = killed_box(tmp_path, clock, counts)
    last_drop = clock.now + 2
    poll_for(provider, clock, 20)

    assert [name for name, _when in full_resets] == ["w1"]
    waited = full_resets[0][1] - last_drop
    assert kernel_provider.BOX_DEATH_SECONDS < waited <= kernel_provider.BOX_DEATH_SECONDS + 0.5, waited
    assert provider.free_workers == [] and not provider.dying
