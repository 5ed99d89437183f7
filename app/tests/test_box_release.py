"""How the provider frees a worker once its kernel's box was killed: at once for a box of a few tasks, once empty
for a fork bomb's, waiting for a slow box, resetting a stuck one."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        self.killed: list[Path] = []

    def kill(self, path: Path) -> None:
        self.killed.append(path)
        self.start = self.clock.now

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


class Answers:
    """Stands in for the cell server's connection: what the provider answered."""

    def __init__(self) -> None:
        self.kernels: set[str] = set()
        self.sent: list[dict[str, Any]] = []

    def send(self, answer: dict[str, Any]) -> None:
        self.sent.append(answer)


@pytest.fixture
def kernel_process() -> Iterator[int]:
    """A process group of its own to stand for a kernel (the release kills it)."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield process.pid
    process.kill()
    process.wait()


def live_boxed_kernel(
    tmp_path: Path, clock: Clock, counts: list[int], pid: int
) -> tuple[Provider, Answers, list[tuple[str, KernelRecord | None]], ScriptedCgroups]:
    """A provider running one boxed kernel as worker w1 (the pool's only worker); the list collects the full
    resets asked for. Its box's task count follows counts from the release on, one per second."""
    cgroups = ScriptedCgroups(clock, counts)
    provider = Provider(ProviderSettings(runtime_dir=tmp_path, box=BoxLimits()), cgroups)  # type: ignore[arg-type]
    provider.free_workers.clear()
    answers = Answers()
    worker = Worker("w1", 60001, 60001, tmp_path / "home")
    start_kernel(provider, answers, worker, "k1", pid)
    full_resets: list[tuple[str, KernelRecord | None]] = []
    provider.queue_reset = lambda worker, record: full_resets.append((worker.name, record))  # type: ignore[method-assign]
    return provider, answers, full_resets, cgroups


def start_kernel(provider: Provider, answers: Answers, worker: Worker, kernel_id: str, pid: int) -> KernelRecord:
    record = KernelRecord(kernel_id, pid, provider.settings.runtime_dir / kernel_id, answers, worker)  # type: ignore[arg-type]
    record.box = Box(provider.settings.runtime_dir / f"cgroup-{kernel_id}", -1)
    provider.kernels[kernel_id] = record
    answers.kernels.add(kernel_id)
    return record


def test_a_killed_box_of_a_few_tasks_frees_its_worker_before_it_is_empty(
    tmp_path: Path, clock: Clock, kernel_process: int
) -> None:
    provider, answers, full_resets, cgroups = live_boxed_kernel(tmp_path, clock, [4, 4, 0], kernel_process)

    assert provider.release("k1", (answers, 7)) is True

    assert cgroups.killed == [tmp_path / "cgroup-k1"]
    assert answers.sent == [{"id": 7, "released": "k1"}], "the release waited for the box to empty"
    assert [worker.name for worker in provider.free_workers] == ["w1"]
    assert not cgroups.removed and "k1" in provider.dying
    poll_for(provider, clock, 3)
    assert cgroups.removed and not provider.dying and full_resets == []


def test_a_fork_bombs_killed_box_frees_its_worker_only_once_empty(
    tmp_path: Path, clock: Clock, kernel_process: int
) -> None:
    counts = [900, 300, 0]
    provider, answers, full_resets, cgroups = live_boxed_kernel(tmp_path, clock, counts, kernel_process)

    provider.release("k1", (answers, 7))

    assert answers.sent == [] and provider.free_workers == []
    poll_for(provider, clock, 3)
    assert answers.sent == [{"id": 7, "released": "k1"}]
    assert [worker.name for worker in provider.free_workers] == ["w1"]
    assert cgroups.removed and full_resets == []


def test_a_worker_freed_early_whose_box_will_not_empty_is_taken_out_and_reset(
    tmp_path: Path, clock: Clock, kernel_process: int
) -> None:
    provider, answers, full_resets, _cgroups = live_boxed_kernel(tmp_path, clock, [3] * 40, kernel_process)

    provider.release("k1", (answers, 7))
    assert [worker.name for worker in provider.free_workers] == ["w1"]
    poll_for(provider, clock, int(kernel_provider.BOX_DEATH_SECONDS) + 3)

    assert full_resets == [("w1", None)], "the worker of a box that would not empty stayed in the pool"
    assert provider.free_workers == [] and not provider.dying


def test_a_busy_worker_whose_old_box_will_not_empty_gets_the_full_reset_after_its_kernel(
    tmp_path: Path, clock: Clock, kernel_process: int
) -> None:
    provider, answers, full_resets, _cgroups = live_boxed_kernel(tmp_path, clock, [3] * 40, kernel_process)
    provider.release("k1", (answers, 7))
    worker = provider.free_workers.pop(0)  # taken by the next computation before the old box is found stuck
    second = start_kernel(provider, answers, worker, "k2", kernel_process)

    poll_for(provider, clock, int(kernel_provider.BOX_DEATH_SECONDS) + 3)
    assert full_resets == [], "the reset would have killed the computation the worker runs now"
    provider.release("k2", (answers, 8))

    assert full_resets == [("w1", second)]


class ShortOfMemory(ScriptedCgroups):
    """Boxes whose memory the test sets; their parent went past its memory.high when `short` says so."""

    def __init__(self, clock: Clock, used: dict[Path, int]) -> None:
        super().__init__(clock, [0])
        self.used, self.short = used, False

    def memory_ran_short(self) -> bool:
        return self.short

    def largest(self, boxes: list[Path]) -> Path | None:
        return max(boxes, key=lambda box: self.used.get(box, 0), default=None)


def test_memory_running_short_kills_the_box_holding_the_most_not_a_neighbour(tmp_path: Path, clock: Clock) -> None:
    used = {tmp_path / "cgroup-idle": 30 << 20, tmp_path / "cgroup-hog": 700 << 20, tmp_path / "cgroup-done": 900 << 20}
    cgroups = ShortOfMemory(clock, used)
    provider = Provider(ProviderSettings(runtime_dir=tmp_path, box=BoxLimits()), cgroups)  # type: ignore[arg-type]
    answers = Answers()
    for number, name in enumerate(("idle", "hog", "done")):
        start_kernel(provider, answers, Worker(f"w{number}", 60001 + number, 60001, tmp_path / name), name, 0)
    provider.kernels["done"].release_id = (None, None)  # released already: its box is being thrown away

    provider.guard_memory()
    assert cgroups.killed == [], "a box was killed while memory was not short"

    cgroups.short = True
    provider.guard_memory()
    assert cgroups.killed == [tmp_path / "cgroup-hog"]

    # Still short while the hog's box empties: its memory is on the way back, no neighbour is killed for it.
    cgroups.counts, used[tmp_path / "cgroup-hog"] = [5], 0
    provider.guard_memory()
    assert cgroups.killed == [tmp_path / "cgroup-hog"], "a neighbour was killed while the hog's box emptied"
