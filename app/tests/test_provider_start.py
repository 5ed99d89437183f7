"""How the root kernel provider starts: the order of its privileged steps and the first clean worker."""

from __future__ import annotations

import argparse
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from cellserver import cli, kernel_provider
from cellserver.kernel_box import Worker, WorkerPool


def workers(*names: str) -> tuple[Worker, ...]:
    return tuple(Worker(name, 60000 + n, 60000 + n, Path("/home") / name) for n, name in enumerate(names))


def reset_tool(tmp_path: Path, failing: set[str]) -> tuple[str, ...]:
    """A reset command that fails for the named workers and logs every worker it was called for."""
    script = tmp_path / "reset"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"open({str(tmp_path / 'calls')!r}, 'a').write(sys.argv[1] + '\\n')\n"
        f"sys.exit(1 if sys.argv[1] in {sorted(failing)!r} else 0)\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return (str(script),)


def test_the_first_clean_worker_serves_and_only_the_later_ones_wait(tmp_path: Path) -> None:
    pool = workers("w1", "w2", "w3", "w4")
    settings = kernel_provider.ProviderSettings(runtime_dir=tmp_path, reset_command=reset_tool(tmp_path, {"w1"}))

    clean, waiting = kernel_provider.reset_first_clean_worker(settings, pool)

    assert [w.name for w in clean] == ["w2"]
    assert [w.name for w in waiting] == ["w3", "w4"]  # w1 failed: out of the pool, not waiting again
    assert (tmp_path / "calls").read_text().split() == ["w1", "w2"]  # w3 and w4 reset later, in the background
    assert [w.name for w in pool] == ["w1", "w2", "w3", "w4"]


def test_the_box_places_are_made_before_the_kernel_library_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[str] = []
    places = kernel_provider.BoxPlaces(network_namespace=7)
    served: dict[str, Any] = {}

    def make_places(box: Any) -> kernel_provider.BoxPlaces:
        steps.append("box places")
        return places

    def load_kernel(kernel: str) -> list[str]:
        steps.append("kernel library")
        return []

    def serve(settings: kernel_provider.ProviderSettings, socket_path: Path, got: kernel_provider.BoxPlaces) -> None:
        served.update(settings=settings, places=got)

    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(kernel_provider, "make_box_places", make_places)
    monkeypatch.setattr(kernel_provider, "kernel_arguments", load_kernel)
    monkeypatch.setattr(kernel_provider, "serve_pool", serve)
    monkeypatch.setattr(kernel_provider, "group_id", lambda name: 1000)
    monkeypatch.setattr("cellserver.kernel_box.load_worker_pool", lambda path: WorkerPool(workers("w1"), "", {}))
    args = argparse.Namespace(
        parent_pid=None, kernel="python3", socket=tmp_path / "provider.sock", worker_pool=tmp_path / "pool.json",
        runtime_dir=tmp_path, server_group="cellserver", reset_command="/bin/true", max_processes=0,
        box=True, box_memory_mib=512, box_tasks=64, box_cpu_weight=100, box_tmpfs_mib=16,
    )  # fmt: skip

    cli.run_kernel_provider(args)

    assert steps == ["box places", "kernel library"]
    assert served["places"] is places
    assert served["settings"].box.memory_bytes == 512 << 20
