"""Converges of the running lab under a steady load through the load balancer: a changed cell server setting
restarts the cells one at a time, each drained first, and no request fails; a no-change converge right after a
burst of hostile computations keeps every cell in rotation and restarts nothing.

Runs with `make cluster-test` after `make up` (root, on the lab's machine); minutes under emulation.
"""

from __future__ import annotations

import json
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import pytest

from labkit import units
from labkit.lab import CELLS, LOAD_BALANCER, StatusWatch, playbook, ssh
from labkit.load import SteadyLoad, enter_lab_namespace, in_lab_namespace_possible

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


# What starved the lab's cells before: each computation ends by a limit (tasks, memory, wall time) or leaves
# processes and files behind for the clean-up.
HOSTILE_COMPUTATIONS = {
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "memory hog": "hog = []\nwhile True:\n    hog.append(bytearray(64 << 20))",
    "busy loop": "while True:\n    pass",
    "files everywhere": (
        "import os\nfor place in ('/tmp', '/var/tmp', '/dev/shm', os.path.expanduser('~'), '.'):\n"
        "    for n in range(200):\n"
        "        open(os.path.join(place, f'hostile-{n}'), 'wb').write(os.urandom(4096))\nprint('written')"
    ),
    "daemon": "import subprocess\nsubprocess.Popen(['setsid', 'sh', '-c', 'sleep 600 & sleep 600'])\nprint('left')",
}
HOSTILE_ROUNDS = 3
UNIT_INVOCATIONS = f"systemctl show -P InvocationID {units.CELL_SERVER} {units.KERNEL_PROVIDER}"


def compute(code: str) -> str:
    """One computation through the load balancer, from the lab's namespace; its outcome as the load counts it."""
    enter_lab_namespace()
    body = urllib.parse.urlencode({"code": code}).encode()
    context = ssl._create_unverified_context()
    try:
        with urllib.request.urlopen(f"https://{LOAD_BALANCER}/service", body, timeout=180, context=context) as answer:
            return "success" if json.load(answer)["success"] else "failed"
    except urllib.error.HTTPError as error:
        return str(error.code)
    except OSError as error:
        return type(error).__name__


def hostile_burst() -> list[str]:
    """Every hostile computation, several times, all at once."""
    codes = list(HOSTILE_COMPUTATIONS.values()) * HOSTILE_ROUNDS
    with ThreadPoolExecutor(len(codes)) as pool:
        return list(pool.map(compute, codes))


def test_a_no_change_converge_after_a_hostile_burst_keeps_every_cell_serving() -> None:
    invocations = {name: ssh(address, UNIT_INVOCATIONS).split() for name, address in CELLS.items()}
    since = {name: ssh(address, "date +%s").strip() for name, address in CELLS.items()}
    burst = hostile_burst()
    with SteadyLoad(f"https://{LOAD_BALANCER}/service", clients=2) as load:
        converged = playbook("site.yml")
    assert converged.returncode == 0, converged.stdout[-3000:]
    outcomes = load.outcomes()
    health_log = {
        name: ssh(address, f"journalctl -u {units.CELL_HEALTH} --since @{since[name]} -o cat")
        for name, address in CELLS.items()
    }
    print(f"hostile burst: {burst}; no-change converge under 2 clients: {dict(outcomes)}")
    for name, log in health_log.items():
        print(f"{name} health timer since the burst:\n{log}")
    changes = re.findall(r"changed=(\d+)", converged.stdout.split("PLAY RECAP")[-1])
    assert changes and set(changes) == {"0"}, converged.stdout[-3000:]
    assert outcomes["503 from the proxy"] == 0, (outcomes, load.wrong_answers())
    assert set(outcomes) == {"200"}, (outcomes, load.wrong_answers())
    for name, address in CELLS.items():
        assert "restarting" not in health_log[name], health_log[name]
        assert ssh(address, UNIT_INVOCATIONS).split() == invocations[name], f"{name}: a unit restarted"
