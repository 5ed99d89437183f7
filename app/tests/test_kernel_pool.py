"""The pool's own bookkeeping, in process: a provider that answers at once (or never) stands in for the forking
one, so races between a stop and the background refill can be placed exactly instead of hoped for; and what
the health probe does to a real reserve kernel."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cellserver import kernels
from cellserver.config import ServerConfig
from cellserver.kernels import (
    IOPUB_PATIENCE_SECONDS,
    KERNEL_INFO_PATIENCE_SECONDS,
    LATE_START_PATIENCE_FACTOR,
    STOP_PATIENCE_SECONDS,
    Kernel,
    KernelPool,
    KernelsBusyError,
    KernelSilentError,
    KernelSlowStartError,
    KernelStartError,
    PoolSettings,
    wait_for_answers,
)
from cellserver.service import HealthProbe, evaluate_quietly, execute, slow_cell_seconds


class InstantProvider:
    """Answers every request at once and remembers which kernels were released."""

    def __init__(self) -> None:
        self.released: list[str] = []
        self.closed = False
        self.deaths: dict[str, asyncio.Event] = {}
        self.death_seen = asyncio.Event()
        self.workers = None  # not pooled: no worker count limits the kernels

    async def open(self) -> None:
        pass

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "release":
            self.released.append(request["kernel_id"])
        return {}

    async def close(self) -> None:
        self.closed = True


class ClientWithoutChannels:
    def stop_channels(self) -> None:
        pass


class PoolOfStubKernels(KernelPool):
    """A KernelPool whose kernels start at once: only the start itself is replaced."""

    def __init__(self, settings: PoolSettings) -> None:
        super().__init__(settings)
        self.provider = InstantProvider()  # type: ignore[assignment]
        self.started: list[str] = []

    async def _start_kernel(self) -> Kernel:
        await asyncio.sleep(0)
        kernel_id = f"k{len(self.started)}"
        self.started.append(kernel_id)
        # This process stands in for the kernel process: alive as long as the test runs.
        return Kernel(kernel_id, os.getpid(), None, ClientWithoutChannels(), asyncio.Event())  # type: ignore[arg-type]


async def stop_right_after_a_wakeup(steps_between: int) -> tuple[float, PoolOfStubKernels]:
    """Fill the reserve, take its kernel (which wakes the refill), and stop steps_between loop turns later."""
    pool = PoolOfStubKernels(PoolSettings(max_kernels=2, preforked=1))
    await pool.start()
    taken = await pool.acquire()
    pool.release(taken)
    for _ in range(steps_between):
        await asyncio.sleep(0)
    started = time.monotonic()
    await pool.stop()
    return time.monotonic() - started, pool


@pytest.mark.parametrize("steps_between", range(8))
def test_a_stop_racing_the_refill_leaves_no_kernel_behind(steps_between: int) -> None:
    # A stop used to cancel the refill. Placed as the refill's wakeup fired, the cancel was swallowed (wait_for
    # before Python 3.12) and one more kernel went to the reserve stop had emptied; placed as a start finished,
    # that kernel was dropped unreleased. Either way stop waited its whole patience (0, 5 and 6 steps here).
    took, pool = asyncio.run(stop_right_after_a_wakeup(steps_between))
    assert took < STOP_PATIENCE_SECONDS / 2, f"stop waited {took:.1f} s for a kernel nobody would release"
    assert sorted(pool.provider.released) == sorted(pool.started)  # type: ignore[attr-defined]
    assert pool.provider.closed  # type: ignore[attr-defined]


class PoolOfSlowKernels(PoolOfStubKernels):
    """Kernels that take a while to start, as Sage kernels do on a busy machine."""

    START_SECONDS = 1.5

    async def _start_kernel(self) -> Kernel:
        await asyncio.sleep(self.START_SECONDS)
        return await super()._start_kernel()


async def burst(
    requests: int, max_kernels: int, reserve_ready: bool, apart: float = 0.0, hold: float = 0.0
) -> list[tuple[str, float]]:
    """requests, apart seconds one after the other, to a pool of slow kernels that keeps two in reserve: each
    one's outcome and wait. Each kernel is held hold seconds. The reserve is either full or both its kernels
    are still starting."""
    settings = PoolSettings(max_kernels=max_kernels, preforked=2, acquire_wait=0.5, start_timeout=20)
    pool = PoolOfSlowKernels(settings)
    await pool.start()
    if reserve_ready:
        while pool._ready.qsize() < settings.preforked:
            await asyncio.sleep(0.05)
    else:
        await asyncio.sleep(0.1)  # the refill has started both kernels

    async def one(place: int) -> tuple[str, float]:
        await asyncio.sleep(place * apart)
        started = time.monotonic()
        try:
            kernel = await pool.acquire()
        except KernelsBusyError:
            return "busy", time.monotonic() - started
        waited = time.monotonic() - started
        await asyncio.sleep(hold)
        pool.release(kernel)
        return "kernel", waited

    try:
        return await asyncio.gather(*(one(place) for place in range(requests)))
    finally:
        await pool.stop()


def test_overload_is_refused_at_once_not_queued_behind_starting_kernels() -> None:
    # Every request used to wait up to the start timeout while any kernel was starting: under overload
    # with slow kernels, minutes of queue instead of a 503.
    outcomes = asyncio.run(burst(6, max_kernels=2, reserve_ready=False))
    kernels = [waited for outcome, waited in outcomes if outcome == "kernel"]
    refused = [waited for outcome, waited in outcomes if outcome == "busy"]
    assert len(kernels) == 2, outcomes  # the two kernels on their way went to the first two requests
    assert len(refused) == 4 and max(refused) < 1.0, outcomes


def test_as_many_requests_as_kernels_all_get_one() -> None:
    # Two take the reserve, four start their own, and the last two wait for the reserve's refill. Those two
    # used to count the four starting their own as ahead of them in line and were refused: a full pool of
    # eight workers ran six computations.
    computation = PoolOfSlowKernels.START_SECONDS * 3  # still running when the last request is answered
    outcomes = asyncio.run(burst(8, max_kernels=8, reserve_ready=True, apart=0.01, hold=computation))
    assert [outcome for outcome, _ in outcomes] == ["kernel"] * 8, outcomes


class CountingQueue(asyncio.Queue):  # type: ignore[type-arg]
    """The reserve, counting how often a request looked into it."""

    looks = 0

    def get_nowait(self) -> Any:
        self.looks += 1
        return super().get_nowait()


async def wait_behind_a_full_pool() -> tuple[float, int]:
    """A pool of one slot, no reserve: a second request waits while the first holds the kernel 1.5 s. How long
    the second request took after the release, and how often it looked into the reserve meanwhile."""
    pool = PoolOfStubKernels(PoolSettings(max_kernels=1, preforked=0, acquire_wait=5.0))
    reserve = pool._ready = CountingQueue()
    await pool.start()
    first = await pool.acquire()
    second = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(1.5)
    released = time.monotonic()
    await pool.release(first)
    pool.release(await second)
    took = time.monotonic() - released
    await pool.stop()
    return took, reserve.looks


def test_a_request_waiting_for_a_slot_gets_it_as_the_release_frees_it_without_polling() -> None:
    took, looks = asyncio.run(wait_behind_a_full_pool())
    assert took < 0.2, f"the waiting request took {took:.2f} s after the release"
    # Woken by the release, and by its once-a-second look for a stalled provider: not polling the reserve.
    assert looks <= 4, f"the waiting request looked into the reserve {looks} times in 1.5 s"


class ScriptedClient:
    """Answers kernel_info as a starting kernel does: replies on the shell channel, and output messages that
    arrive only once the output channel's subscription has reached the kernel."""

    def __init__(self, silent_requests: int, unsubscribed_requests: int) -> None:
        self.silent_requests = silent_requests
        self.unsubscribed_requests = unsubscribed_requests
        self.asked = 0
        self.statuses = 0

    def kernel_info(self) -> str:
        self.asked += 1
        if self.asked > self.silent_requests + self.unsubscribed_requests:
            self.statuses += 1
        return f"m{self.asked}"

    async def get_shell_msg(self, timeout: float) -> dict[str, Any]:
        if self.asked <= self.silent_requests:
            await asyncio.sleep(timeout)
            raise queue.Empty
        return {"msg_type": "kernel_info_reply", "parent_header": {"msg_id": f"m{self.asked}"}}

    async def get_iopub_msg(self, timeout: float) -> dict[str, Any]:
        if not self.statuses:
            await asyncio.sleep(timeout)
            raise queue.Empty
        self.statuses -= 1
        return {"msg_type": "status"}


def test_a_starting_kernel_is_asked_again_until_both_channels_answer() -> None:
    client = ScriptedClient(silent_requests=1, unsubscribed_requests=2)
    started = time.monotonic()
    asyncio.run(wait_for_answers(client, timeout=10))  # type: ignore[arg-type]
    assert client.asked == 4
    # No quiet period after the answer: one silent shell wait and two output waits, nothing more.
    assert time.monotonic() - started < KERNEL_INFO_PATIENCE_SECONDS + 2 * IOPUB_PATIENCE_SECONDS + 0.1


def test_a_kernel_that_never_answers_is_given_up_at_the_start_timeout() -> None:
    client = ScriptedClient(silent_requests=1000, unsubscribed_requests=0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not answer within 2\.5 s"):
        asyncio.run(wait_for_answers(client, timeout=2.5))  # type: ignore[arg-type]
    assert 2.5 <= time.monotonic() - started < 3.0


class KernelUpAt:
    """A kernel that reads its queue from a moment on: every request asked before then is answered then."""

    def __init__(self, up_at: float) -> None:
        self.up_at = up_at
        self.asked = 0

    def kernel_info(self) -> str:
        self.asked += 1
        return f"m{self.asked}"

    async def get_shell_msg(self, timeout: float) -> dict[str, Any]:
        wait = self.up_at - time.monotonic()
        if wait > timeout:
            await asyncio.sleep(timeout)
            raise queue.Empty
        await asyncio.sleep(max(wait, 0))
        return {"msg_type": "kernel_info_reply", "parent_header": {"msg_id": "m1"}}

    async def get_iopub_msg(self, timeout: float) -> dict[str, Any]:
        return {"msg_type": "status"}


def test_a_slow_starting_kernel_is_asked_less_often_and_seen_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "KERNEL_INFO_PATIENCE_SECONDS", 0.05)
    monkeypatch.setattr(kernels, "KERNEL_INFO_PATIENCE_MAX_SECONDS", 0.4)
    client = KernelUpAt(time.monotonic() + 1.5)
    asyncio.run(wait_for_answers(client, timeout=10))  # type: ignore[arg-type]
    # Silent waits of 0.05, 0.1, 0.2, 0.4 and 0.4 s, then the sixth ask's wait ends at 1.5 s: 6 asks, one more
    # for a late timer; a fixed 0.05 s patience asks 30 times.
    assert client.asked <= 7, f"asked a silent kernel {client.asked} times in 1.5 s"
    # The longer patience does not delay the answer: whichever ask it replies to, the wait ends with it.
    assert time.monotonic() - client.up_at < 0.1


class LateClient(KernelUpAt):
    """A kernel on a starved machine: silent for silent_seconds after its start, then it answers."""

    def __init__(self, silent_seconds: float) -> None:
        super().__init__(time.monotonic() + silent_seconds)
        self.stopped = False

    def stop_channels(self) -> None:
        self.stopped = True


class PoolOfLateKernels(KernelPool):
    """The pool's own start, with a provider that answers at once and kernels that answer late."""

    def __init__(self, settings: PoolSettings, silent_seconds: float) -> None:
        super().__init__(settings)
        self.provider = InstantProvider()  # type: ignore[assignment]
        self.silent_seconds = silent_seconds
        self.started: list[str] = []

    async def _ask_for_a_kernel(self) -> dict[str, Any]:
        self.started.append(f"k{len(self.started)}")
        return {"kernel_id": self.started[-1], "pid": os.getpid(), "worker": None, "connection": {}}

    def _connect(self, connection: dict[str, Any]) -> LateClient:  # type: ignore[override]
        return LateClient(self.silent_seconds)


async def wait_until(condition: Callable[[], bool], patience: float = 10.0) -> None:
    deadline = time.monotonic() + patience
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.01)


async def acquire_from_late_kernels(silent_seconds: float, requests: int) -> tuple[list[str], PoolOfLateKernels]:
    """Requests, one after the other, to a one-kernel pool whose kernels answer after the start timeout (2 s):
    what each got, and the pool once it stopped."""
    pool = PoolOfLateKernels(PoolSettings(max_kernels=1, preforked=0, start_timeout=2.0), silent_seconds)
    await pool.start()
    outcomes = []
    for _ in range(requests):
        try:
            kernel = await pool.acquire()
        except KernelsBusyError as refused:
            outcomes.append(type(refused).__name__)
        else:
            outcomes.append(kernel.kernel_id)
            pool.release(kernel)
    await pool.stop()
    return outcomes, pool


def test_a_request_whose_kernel_answers_after_the_start_timeout_gets_that_kernel() -> None:
    # On a starved cell a start often runs a few seconds past its timeout. Refusing the request then sent the
    # client elsewhere (or away with a 503) while its kernel came up moments later.
    started = time.monotonic()
    outcomes, pool = asyncio.run(acquire_from_late_kernels(silent_seconds=3.0, requests=1))
    assert outcomes == ["k0"]
    assert pool.started == ["k0"]
    assert time.monotonic() - started < 2.0 * LATE_START_PATIENCE_FACTOR


def test_a_late_kernel_of_a_request_that_gave_up_serves_the_next_one() -> None:
    # A request cancelled while its kernel is late (the client went away) leaves the kernel starting for the
    # reserve: killing it threw the start away, and the next request paid for a whole new one.
    async def cancel_then_ask_again() -> tuple[str, PoolOfLateKernels]:
        pool = PoolOfLateKernels(PoolSettings(max_kernels=1, preforked=0, start_timeout=2.0), silent_seconds=3.0)
        await pool.start()
        first = asyncio.ensure_future(pool.acquire())
        await wait_until(lambda: bool(pool._late_starts))
        first.cancel()
        kernel = await pool.acquire()
        pool.release(kernel)
        await pool.stop()
        return kernel.kernel_id, pool

    got, pool = asyncio.run(cancel_then_ask_again())
    assert got == "k0"
    assert pool.started == ["k0"]
    assert pool.provider.released == ["k0"]  # type: ignore[attr-defined]


def test_a_kernel_that_never_answers_is_released_after_its_late_patience() -> None:
    started = time.monotonic()
    outcomes, pool = asyncio.run(acquire_from_late_kernels(silent_seconds=1000.0, requests=1))
    assert outcomes == [KernelSlowStartError.__name__]
    assert time.monotonic() - started >= 2.0 * LATE_START_PATIENCE_FACTOR
    assert pool.started == ["k0"]
    assert pool.provider.released == ["k0"]  # type: ignore[attr-defined]
    assert pool._live == 0


async def stop_during_a_late_start() -> tuple[float, PoolOfLateKernels, BaseException | None]:
    pool = PoolOfLateKernels(PoolSettings(max_kernels=1, preforked=0, start_timeout=1.0), silent_seconds=1000.0)
    await pool.start()
    waiting = asyncio.ensure_future(pool.acquire())
    await wait_until(lambda: bool(pool._late_starts))
    started = time.monotonic()
    await pool.stop()
    took = time.monotonic() - started
    return took, pool, await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 1.0)


def test_a_stop_releases_a_late_kernel_at_once() -> None:
    took, pool, waiting = asyncio.run(stop_during_a_late_start())
    assert pool.provider.released == ["k0"]  # type: ignore[attr-defined]
    assert took < 1.0, f"stop waited {took:.1f} s for a late kernel"
    assert isinstance(waiting[0], KernelsBusyError), "the request waiting for it was not refused"


class ProviderThatHangs(InstantProvider):
    """Takes start requests and answers none of them until told to (a frozen or deadlocked provider)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[asyncio.Future[dict[str, Any]]] = []

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] != "start":
            return await super().request(request)
        answer = asyncio.get_running_loop().create_future()
        self.starts.append(answer)
        return await answer


async def requests_to_a_provider_that_answers_late(requests: int) -> tuple[list[tuple[str, float]], list[str], int]:
    """Each request's outcome and wait while the provider answers no start; then it answers every start
    late: the kernels it released, and the slots still counted after that."""
    pool = KernelPool(PoolSettings(max_kernels=4, preforked=0, start_timeout=0.5, acquire_wait=0.1))
    provider = ProviderThatHangs()
    pool.provider = provider  # type: ignore[assignment]
    await pool.start()
    outcomes = []
    for _ in range(requests):
        began = time.monotonic()
        try:
            await pool.acquire()
            outcome = "kernel"
        except KernelStartError:
            outcome = "start failed"
        except KernelsBusyError:
            outcome = "busy"
        outcomes.append((outcome, time.monotonic() - began))
    for number, start in enumerate(provider.starts):
        start.set_result({"kernel_id": f"late{number}"})
    deadline = time.monotonic() + 5
    while pool._live and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    live = pool._live
    await pool.stop()
    return outcomes, provider.released, live


def test_a_provider_that_answers_no_start_fails_requests_instead_of_filling_the_pool() -> None:
    # Unanswered starts used to hold their slots for good: requests waited without end, then every slot was
    # taken and the server answered "busy", which the health timer reads as saturation and never restarts.
    outcomes, released, live = asyncio.run(asyncio.wait_for(requests_to_a_provider_that_answers_late(6), 30))
    assert [outcome for outcome, _ in outcomes] == ["start failed"] * 6, outcomes
    assert outcomes[0][1] < 2, outcomes  # the start timeout
    assert max(waited for _, waited in outcomes[1:]) < 0.2, outcomes  # the provider is known to be stuck
    assert released == ["late0"] and live == 0  # the kernel it started late went back at once


async def probed_then_computed() -> tuple[dict[str, Any], list[str | None]]:
    """A real reserve kernel evaluated quietly three times, then given a computation: its answer."""
    pool = KernelPool(PoolSettings(max_kernels=1, preforked=1))
    await pool.start()
    values = []
    try:
        for number in range(3):
            kernel = await pool.borrow(patience=30)
            assert kernel is not None, "no reserve kernel came"
            values.append(await evaluate_quietly(kernel, f"{number} + 40", 10))
            pool.give_back(kernel, usable=True)
        kernel = await pool.acquire()  # the same one: there is room for a single kernel
        try:
            return await execute(kernel, "print(len(In), repr(_))", {}, 10), values
        finally:
            pool.release(kernel)
    finally:
        await pool.stop()


def test_a_health_evaluation_leaves_no_trace_in_the_reserve_kernel() -> None:
    answer, values = asyncio.run(probed_then_computed())
    assert values == ["40", "41", "42"]
    assert answer["execute_reply"]["execution_count"] == 1, answer
    assert answer["stdout"] == "2 ''\n", answer  # In holds only this cell, and no result was kept


async def an_idle_pool_probed(rounds: int) -> PoolOfStubKernels:
    """A pool keeping two kernels in reserve, its reserve borrowed and given back rounds times, then idle."""
    pool = PoolOfStubKernels(PoolSettings(max_kernels=4, preforked=2))
    await pool.start()
    try:
        for _ in range(rounds):
            kernel = await pool.borrow(patience=5)
            assert kernel is not None, "no reserve kernel came"
            pool.give_back(kernel, usable=True)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    finally:
        await pool.stop()
    return pool


@pytest.fixture
def hidden_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc as the cell server's unit sees it (ProtectProc=invisible): other users' entries do not exist."""
    read_text = Path.read_text

    def read_unless_proc(path: Path, *args: Any, **kwargs: Any) -> str:
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_unless_proc)


@pytest.mark.usefixtures("hidden_proc")
def test_kernels_the_servers_proc_cannot_see_stay_in_the_reserve() -> None:
    # The cell server's unit hides other users' processes, and pooled kernels run as workers: a kernel whose
    # /proc entry cannot be read was taken for dead, so the reserve was released and started again without
    # end, and an idle cell spent its whole CPU starting kernels.
    pool = asyncio.run(asyncio.wait_for(an_idle_pool_probed(rounds=10), 30))
    assert pool.started == ["k0", "k1"], f"{len(pool.started)} kernels started for a reserve of 2"


@pytest.mark.usefixtures("hidden_proc")
def test_a_kernel_whose_process_is_gone_is_dead_though_its_proc_entry_cannot_be_read() -> None:
    child = subprocess.Popen(["sleep", "60"])
    kernel = Kernel("k", child.pid, None, ClientWithoutChannels(), asyncio.Event())  # type: ignore[arg-type]
    try:
        assert kernel.alive()
    finally:
        child.kill()
        child.wait()
    assert not kernel.alive()


async def computation_whose_kernel_dies_while_its_provider_is_stopped() -> tuple[dict[str, Any], float]:
    """A real kernel killed mid-computation while its provider is stopped (it can neither reap the kernel nor
    report its death): the computation's answer, and how long after the kill it came."""
    pool = KernelPool(PoolSettings(max_kernels=1, preforked=0))
    await pool.start()
    provider = pool.provider.process
    assert provider is not None
    try:
        kernel = await pool.acquire()
        running = asyncio.ensure_future(execute(kernel, "import time; time.sleep(600)", {}, 600))
        await asyncio.sleep(0.5)  # the request is on its way; the kernel's answer would take ten minutes
        os.kill(provider.pid, signal.SIGSTOP)
        os.kill(kernel.pid, signal.SIGKILL)
        killed = time.monotonic()
        answer = await asyncio.wait_for(running, 30)
        took = time.monotonic() - killed
        alive_after = kernel.alive()
        os.kill(provider.pid, signal.SIGCONT)
        pool.release(kernel)
    finally:
        os.kill(provider.pid, signal.SIGCONT)
        await pool.stop()
    assert not alive_after, "a zombie kernel counts as alive"
    return answer, took


@pytest.mark.usefixtures("hidden_proc")
def test_a_kernel_that_dies_while_its_provider_is_stopped_ends_its_computation_at_once() -> None:
    # Only the provider reported deaths: a kernel killed while the provider was stopped stayed a zombie that
    # counted as alive, and every computation given to it waited out the wall limit (the cell's health check
    # spent its whole timeout on each try).
    answer, took = asyncio.run(computation_whose_kernel_dies_while_its_provider_is_stopped())
    assert answer["execute_reply"]["ename"] == "KernelDied", answer
    assert took < 5, f"the computation answered {took:.1f} s after its kernel died"


class PoolWhoseKernelsDoNotStart(PoolOfStubKernels):
    """Every kernel start ends in the given error: silent past the start timeout, or broken."""

    def __init__(self, error: Exception) -> None:
        super().__init__(PoolSettings(max_kernels=2, preforked=0))
        self.error = error

    async def _start_kernel(self) -> Kernel:
        await asyncio.sleep(0)
        raise self.error


async def health_after_failed_starts(
    error: Exception, succeeded_before: bool, seconds_ago: float = 0, config: ServerConfig | None = None
) -> str | None:
    pool = PoolWhoseKernelsDoNotStart(error)
    await pool.start()
    probe = HealthProbe(pool, max_age=0, slow_seconds=slow_cell_seconds(config or ServerConfig()))
    if succeeded_before:
        probe.witness({"success": True})
        assert probe._last_success is not None
        probe._last_success -= seconds_ago
    probe._last = None  # the success's result is spent: the next probe computes
    try:
        return await probe.failure()
    finally:
        await pool.stop()


@pytest.mark.parametrize("succeeded_before", [True, False])
def test_a_kernel_slow_to_start_is_a_slow_cell_not_a_broken_one(succeeded_before: bool) -> None:
    # Kernel starts time out on a cell starved by its own computations; calling that broken took every such
    # cell out of the load balancer at once.
    failure = asyncio.run(health_after_failed_starts(KernelSilentError("silent"), succeeded_before))
    if succeeded_before:
        assert failure is None
    else:
        assert failure is not None and "slow to start" in failure and "no computation has succeeded" in failure


def test_a_kernel_that_cannot_start_makes_the_cell_unhealthy_at_once() -> None:
    failure = asyncio.run(health_after_failed_starts(RuntimeError("exited"), succeeded_before=True))
    assert failure is not None and "failed to start" in failure


@pytest.mark.parametrize(("timeout", "healthy"), [(30, False), (90, True)])
def test_a_cell_busy_with_long_computations_stays_healthy_as_long_as_they_may_run(timeout: int, healthy: bool) -> None:
    # A burst of computations that each run to a 90 s limit leaves a cell no success for over a minute: a
    # fixed 60 s took every such cell out of the load balancer at once.
    config = ServerConfig(timeout=timeout)
    failure = asyncio.run(health_after_failed_starts(KernelSilentError("silent"), True, 80, config))
    assert (failure is None) == healthy, failure
