#!/usr/bin/env python3
"""Foundation benchmarks: golden image build, overlay creation, clone to SSH, converge and re-converge.

It builds its own four-VM cluster (cfbench-*, same groups as the lab) on the lab network, measures, prints a
table with each target beside the measured value, writes bench/results/foundation.json, and removes its VMs.
Run through `make bench` (which starts the lab namespace and libvirtd first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from labkit.modules import library_module

clone = library_module("libvirt_cow_clone")
PROJECT_ROOT = Path(__file__).resolve().parent.parent

VENV_BIN = Path(sys.executable).parent
RESULTS = PROJECT_ROOT / "bench" / "results" / "foundation.json"
IMAGE_LINK = Path("/var/cache/cellfleet/images/debian12-current")
SSH_KEY = "/var/lib/cellfleet/lab/ssh/id_ed25519"
NETNS = "cellfleet"
POOL = "cellfleet-lab"
# name -> (address, group); the same shape as the lab: one load balancer, two cells, one data node.
BENCH_VMS = {
    "cfbench-lb": ("10.77.0.81", "loadbalancers"),
    "cfbench-cell1": ("10.77.0.82", "cells"),
    "cfbench-cell2": ("10.77.0.83", "cells"),
    "cfbench-data": ("10.77.0.84", "permalink_db"),
}
MITOGEN_STRATEGY_DIR = next((VENV_BIN.parent / "lib").glob("python3*/site-packages/ansible_mitogen/plugins/strategy"))


@dataclass
class Result:
    name: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)

    def add(self, result: Result) -> None:
        self.results.append(result)
        verdict = "" if result.met is None else ("  met" if result.met else "  MISSED")
        print(f"[bench] {result.name}: {result.value:.2f} {result.unit}  {result.target}{verdict}", flush=True)

    def table(self) -> str:
        lines = [f"{'measure':44} {'value':>12}  {'target':16} verdict", "-" * 84]
        for r in self.results:
            verdict = "" if r.met is None else ("met" if r.met else "MISSED")
            lines.append(f"{r.name:44} {r.value:>9.2f} {r.unit:2}  {r.target:16} {verdict}")
            if r.note:
                lines.append(f"  {r.note}")
        return "\n".join(lines)


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def run(command: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def bench_image(report: Report, cold: bool) -> None:
    builder = [sys.executable, str(PROJECT_ROOT / "images/build_image.py")]
    if cold:
        with tempfile.TemporaryDirectory(prefix="cellfleet-cold-", dir="/var/tmp") as cache:
            seconds = timed(lambda: run([*builder, "--cache-dir", cache]))
        report.add(Result("image build, cold (empty cache)", seconds, "s", "<= 240 s", seconds <= 240))
    run(builder)  # make sure the real cache holds the current recipe
    seconds = timed(lambda: run(builder))
    report.add(Result("image build, cached", seconds, "s", "<= 5 s", seconds <= 5))


def bench_overlay(report: Report, conn: libvirt.virConnect) -> None:
    pool = conn.storagePoolLookupByName(POOL)
    with tempfile.TemporaryDirectory(prefix="cellfleet-bigbase-", dir="/var/tmp") as scratch:
        big_base = Path(scratch) / "big-base.raw"
        with big_base.open("wb") as handle:
            handle.truncate(256 << 30)  # 256 GiB sparse: the overlay must not care
        big_base.chmod(0o644)
        Path(scratch).chmod(0o755)
        for label, base in (("golden image", IMAGE_LINK.resolve() / "disk.qcow2"), ("256 GiB raw base", big_base)):
            fmt, capacity = clone.image_format_and_size(str(base))
            identity = clone.Identity("cfbench-overlay", "", "", "", "", f"/x/cfbench-{fmt}.qcow2", str(base))
            xml = clone.volume_xml(identity, fmt, capacity)
            started = time.monotonic()
            volume = pool.createXML(xml, 0)
            seconds = time.monotonic() - started
            size_kib = os.stat(volume.path()).st_blocks * 512 / 1024
            volume.delete(0)
            report.add(Result(f"overlay creation ({label})", seconds, "s", "< 1 s", seconds < 1))
            report.add(Result(f"overlay size on disk ({label})", size_kib, "KiB", "< 1024 KiB", size_kib < 1024))


def write_inventory(directory: Path) -> Path:
    groups: dict[str, dict] = {}
    for name, (address, group) in BENCH_VMS.items():
        groups.setdefault(group, {"hosts": {}})["hosts"][name] = {"ansible_host": address}
    groups.setdefault("log_servers", {"hosts": {}})["hosts"]["cfbench-data"] = None
    inventory = directory / "hosts.yml"
    inventory.write_text(json.dumps({"all": {"children": groups}}))
    (directory / "group_vars").symlink_to(PROJECT_ROOT / "inventory/lab/group_vars")
    return inventory


def ansible_env(mitogen: bool) -> dict[str, str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(PROJECT_ROOT / "ansible.cfg"))
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    # `make` exports the Mitogen strategy; a plain run must not inherit it.
    for name in ("ANSIBLE_STRATEGY", "ANSIBLE_STRATEGY_PLUGINS"):
        env.pop(name, None)
    if mitogen:
        env.update(ANSIBLE_STRATEGY_PLUGINS=str(MITOGEN_STRATEGY_DIR), ANSIBLE_STRATEGY="mitogen_linear")
    return env


def playbook(inventory: Path, path: str, mitogen: bool, *extra: str) -> str:
    return run([str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), path, *extra], env=ansible_env(mitogen))


def changed_total(output: str) -> int:
    return sum(int(n) for n in re.findall(r"changed=(\d+)", output.split("PLAY RECAP")[-1]))


def ssh_ready(address: str) -> bool:
    command = [
        "ip", "netns", "exec", NETNS, "ssh", "-q", "-i", SSH_KEY, "-o", "BatchMode=yes", "-o", "ConnectTimeout=2",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", f"root@{address}", "true",
    ]  # fmt: skip
    return subprocess.run(command, check=False, capture_output=True).returncode == 0


def bench_clone_to_ssh(report: Report, inventory: Path) -> None:
    started = time.monotonic()
    playbook(inventory, "playbooks/lab/vms.yml", False, "-e", "lab_wait_for_ssh=false")
    cloned = time.monotonic() - started
    waiting = {name: address for name, (address, _) in BENCH_VMS.items()}
    ready: dict[str, float] = {}
    while waiting and time.monotonic() - started < 600:
        for name, address in list(waiting.items()):
            if ssh_ready(address):
                ready[name] = time.monotonic() - started
                del waiting[name]
        time.sleep(1)
    if waiting:
        raise RuntimeError(f"never answered SSH: {', '.join(waiting)}")
    slowest = max(ready.values())
    note = f"clone+define+start of all 4: {cloned:.1f} s; each SSH-ready at " + ", ".join(
        f"{name} {seconds:.0f} s" for name, seconds in sorted(ready.items(), key=lambda item: item[1])
    )
    report.add(Result("4 clones SSH-ready in parallel", slowest, "s", "<= 90 s", slowest <= 90, note))


def bench_converge(report: Report, inventory: Path) -> None:
    seconds = timed(lambda: playbook(inventory, "playbooks/site.yml", mitogen=True))
    report.add(Result("first converge of 4 fresh VMs (Mitogen)", seconds, "s"))
    for mitogen, label in ((True, "Mitogen"), (False, "plain Ansible, pipelining + ControlPersist")):
        started = time.monotonic()
        output = playbook(inventory, "playbooks/site.yml", mitogen)
        seconds = time.monotonic() - started
        changed = changed_total(output)
        report.add(
            Result(f"no-change re-converge ({label})", seconds, "s", "<= 60 s", seconds <= 60 and changed == 0,
                   f"changed={changed} across the 4 hosts")
        )  # fmt: skip


def other_running_domains(conn: libvirt.virConnect) -> list[str]:
    """Other VMs that take CPU: a paused (suspended) domain is active too, but runs nothing."""
    return [
        d.name() for d in conn.listAllDomains()
        if d.state()[0] == libvirt.VIR_DOMAIN_RUNNING and d.name() not in BENCH_VMS
    ]  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold image build (about 2-4 min)")
    parser.add_argument("--keep", action="store_true", help="leave the benchmark VMs running")
    args = parser.parse_args(argv)
    report = Report()
    bench_image(report, cold=not args.skip_cold)
    conn = libvirt.open("qemu:///system")
    with tempfile.TemporaryDirectory(prefix="cellfleet-bench-") as scratch:
        inventory = write_inventory(Path(scratch))
        playbook(inventory, "playbooks/lab/remove-vms.yml", mitogen=False)
        busy = other_running_domains(conn)
        try:
            bench_clone_to_ssh(report, inventory)
            bench_converge(report, inventory)
            bench_overlay(report, conn)
        finally:
            if not args.keep:
                playbook(inventory, "playbooks/lab/remove-vms.yml", mitogen=False)
    context = f"2 host cores, QEMU TCG; other VMs running meanwhile: {', '.join(busy) or 'none'}"
    print("\n" + report.table() + f"\n\n{context}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"context": context, "results": [r.__dict__ for r in report.results]}
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written to {RESULTS.relative_to(PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
