"""Each pooled kernel in a box of its own: a cgroup with its own limits, private tmpfs places, loopback-only
networking; a release throws the whole box away.

Computations go to the cell server on the cell's loopback (see cells.py). The box needs the cell server's
cell_server_kernel_box (the default); a cell converged without it skips these tests.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from cells import Cell
from cellserver.kernel_box import KERNEL_CGROUP_PREFIX, KERNELS_CGROUP
from conftest import main_pid
from labkit import units

PLACES = ("/tmp", "/var/tmp", "/dev/shm", "~")

# Writes a file named after this kernel in every private place, stays alive for a few seconds so another kernel
# runs meanwhile, and reports its pid, cgroup, cgroup limits, the time it ran and what it saw of other kernels.
NEIGHBOUR = r"""
import glob, json, os, time
started = time.monotonic()
me = "box-%d" % os.getpid()
for place in PLACES:
    open(os.path.join(os.path.expanduser(place), me), "w").write(me)
cgroup = open("/proc/self/cgroup").read().strip().split("::", 1)[1]
limits = {name: open("/sys/fs/cgroup%s/%s" % (cgroup, name)).read().strip() for name in ("memory.max", "pids.max")}
time.sleep(float(6))
seen = sorted(path for place in PLACES for path in glob.glob(os.path.join(os.path.expanduser(place), "box-*")))
seen += glob.glob("/home/*/box-*")
print(json.dumps({"me": me, "cgroup": cgroup, "limits": limits, "seen": sorted(set(seen)),
                  "ran": [started, time.monotonic()]}))
"""


@pytest.fixture
def boxed(cell: Cell) -> Cell:
    if "--box" not in cell.host.check_output(f"systemctl show -p ExecStart --value {units.KERNEL_PROVIDER}"):
        pytest.skip("the kernel provider runs without boxes (cell_server_kernel_box: false)")
    return cell


def test_two_computations_run_in_separate_boxes(boxed: Cell) -> None:
    code = f"PLACES = {PLACES!r}\n{NEIGHBOUR}"
    # Both must run at once: with a kernel still starting, an emulated cell answers the first before the second
    # kernel is up.
    boxed.wait_until_idle()
    assert len(boxed.wait_for_full_reserve()) >= 2, "cell_server_preforked must be 2 or more for this test"
    answers = boxed.compute_many(code, 2, retry_busy_seconds=30)
    assert all(answer["status"] == 200 for answer in answers), answers
    first, second = (json.loads(answer["body"]["stdout"]) for answer in answers)
    assert first["ran"][0] < second["ran"][1] and second["ran"][0] < first["ran"][1], "they did not overlap"
    assert first["cgroup"] != second["cgroup"]
    expected = {
        "memory.max": str(int(boxed.node.setting("cell_server_kernel_box_memory_mib")) << 20),
        "pids.max": str(boxed.node.setting("cell_server_kernel_box_tasks")),
    }
    for report in (first, second):
        assert report["limits"] == expected, report
        own = {f"{place}/{report['me']}" for place in PLACES}
        others = [path for path in report["seen"] if not path.endswith(report["me"])]
        assert others == [], f"{report['me']} saw another kernel's files: {others}"
        assert len(report["seen"]) == len(own), report


def pids_current_of_busiest_box(cell: Cell) -> int:
    provider = main_pid(cell.host, units.KERNEL_PROVIDER)
    top = cell.host.check_output(f"dirname $(sed -n 's/^0:://p' /proc/{provider}/cgroup)")
    boxes = f"/sys/fs/cgroup{top}/{KERNELS_CGROUP}/{KERNEL_CGROUP_PREFIX}*"
    counts = cell.host.run(f"cat {boxes}/pids.current").stdout.split()
    return max((int(count) for count in counts), default=0)


# The fork bomb stops itself after a while, so the test need not wait out the wall limit; every fork it makes
# forks too, and all of them stop at the same deadline. It reports how many forks its box refused.
FORK_BOMB = """
import os, time
bomber, refused, deadline = os.getpid(), 0, time.monotonic() + 40
while time.monotonic() < deadline:
    try:
        os.fork()
    except OSError:
        refused += 1
if os.getpid() != bomber:
    os._exit(0)
print('refused', refused)
"""

ATTACKS = {
    "fork bomb": FORK_BOMB,
    "4 GiB allocation": "import time\nblocks = []\nwhile True:\n    blocks.append(b'x' * (64 << 20))\n",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_an_attack_in_one_box_leaves_the_other_answered_within_5_s(boxed: Cell, attack: str) -> None:
    with ThreadPoolExecutor(1) as background:
        attacking = background.submit(boxed.compute, ATTACKS[attack])
        if attack == "fork bomb":
            deadline = time.monotonic() + 60
            while pids_current_of_busiest_box(boxed) < 64 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert pids_current_of_busiest_box(boxed) >= 64, "the fork bomb never filled its box"
        answer = boxed.compute("print(6 * 7)")
        attack_still_running = not attacking.done()
        attacked = attacking.result()
    assert answer["status"] == 200 and answer["body"]["stdout"].strip() == "42", answer
    assert answer["seconds"] < 5, f"the neighbour of a {attack} waited {answer['seconds']:.1f} s"
    if attack == "fork bomb":
        assert attack_still_running, f"the fork bomb ended before its neighbour was answered: {attacked}"
        refused = attacked["body"]["stdout"].split()
        assert refused[:1] == ["refused"] and int(refused[1]) > 0, f"the box refused no fork: {attacked}"
    else:
        assert attacked["body"].get("success") is not True, attacked


def plant(marker: str) -> str:
    """A computation that writes marker-named files in every writable place and leaves a double-forked daemon
    whose command line carries the marker."""
    return (
        "import os, glob, time, subprocess\n"
        f"marker = {marker!r}\n"
        "for place in ('/tmp', '/var/tmp', '/dev/shm', os.path.expanduser('~'), os.getcwd()):\n"
        "    try:\n        open(os.path.join(place, marker), 'w').write(marker)\n"
        "    except OSError as error:\n        print('not written', place, error.errno)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execvp('sh', ['sh', '-c', 'sleep 600; :', marker])\n"
        "    os._exit(0)\n"
        "deadline = time.monotonic() + 20\n"
        "while not subprocess.run(['pgrep', '-f', marker], capture_output=True).stdout and "
        "time.monotonic() < deadline:\n"
        "    time.sleep(float(0.1))\n"
        "print('planted', bool(subprocess.run(['pgrep', '-f', marker], capture_output=True).stdout))\n"
    )


def test_nothing_of_a_computation_is_left_3_s_after_its_answer(boxed: Cell) -> None:
    marker = f"cellfleet-left-{uuid.uuid4().hex[:12]}"
    answer = boxed.compute(plant(marker))
    answered = time.monotonic()
    assert answer["status"] == 200 and "planted True" in answer["body"]["stdout"], answer
    provider = main_pid(boxed.host, units.KERNEL_PROVIDER)
    # The bracket keeps this command's own shell, whose command line holds the pattern, from matching.
    pattern = shlex.quote(f"[{marker[0]}]{marker[1:]}")
    places = "/tmp /var/tmp /dev/shm /home /home/* /run/cellfleet-kernels"  # a home is a mount of its own
    look = (
        f"pgrep -f {pattern}; find / -xdev -name {pattern}; "
        f"nsenter -t {provider} -m find {places} -xdev -name {pattern}"
    )
    while (left := boxed.host.run(look).stdout.strip()) and time.monotonic() - answered < 3:
        time.sleep(0.2)
    assert left == "", f"3 s after the answer the cell still holds: {left}"


def test_subprocess_output_reaches_the_answer_without_a_denial(boxed: Cell) -> None:
    since = boxed.host.check_output("date '+%Y-%m-%d %H:%M:%S'")
    code = (
        "import os, subprocess, multiprocessing\n"
        "subprocess.run(['echo', 'from-subprocess'])\n"
        "os.system('echo from-system')\n"
        "def child():\n    print('from-multiprocessing', flush=True)\n"
        "process = multiprocessing.Process(target=child); process.start(); process.join()\n"
    )
    stdout = boxed.stdout(code)
    for expected in ("from-subprocess", "from-system", "from-multiprocessing"):
        assert expected in stdout, stdout
    denials = boxed.host.run(f"journalctl -k --since {shlex.quote(since)} --grep 'avc:  denied' -o cat").stdout
    assert denials.strip() == "", denials
