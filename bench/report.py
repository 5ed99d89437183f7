#!/usr/bin/env python3
"""`make bench`: runs every benchmark under bench/ against the lab, then writes docs/measurements.md with
each issue's targets beside the measured values, and its PNG plots under docs/measurements/.

Each benchmark writes its own JSON under bench/results/; the report keeps the newest of each in the committed
record (labkit.results), reads them from there and says, for each, whether it was measured in this run or is
left from an earlier one (`--skip`, a failed benchmark, or another machine), with its time.
The foundation benchmark builds its own four VMs: the lab's VMs are paused (virsh suspend) while it runs, so
the two do not share the two emulated CPUs, and resumed afterwards. `--report-only` rewrites the report from
the JSON already there (`make chaos` does, with its own results).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit import results, units
from service_pooled import RATIO_DIGITS, TARGET_RATIO, TARGET_REUSABLE_MS  # the benchmark prints its verdicts too

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REPORT = PROJECT_ROOT / "docs" / "measurements.md"
FIGURES = REPORT.with_suffix("")
LIBVIRT = "qemu:///system"
LAB_VMS = ("lb1", "cell1", "cell2", "data1")
CLONE_TO_SERVING_TARGET_S = 300  # issue 6: clone, boot, converge, health, under emulation


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    result: str  # the JSON file it writes under bench/results
    what: str
    arguments: tuple[str, ...] = ()
    pauses_lab: bool = False


BENCHMARKS = (
    Benchmark("foundation", "foundation.py", "foundation.json",
              "image build cold and cached, overlay, clones to SSH, converges with and without Mitogen",
              pauses_lab=True),
    Benchmark("service", "service.py", "service.json", "/service on this machine, fresh kernel each"),
    Benchmark("service_sage", "service_sage.py", "service_sage.json",
              "/service with the Sage kernel on this machine, fresh kernel each, 1/8/32 clients"),
    Benchmark("permalinks", "permalinks.py", "permalinks.json", "permalink store on this machine"),
    Benchmark("sessions", "sessions.py", "sessions.json",
              "kernel sessions with the Sage kernel on this machine: creation, interact update, idle PSS"),
    Benchmark("stack", "stack.py", "stack.json", "through HAProxy+TLS beside direct, concurrency 1/8/32"),
    Benchmark("sessions_lab", "sessions_lab.py", "sessions_lab.json",
              "kernel sessions through HAProxy+TLS on the lab: creation, sessions held per cell"),
    Benchmark("service_pooled", "service_pooled.py", "service_pooled.json", "/service on cell1 with confined workers"),
    Benchmark("worker_pool", "worker_pool.py", "worker_pool.json", "worker launch and reset on cell1"),
    Benchmark("unit_security", "unit_security.py", "unit_security.json", "systemd-analyze security of the services"),
    Benchmark("cluster_ops", "cluster_ops.py", "cluster_ops.json",
              "snapshot, clone-to-serving of a new cell, removal, rolling update under load"),
)  # fmt: skip
CHAOS = Benchmark("chaos", "../tests/chaos", "chaos.json", "fault scenarios (`make chaos`)")
ROLLING_UPDATE_PLOT = "rolling_update_latency.png"  # cluster_ops draws it among its results


@dataclass(frozen=True)
class Target:
    name: str
    measured: float | None
    unit: str
    target: str
    met: bool | None
    source: str


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def virsh(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", LIBVIRT, *arguments], capture_output=True, text=True, check=False)


@contextmanager
def lab_paused() -> Iterator[list[str]]:
    """The lab's running VMs suspended (no CPU) for the duration, resumed even when the benchmark fails."""
    running = set(virsh("list", "--name", "--state-running").stdout.split())
    paused = [vm for vm in LAB_VMS if vm in running]
    for vm in paused:
        virsh("suspend", vm)
    try:
        yield paused
    finally:
        for vm in paused:
            virsh("resume", vm)


def run_benchmark(benchmark: Benchmark, extra: list[str]) -> tuple[bool, float]:
    command = [sys.executable, str(PROJECT_ROOT / "bench" / benchmark.script), *benchmark.arguments, *extra]
    started = time.monotonic()
    if benchmark.pauses_lab:
        with lab_paused() as paused:
            log(f"{benchmark.name}: lab VMs paused meanwhile: {', '.join(paused) or 'none running'}")
            finished = subprocess.run(command, check=False)
    else:
        finished = subprocess.run(command, check=False)
    return finished.returncode == 0, time.monotonic() - started


def load(result: str) -> tuple[dict[str, Any] | list[Any] | None, float | None]:
    path, measured_at = results.newest(result)
    if path is None:
        return None, None
    return json.loads(path.read_text()), measured_at


def at_most(measured: float | None, limit: float) -> bool | None:
    return None if measured is None else measured <= limit


def at_least(measured: float | None, floor: float) -> bool | None:
    return None if measured is None else measured >= floor


def dig(data: Any, *keys: str | int) -> Any:
    for key in keys:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def foundation_targets(data: Any) -> list[Target]:
    targets = [
        Target(row["name"], row["value"], row["unit"], row["target"], row["met"], "foundation")
        for row in dig(data, "results") or []
        if row.get("target")
    ]
    if not any(target.name.startswith("image build, cold") for target in targets):
        targets.insert(0, Target("image build, cold", None, "s", "<= 240 s", None, "foundation"))
    return targets


def service_targets(data: Any) -> list[Target]:
    per_second = dig(data, "concurrency 8", "per_second")
    p50 = dig(data, "concurrency 1", "p50_ms")
    return [
        Target("print(1+1) at concurrency 8, fresh kernel each", per_second, "/s", ">= 20/s", at_least(per_second, 20),
               "service"),
        Target("print(1+1) p50 at concurrency 1", p50, "ms", "<= 100 ms", at_most(p50, 100), "service"),
    ]  # fmt: skip


def service_sage_targets(data: Any) -> list[Target]:
    per_second = dig(data, "print(1+1) at 8", "per_second")
    p90 = dig(data, "print(1+1) at 1", "p90_ms")
    return [
        Target("Sage print(1+1) at 8 clients, fresh kernel each", per_second, "/s", ">= 10/s",
               at_least(per_second, 10), "service_sage"),
        Target("Sage print(1+1) p90 at 1 client", p90, "ms", "<= 150 ms", at_most(p90, 150), "service_sage"),
    ]  # fmt: skip


def permalink_targets(data: Any) -> list[Target]:
    reads, writes = dig(data, "results", "reads"), dig(data, "results", "durable writes")
    worst_p99 = max((dig(row, "p99_ms") or 0 for row in (reads, writes)), default=None) if reads and writes else None
    return [
        Target("permalink reads", dig(reads, "per_second"), "/s", ">= 1500/s",
               at_least(dig(reads, "per_second"), 1500), "permalinks"),
        Target("permalink durable writes", dig(writes, "per_second"), "/s", ">= 500/s",
               at_least(dig(writes, "per_second"), 500), "permalinks"),
        Target("permalink p99, reads and writes", worst_p99, "ms", "<= 50 ms", at_most(worst_p99, 50), "permalinks"),
    ]  # fmt: skip


def session_targets(data: Any) -> list[Target]:
    creation, update = dig(data, "creation_p50_ms"), dig(data, "interact_update_p50_ms")
    return [
        Target("Sage kernel session, POST /kernel to first reply, p50", creation, "ms", "<= 150 ms",
               at_most(creation, 150), "sessions"),
        Target("@interact slider change to new output, p50", update, "ms", "<= 100 ms", at_most(update, 100),
               "sessions"),
        Target("PSS per idle Sage session (50 held)", dig(data, "pss_mib_per_idle_session"), "MiB", "printed", None,
               "sessions"),
    ]  # fmt: skip


def lab_session_targets(data: Any) -> list[Target]:
    return [
        Target("lab: POST /kernel to first reply through HAProxy+TLS, p50", dig(data, "creation_p50_ms"), "ms",
               "reported", None, "sessions_lab"),
        Target("lab: idle sessions held at once, both cells", dig(data, "held"), "", "reported", None,
               "sessions_lab"),
    ]  # fmt: skip


def cluster_targets(data: Any) -> list[Target]:
    seconds = dig(data, "clone_to_serving_s")
    return [
        Target(
            "clone-to-serving of a new cell",
            seconds,
            "s",
            f"<= {CLONE_TO_SERVING_TARGET_S} s",
            at_most(seconds, CLONE_TO_SERVING_TARGET_S),
            "cluster_ops",
        ),
    ]


def cpu_ratio(data: Any, load: str) -> float | None:
    pooled, unpooled = dig(data, "pooled", load, "cpu_s_per_answer"), dig(data, "unpooled", load, "cpu_s_per_answer")
    return pooled / unpooled if pooled and unpooled else None


def pooled_targets(data: Any) -> list[Target]:
    ratios = {load: None if ratio is None else round(ratio, RATIO_DIGITS)  # results stored before ratio_of
              for load, ratio in (dig(data, "pooled / unpooled") or {"concurrency 8": None}).items()}  # fmt: skip
    size = dig(data, "pool size")
    pool = f" (pool of {size})" if size else ""
    reusable = dig(data, "release to reusable", "p50_ms")
    throughput = [
        Target(f"lab cell: pooled /service throughput / unpooled, {load}{pool}", ratio, "x",
               f">= {TARGET_RATIO}x", at_least(ratio, TARGET_RATIO), "service_pooled")
        for load, ratio in ratios.items()
    ]  # fmt: skip
    # The CPU an answer costs each mode: what sets throughput on a cell the load keeps busy, with less noise.
    cpu = [
        Target(f"lab cell: CPU s per answer, pooled / unpooled, {load}", cpu_ratio(data, load), "x", "printed",
               None, "service_pooled")
        for load in ratios
    ]  # fmt: skip
    return [
        *throughput,
        *cpu,
        Target("lab cell: worker release to reusable, median", reusable, "ms", f"<= {TARGET_REUSABLE_MS:.0f} ms",
               at_most(reusable, TARGET_REUSABLE_MS), "service_pooled"),
    ]  # fmt: skip


def chaos_targets(data: Any) -> list[Target]:
    outcomes = {row["scenario"]: row for row in data or []}
    kill = dig(outcomes, f"kill -9 {units.CELL_SERVER} on cell1", "numbers", "unit_running_again_s")
    lost_vm = dig(outcomes, "abrupt loss of a cell VM", "numbers", "out_of_rotation_after_s")
    return [
        Target("kill -9 of the cell server: running again", kill, "s", "<= 5 s", at_most(kill, 5), "chaos"),
        Target("lost cell VM out of rotation", lost_vm, "s", "<= 3 s", at_most(lost_vm, 3), "chaos"),
    ]  # fmt: skip


TARGETS: dict[str, Callable[[Any], list[Target]]] = {
    "foundation.json": foundation_targets,
    "service.json": service_targets,
    "service_sage.json": service_sage_targets,
    "permalinks.json": permalink_targets,
    "sessions.json": session_targets,
    "sessions_lab.json": lab_session_targets,
    "cluster_ops.json": cluster_targets,
    "service_pooled.json": pooled_targets,
    "chaos.json": chaos_targets,
}


def number(value: float) -> str:
    """Three significant digits below 100: a ratio of 0.95 against a 0.9 target must not read as 0.9."""
    return f"{value:,.2f}" if value < 10 else f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def headless_pyplot() -> Any:
    """matplotlib's pyplot drawing to files, without a display; imported only when a plot is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stack(data: Any, path: Path) -> bool:
    """p50 and p99 latency of print(1+1) by concurrency, through HAProxy+TLS beside direct."""
    plt = headless_pyplot()
    loads = [load for load in dig(data, "direct") or {} if load.startswith("print(1+1)")]
    if not loads:
        return False
    clients = [int(load.split(", ")[1].split()[0]) for load in loads]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for path_name, style in (("direct", "o-"), ("through HAProxy+TLS", "s--")):
        for axis, key in zip(axes, ("p50_ms", "p99_ms"), strict=True):
            axis.plot(clients, [data[path_name][load][key] / 1000 for load in loads], style, label=path_name)
    for axis, title in zip(axes, ("p50", "p99"), strict=True):
        axis.set_xscale("log", base=2)
        axis.set_xticks(clients, [str(c) for c in clients])
        axis.set_xlabel("clients at once")
        axis.set_ylabel("seconds")
        axis.set_title(f"print(1+1) latency, {title}")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def plot_clone_steps(data: Any, path: Path) -> bool:
    """Where the clone-to-serving time of a new cell goes, per step, against the 5-minute target."""
    plt = headless_pyplot()
    steps = dig(data, "clone_to_serving_steps_s")
    if not steps:
        return False
    figure, axis = plt.subplots(figsize=(10, 2.6))
    left = 0.0
    for step, seconds in steps.items():
        axis.barh(["new cell"], [seconds], left=left, label=f"{step} {seconds:.0f} s")
        left += seconds
    axis.axvline(CLONE_TO_SERVING_TARGET_S, color="red", linestyle="--", label=f"target {CLONE_TO_SERVING_TARGET_S} s")
    axis.set_xlabel("seconds")
    axis.legend(ncol=4, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.35))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def stack_table(data: Any) -> list[str]:
    lines = ["| load | direct /s | direct p50 / p99 ms | HAProxy+TLS /s | HAProxy+TLS p50 / p99 ms | ratio | "
             "outcomes through HAProxy |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for load, direct in (dig(data, "direct") or {}).items():
        through = data["through HAProxy+TLS"][load]
        ratio = through["per_second"] / direct["per_second"] if direct["per_second"] else 0.0
        lines.append(
            f"| {load} | {direct['per_second']:.2f} | {direct['p50_ms']:.0f} / {direct['p99_ms']:.0f} | "
            f"{through['per_second']:.2f} | {through['p50_ms']:.0f} / {through['p99_ms']:.0f} | {ratio:.2f} | "
            f"{through['outcomes']} |"
        )
    return lines


def mitogen_ratio(data: Any) -> str | None:
    rows = {row["name"]: row["value"] for row in dig(data, "results") or []}
    mitogen = rows.get("no-change re-converge (Mitogen)")
    plain = next((value for name, value in rows.items() if name.startswith("no-change re-converge (plain")), None)
    if not mitogen or not plain:
        return None
    return (f"No-change re-converge: Mitogen {mitogen:.0f} s, plain Ansible with pipelining and ControlPersist "
            f"{plain:.0f} s: plain takes {plain / mitogen:.1f}x as long.")  # fmt: skip


def write_report(started: float, ran: dict[str, tuple[bool, float]]) -> Path:
    lines = [
        "# cellfleet benchmarks",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench` on this machine "
        "(2 cores, QEMU emulation without KVM: absolute numbers are far below real hardware).",
        "",
        "## Where each number comes from",
        "",
        "| benchmark | what | measured |",
        "|---|---|---|",
    ]
    sources = [*BENCHMARKS, CHAOS]
    loaded: dict[str, Any] = {}
    for benchmark in sources:
        data, written = load(benchmark.result)
        loaded[benchmark.result] = data
        if written is None:
            when = "never: no result"
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(written))
            when = f"in this run, {stamp}" if written >= started else f"**not in this run**: {stamp}"
        if benchmark.name in ran and not ran[benchmark.name][0]:
            when += " (this run's attempt failed)"
        lines.append(f"| {benchmark.name} | {benchmark.what} | {when} |")
    lines += [
        "",
        "## Targets from the issues",
        "",
        "| what | measured | target | met | from |",
        "|---|---|---|---|---|",
    ]
    for result, targets_of in TARGETS.items():
        for target in targets_of(loaded.get(result)):
            met = {True: "yes", False: "**no**", None: "-"}[target.met]
            measured = "not measured" if target.measured is None else f"{number(target.measured)} {target.unit}"
            lines.append(f"| {target.name} | {measured} | {target.target} | {met} | "
                         f"{target.source} |")  # fmt: skip
    ratio = mitogen_ratio(loaded.get("foundation.json"))
    if ratio:
        lines += ["", ratio]
    stack = loaded.get("stack.json")
    if stack:
        lines += ["", "## Through HAProxy+TLS beside direct (lab)", "", *stack_table(stack)]
        if plot_stack(stack, FIGURES / "latency_by_concurrency.png"):
            lines += ["", f"![latency by concurrency]({FIGURES.name}/latency_by_concurrency.png)"]
    cluster = loaded.get("cluster_ops.json")
    if cluster and plot_clone_steps(cluster, FIGURES / "clone_to_serving_steps.png"):
        lines += ["", "## Clone-to-serving of a new cell", "",
                  f"![clone to serving]({FIGURES.name}/clone_to_serving_steps.png)"]  # fmt: skip
        rolling, _measured_at = results.newest(ROLLING_UPDATE_PLOT)
        if rolling is not None:
            shutil.copyfile(rolling, FIGURES / ROLLING_UPDATE_PLOT)
            lines += ["", "## Rolling update under load", "",
                      f"![rolling update]({FIGURES.name}/{ROLLING_UPDATE_PLOT})"]  # fmt: skip
    chaos_report, _measured_at = results.newest("chaos.md")
    if chaos_report is not None:
        lines += ["", chaos_report.read_text().replace("# Chaos on the lab", "## Chaos (`make chaos`)", 1)]
    REPORT.write_text("\n".join(lines).rstrip() + "\n")
    return REPORT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=[b.name for b in BENCHMARKS], metavar="NAME")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from bench/results")
    parser.add_argument("--skip-cold", action="store_true", help="foundation without the cold image build")
    args = parser.parse_args()
    results.RUN_RESULTS.mkdir(parents=True, exist_ok=True)
    FIGURES.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ran: dict[str, tuple[bool, float]] = {}
    if not args.report_only:
        for benchmark in BENCHMARKS:
            if benchmark.name in args.skip:
                continue
            extra = ["--skip-cold"] if benchmark.name == "foundation" and args.skip_cold else []
            log(f"{benchmark.name}: {benchmark.what}")
            ran[benchmark.name] = run_benchmark(benchmark, extra)
            log(f"{benchmark.name}: {'done' if ran[benchmark.name][0] else 'FAILED'} in {ran[benchmark.name][1]:.0f} s")
    kept = results.keep([*(b.result for b in [*BENCHMARKS, CHAOS]), "chaos.md", ROLLING_UPDATE_PLOT])
    log(f"kept in {results.RECORD.relative_to(PROJECT_ROOT)}: {', '.join(kept) or 'nothing new'}")
    path = write_report(started, ran)
    print(path.read_text())
    print(f"written to {path.relative_to(PROJECT_ROOT)}")
    sys.exit(0 if all(ok for ok, _seconds in ran.values()) else 1)


if __name__ == "__main__":
    main()
