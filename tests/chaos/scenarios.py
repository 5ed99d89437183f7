"""Fault scenarios against the running lab, each bounded and self-stopping, each saying what it did and what
was lost: kill -9 and SIGSTOP of every service, the abrupt loss of a cell VM, the log host down for 60 s under a
10,000-line burst, PostgreSQL restarted during permalink writes, HAProxy reloaded 100 times under load, and a
flood against the rate limits.

A steady load of computations runs through the load balancer (from this machine, inside the lab namespace)
during every fault; permalink writes too where the fault is on the data host. Each scenario states up front
what it may lose (the requests in flight when a process or VM dies, or sent to it before HAProxy's checks take
it out); anything beyond that fails it. test_chaos.py runs each as a test and writes bench/results/chaos.json
and chaos.md, which `make bench`'s report keeps in the committed record and folds into docs/measurements.md.
The lab is left as it was found (every service running, every cell UP), or the scenario says it could not.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from labkit import results, units
from labkit.lab import (
    CELLS,
    DATA_HOST,
    LOAD_BALANCER,
    StatusWatch,
    forget_request_rates,
    inventory_setting,
    server_state,
    ssh,
    virsh,
)
from labkit.load import Sample, SteadyLoad, enter_lab_namespace
from labkit.sending import SCRIPTS, answers_from, requests_command, script_command
from labkit.waiting import until

RESULTS = results.RUN_RESULTS
URL = f"https://{LOAD_BALANCER}/service"
PERMALINK_URL = f"https://{LOAD_BALANCER}/permalink"
LOG_DIR = "/var/log/cellfleet-hosts"
# How long a SIGSTOPped process stays stopped when nothing restarts it first (the cell server's watchdog does).
STOP_SECONDS = 20
# How long a unit may take to run again after its fault, unless it is one the roles allow longer to start.
RECOVERY_LIMIT_SECONDS = 180


@dataclass
class Outcome:
    scenario: str
    did: str
    may_lose: str
    lost: int
    passed: bool
    numbers: dict[str, Any] = field(default_factory=dict)
    measured_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def wait_until(condition: Callable[[], bool], limit: float, what: str, interval: float = 1.0) -> float:
    """Seconds until condition holds; raises when it has not after limit seconds."""
    started = time.monotonic()
    if not until(condition, limit, interval=interval):
        raise TimeoutError(f"not within {limit:.0f} s: {what}")
    return time.monotonic() - started


def every_cell_up() -> bool:
    try:
        return all(server_state(cell) == "UP" for cell in CELLS)
    except (AssertionError, OSError, subprocess.SubprocessError):
        return False  # no answer from the load balancer counts as not yet


def running_postgresql_unit() -> str:
    """The data host's PostgreSQL server unit (postgresql@VERSION-CLUSTER on Debian)."""
    return ssh(DATA_HOST, "systemctl list-units --plain --no-legend --state=running 'postgresql@*'").split()[0]


def failures_between(samples: list[Sample], start: float, end: float) -> Counter[str]:
    return Counter(s.outcome for s in samples if start <= s.started < end and s.outcome != "200")


# --- permalink writes through the load balancer --------------------------------------------------------------


@dataclass
class PermalinkWriter:
    """Writes numbered permalinks through the load balancer until stopped; keeps the acknowledged ones."""

    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    acknowledged: dict[str, str] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PermalinkWriter:
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=120)

    def _write(self) -> None:
        enter_lab_namespace()
        context = ssl._create_unverified_context()
        number = 0
        while not self._stop.is_set():
            number += 1
            code = f"print('chaos {self.run} {number}')"
            try:
                body = urllib.parse.urlencode({"code": code}).encode()
                with urllib.request.urlopen(PERMALINK_URL, body, timeout=30, context=context) as answer:
                    self.acknowledged[json.load(answer)["query"]] = code
            except urllib.error.HTTPError as error:
                self.refused[str(error.code)] += 1
                time.sleep(0.2)
            except (OSError, ValueError) as error:
                self.refused[type(error).__name__] += 1
                time.sleep(0.2)
            time.sleep(0.1)

    def server_errors(self) -> int:
        """Writes answered 500: a database outage must be a 503 to retry, never a server error."""
        return self.refused["500"]

    def lost(self) -> list[str]:
        """Acknowledged permalinks that do not read back with their code, read through the load balancer."""
        missing: list[str] = []

        def read_all() -> None:  # a thread of its own enters the lab namespace; the main thread stays out
            enter_lab_namespace()
            context = ssl._create_unverified_context()
            for ident, code in self.acknowledged.items():
                try:
                    url = f"{PERMALINK_URL}?{urllib.parse.urlencode({'q': ident})}"
                    with urllib.request.urlopen(url, timeout=30, context=context) as answer:
                        if code not in answer.read().decode():
                            missing.append(ident)
                except (OSError, ValueError):
                    missing.append(ident)

        reader = threading.Thread(target=read_all)
        reader.start()
        reader.join()
        return missing


# --- scenarios -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessFault:
    host: str
    address: str
    unit: str
    signal: str  # KILL: kill -9 of the main process; STOP: every process of the unit stopped
    side: str  # cell, balancer, data

    @property
    def name(self) -> str:
        return f"{'kill -9' if self.signal == 'KILL' else 'SIGSTOP'} {self.unit} on {self.host}"


# The data host's PostgreSQL unit is named after its version and cluster: found when its scenario runs.
DATABASE = "postgresql"


def process_faults() -> list[ProcessFault]:
    cell, address = "cell1", CELLS["cell1"]
    faults = [
        ProcessFault(cell, address, unit, signal, "cell")
        for unit in (units.CELL_SERVER, units.KERNEL_PROVIDER, "nginx.service")
        for signal in ("KILL", "STOP")
    ]
    faults += [ProcessFault("lb1", LOAD_BALANCER, "haproxy.service", signal, "balancer") for signal in ("KILL", "STOP")]
    faults += [
        ProcessFault("data1", DATA_HOST, unit, signal, "data")
        for unit in (units.PERMALINKS, DATABASE)
        for signal in ("KILL", "STOP")
    ]
    return faults


MAY_LOSE = {
    "cell": "computations in flight on cell1 at the fault or sent to it before HAProxy's checks took it out",
    "balancer": "every request while the only load balancer is down or stopped (the lab has one)",
    "data": "no acknowledged permalink; writes during the outage may be refused (503, not 500); no computation",
}


@dataclass(frozen=True)
class FaultTimes:
    issued: float  # monotonic: when the fault's command was sent
    struck: float  # when the signal was sent on the VM: times count from here
    unit_back: float  # when the unit ran again
    recovered: float  # when, besides, every cell was UP in the load balancer
    on_the_vm: dict[str, Any]  # after_signal.py's own times, from the signal, without SSH round trips


def scenario_load() -> SteadyLoad:
    """The load every scenario runs under: 2 clients computing through HAProxy, a request every 0.5 s each."""
    return SteadyLoad(URL, clients=2, pause_seconds=0.5)


def run_process_fault(fault: ProcessFault) -> Outcome:
    if fault.unit == DATABASE:
        fault = replace(fault, unit=running_postgresql_unit())
    watch = StatusWatch("cell1") if fault.side == "cell" else None
    writer = PermalinkWriter() if fault.side == "data" else None
    try:
        with scenario_load() as load, writer or nullcontext():
            load.wait_for_answers(4)
            if watch:
                watch.wait_streaming()
            times = strike_and_recover(fault)
            load.wait_for_answers(8, since=times.recovered)  # what is lost after the recovery shows too
        return process_fault_outcome(fault, times, load.samples, watch, writer)
    finally:
        if watch:
            watch.stop()


def recovery_limit(unit: str) -> float:
    """How long a unit may take to run again: the kernel provider imports and warms Sage before it serves, which
    its unit is allowed the role's start timeout for (minutes on a starved emulated cell); every other unit
    RECOVERY_LIMIT_SECONDS."""
    if unit == units.KERNEL_PROVIDER:
        return max(RECOVERY_LIMIT_SECONDS, float(inventory_setting("cells", "cell_server_provider_start_timeout")))
    return RECOVERY_LIMIT_SECONDS


def strike_and_recover(fault: ProcessFault) -> FaultTimes:
    # The signal and the wait for the unit run on the VM (tests/remote/after_signal.py): an SSH command takes
    # seconds to connect under emulation, and polling over SSH would blur the times by as much.
    options = ["--whole-unit", "--resume-after", str(STOP_SECONDS)] if fault.signal == "STOP" else []
    signal = f"SIG{fault.signal}"
    limit = recovery_limit(fault.unit)
    command = script_command(SCRIPTS / "after_signal.py", fault.unit, signal, f"{limit:g}", *options)
    issued = time.monotonic()
    on_the_vm = json.loads(ssh(fault.address, command))
    unit_back = time.monotonic()
    if on_the_vm["running"] is None:
        raise TimeoutError(f"{fault.unit} not running again {limit:g} s after {signal}: {on_the_vm}")
    struck = unit_back - on_the_vm["running"]
    wait_until(every_cell_up, RECOVERY_LIMIT_SECONDS, "every cell UP in the load balancer")
    return FaultTimes(issued, struck, unit_back, time.monotonic(), on_the_vm)


def process_fault_outcome(
    fault: ProcessFault,
    times: FaultTimes,
    samples: list[Sample],
    watch: StatusWatch | None,
    writer: PermalinkWriter | None,
) -> Outcome:
    during = failures_between(samples, times.issued - 120, times.recovered)
    after = failures_between(samples, times.recovered, float("inf"))
    numbers: dict[str, Any] = {
        "fault_command_s": round(times.struck - times.issued, 1),
        "new_process_s": times.on_the_vm["new_process"] and round(times.on_the_vm["new_process"], 1),
        "unit_running_again_s": round(times.on_the_vm["running"], 1),
        "resumed_by_sigcont": times.on_the_vm["resumed"],
        "recovered_s": round(times.recovered - times.struck, 1),  # running again and every cell UP in the balancer
        "restarted": times.on_the_vm["pid"] != times.on_the_vm["old_pid"],
        "requests": len(samples),
        "failed_until_recovered": dict(during),
        "failed_after": dict(after),
    }
    lost = sum(after.values())
    if watch:
        out = watch.out_of_rotation_since(times.issued)
        numbers["out_of_rotation_after_s"] = round(out - times.struck, 1) if out else None
    if fault.side == "data":
        lost += sum(during.values())  # computations never touch the data host
    if writer:
        missing = writer.lost()
        numbers |= {"permalinks_acknowledged": len(writer.acknowledged), "permalinks_refused": dict(writer.refused)}
        numbers["permalinks_lost"] = len(missing)
        lost += len(missing)
    server_errors = writer.server_errors() if writer else 0
    held = f", held {STOP_SECONDS} s unless restarted" if fault.signal == "STOP" else ""
    did = f"{fault.name} under load{held}"
    return Outcome(fault.name, did, MAY_LOSE[fault.side], lost, lost == 0 and server_errors == 0, numbers)


def vm_loss() -> Outcome:
    victim = "cell2"
    watch = StatusWatch(victim)
    try:
        with scenario_load() as load:
            load.wait_for_answers(4)
            watch.wait_streaming()
            issued = time.monotonic()
            virsh("destroy", victim)
            destroyed = time.monotonic()  # the guest stops running by the time virsh returns
            wait_until(lambda: watch.out_of_rotation_since(issued) is not None, 60, f"{victim} out of rotation")
            out = watch.out_of_rotation_since(issued) or destroyed
            load.wait_for_answers(16, since=out)  # served by the other cell alone
        in_flight = failures_between(load.samples, issued - 120, out)
        after = failures_between(load.samples, out, float("inf"))
    finally:
        watch.stop()
        if virsh("domstate", victim).strip() != "running":
            virsh("start", victim)
    back = wait_until(every_cell_up, 600, f"{victim} back UP after its restart", interval=5)
    numbers = {
        "destroy_command_s": round(destroyed - issued, 1),
        "out_of_rotation_after_s": round(out - destroyed, 1),
        "requests": len(load.samples),
        "failed_in_flight": dict(in_flight),
        "failed_after": dict(after),
        "back_in_rotation_after_restart_s": round(back, 1),
    }
    lost = sum(after.values())
    return Outcome(
        "abrupt loss of a cell VM", f"virsh destroy {victim} under load, then started again",
        "computations in flight on the lost cell before HAProxy's checks took it out", lost,
        lost == 0 and out - destroyed <= 3.0, numbers,
    )  # fmt: skip


# Sends numbered lines to syslog as fast as logger goes; journald's rate limit must not drop them either.
BURST = "seq 1 {lines} | sed 's/^/chaos line /' | logger -t {tag} -p user.notice"


def log_host_outage(lines: int = 10_000, outage: float = 60) -> Outcome:
    tag = f"chaos-{uuid.uuid4().hex[:8]}"
    client, client_address = "cell1", CELLS["cell1"]
    # The socket too: journald writing to it would start rsyslog again at once (socket activation).
    ssh(DATA_HOST, "systemctl stop syslog.socket rsyslog.service")
    try:
        stopped = time.monotonic()
        ssh(client_address, BURST.format(lines=lines, tag=tag))
        burst_s = time.monotonic() - stopped
        time.sleep(max(0.0, outage - burst_s))
    finally:
        ssh(DATA_HOST, "systemctl start rsyslog.service")
    back = time.monotonic()
    path = f"{LOG_DIR}/{client}/{tag}.log"
    count = f"cat {path}* 2>/dev/null | grep -o 'chaos line [0-9]*' | sort | uniq -c | awk '{{print $1}}'"

    def delivered() -> tuple[int, int]:
        copies = [int(n) for n in ssh(DATA_HOST, count).split()]
        return len(copies), sum(copies) - len(copies)

    with suppress(TimeoutError):
        wait_until(lambda: delivered()[0] >= lines, 300, "every line delivered", interval=5)
    distinct, duplicates = delivered()
    numbers = {
        "sent": lines, "delivered": distinct, "duplicates": duplicates, "burst_s": round(burst_s, 1),
        "outage_s": outage, "delivered_after_s": round(time.monotonic() - back, 1),
    }  # fmt: skip
    return Outcome(
        "log host down under a burst", f"rsyslog on data1 stopped {outage:.0f} s; {lines} lines sent from {client}",
        "nothing (duplicates allowed)", lines - distinct, distinct == lines, numbers,
    )  # fmt: skip


def postgresql_restart() -> Outcome:
    database = running_postgresql_unit()
    with PermalinkWriter() as writer:
        assert until(lambda: len(writer.acknowledged) >= 5, 120), f"no permalink writes before the restart: {writer}"
        ssh(DATA_HOST, f"systemctl restart {database}")
        restarted = len(writer.acknowledged)
        resumed = until(lambda: len(writer.acknowledged) >= restarted + 10, 120)
    missing = writer.lost()
    numbers = {"acknowledged": len(writer.acknowledged), "refused": dict(writer.refused), "lost": len(missing)}
    return Outcome(
        "PostgreSQL restart during permalink writes", f"systemctl restart {database} while writing permalinks",
        "no acknowledged write; refusals are 503, not 500", len(missing),
        resumed and not missing and not writer.server_errors(), numbers,
    )  # fmt: skip


def error_said(body: str) -> str:
    """The error a JSON answer gives, or the body's start."""
    try:
        return str(json.loads(body).get("error", body))
    except (ValueError, AttributeError):
        return body[:120]


def cells_own_refusals(samples: list[Sample], since_epoch: float) -> dict[str, Any]:
    """The cells' own 503s (they name their release; HAProxy's and nginx's do not), what they said, and the
    kernel starts the cells' journals saw fail meanwhile: on the emulated cells a starved CPU makes a start
    outlast its timeout, which the server answers with a 503 of its own."""
    said = Counter(error_said(s.detail) for s in samples if s.outcome == "503 from the cell")
    failed_starts = {
        cell: int(ssh(address, f"journalctl -u {units.CELL_SERVER} --since @{since_epoch:.0f} -o cat | "
                               "grep -c 'kernel.* failed' || true").strip() or 0)
        for cell, address in CELLS.items()
    }  # fmt: skip
    return {"said": dict(said), "kernel_starts_failed": failed_starts}


def under_steady_load(action: Callable[[], object]) -> tuple[float, list[Sample], dict[str, Any]]:
    """The scenarios' load around action: the seconds action took, the samples, the cells' own 503s."""
    since_epoch = time.time()
    with scenario_load() as load:
        load.wait_for_answers(2)
        started = time.monotonic()
        action()
        took = time.monotonic() - started
        load.wait_for_answers(2, since=time.monotonic())
    return took, load.samples, cells_own_refusals(load.samples, since_epoch)


def not_from_the_cells(samples: list[Sample]) -> int:
    """Requests lost on the way: refused or reset connections, timeouts, answers HAProxy made itself."""
    return sum(1 for s in samples if s.outcome not in ("200", "503 from the cell"))


def haproxy_reloads(reloads: int = 100) -> Outcome:
    # At 3 clients every 0.2 s the emulated cells ran out of kernels (3 and 7 of the cells' own 503s in two
    # runs): that measured the cells. What a reload can lose is a connection, so that is what is counted; the
    # cells' own 503s are reported beside, and `steady load, no fault` shows their rate without reloads.
    reload_command = f"for i in $(seq {reloads}); do systemctl reload haproxy.service || exit 1; done"
    took, samples, cells = under_steady_load(lambda: ssh(LOAD_BALANCER, reload_command))
    lost = not_from_the_cells(samples)
    outcomes = Counter(s.outcome for s in samples)
    numbers = {"reloads": reloads, "reloads_s": round(took, 1), "outcomes": dict(outcomes), "cells_own_503": cells}
    return Outcome(
        "HAProxy reloads under load", f"{reloads} x systemctl reload haproxy while computations run",
        "no connection: none refused, reset or timed out, no error from HAProxy (the cells' own 503s are counted "
        "beside)", lost, lost == 0 and len(samples) > 20, numbers,
    )  # fmt: skip


def steady_load_control(seconds: float = 300) -> Outcome:
    """No fault: the scenarios' load alone, so the cells' own 503s during a fault can be told from their usual rate."""
    _took, samples, cells = under_steady_load(lambda: time.sleep(seconds))
    lost = not_from_the_cells(samples)
    numbers = {"seconds": seconds, "outcomes": dict(Counter(s.outcome for s in samples)), "cells_own_503": cells}
    return Outcome(
        "steady load, no fault (control)", f"the scenarios' load for {seconds:.0f} s, nothing else",
        "nothing on the way; the cells' own 503s are their capacity", lost, lost == 0 and len(samples) > 20,
        numbers,
    )  # fmt: skip


def statuses_from(address: str, count: int) -> list[int | str]:
    """`count` computations sent at once from the VM at `address`: each answer's status or error name."""
    command = requests_command(URL, "POST", {"code": "1"}, count)
    return [status for status, _headers, _body in answers_from(ssh(address, command))]


def flood(per_ip_limit: int) -> Outcome:
    forget_request_rates()
    flooded = statuses_from(CELLS["cell1"], per_ip_limit * 2)  # twice its limit at once, then another VM's two
    other = statuses_from(DATA_HOST, 2)
    counts = Counter(str(status) for status in flooded)
    numbers = {"flood": dict(counts), "per_ip_limit": per_ip_limit, "other_client": other}
    passed = counts["429"] >= per_ip_limit and counts["200"] <= per_ip_limit and other == [200, 200]
    return Outcome(
        "flood against the rate limits", f"{per_ip_limit * 2} computations at once from cell1, then 2 from data1",
        "the flood beyond the per-client limit gets 429; the other client is served", 0, passed, numbers,
    )  # fmt: skip


def lab_rate_limit_per_ip() -> int:
    """The lab's per-client limit: its inventory's, else the role's default."""
    return int(inventory_setting("loadbalancers", "haproxy_rate_limit_per_ip"))


# --- report ----------------------------------------------------------------------------------------------------


def report(outcomes: list[Outcome]) -> str:
    lines = [
        "# Chaos on the lab",
        "",
        "Measured by `make chaos` on the lab (QEMU emulation, no KVM); each row says when.",
        "",
        "| scenario | what it did | may lose | lost | passed | numbers | measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(f"| {o.scenario} | {o.did} | {o.may_lose} | {o.lost} | {'yes' if o.passed else '**no**'} | "
                     f"`{json.dumps(o.numbers)}` | {o.measured_at} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def record(outcome: Outcome) -> None:
    """Add an outcome to the results, replacing the scenario's last one and keeping the others, dated: written
    after each scenario, so a run cut short keeps what it measured."""
    everything = merged_with_earlier([outcome])
    (RESULTS / "chaos.json").write_text(json.dumps([asdict(o) for o in everything], indent=2) + "\n")
    (RESULTS / "chaos.md").write_text(report(everything))


def merged_with_earlier(outcomes: list[Outcome]) -> list[Outcome]:
    """A run of some scenarios (--only) replaces those in the last results and keeps the others, dated."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path, _measured_at = results.newest("chaos.json")  # the committed record's on a machine that ran none yet
    earlier = [Outcome(**row) for row in json.loads(path.read_text())] if path is not None else []
    fresh = {outcome.scenario for outcome in outcomes}
    return [outcome for outcome in earlier if outcome.scenario not in fresh] + outcomes
