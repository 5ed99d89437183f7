"""Known escapes of public code runners, tried through the public path: code posted to the cell server runs in a
pooled worker's kernel, and each test checks on the host (as root) that the attack got nothing and left nothing.

The attacks: links that a root cleanup might follow (symlink exfiltration), hard links that would keep data or
disk usage past a reset, the environment and file descriptors a kernel inherits, /proc of other computations
and of the services, and processes that try to outlive the reset (zombies, stopped, signal-ignoring, renamed).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from cells import Cell
from conftest import main_pid
from labkit import units
from labkit.waiting import until_gone

PROVIDER_SOCKET = "/run/cellfleet-kernel-provider/provider.sock"
KERNEL_RUNTIME_DIR = "/run/cellfleet-kernels"
# Root's files the attacks aim at: the test plants them, the attacks must neither read nor change them.
CANARY_FILE = "/etc/cellfleet/escape-canary"
CANARY_DIR = "/var/lib/cellfleet-escape-canary"
SETTLE_SECONDS = 45


def until_nothing_left(look: Callable[[], str]) -> str:
    """What look() still finds once the release has had its time: the answer comes first, the reset of the
    worker after it, so this looks again until look() finds nothing or SETTLE_SECONDS are up."""
    return until_gone(look, SETTLE_SECONDS, interval=1)


def files_left(cell: Cell, uid: int, name: str) -> str:
    """The files called name* the worker still owns after its computation's release, as root sees them."""
    roots = f"/ /home/* /dev/shm {KERNEL_RUNTIME_DIR}"  # each home is a mount of its own
    return until_nothing_left(lambda: cell.find_in_kernels_view(roots, f"-user {uid} -name '{name}*'"))


@pytest.fixture(scope="module")
def canaries(cell: Cell) -> Iterator[dict[str, str]]:
    """Root-only files with a random text, and the checksums of the files an attack would most like to read."""
    text = secrets.token_hex(16)
    cell.host.run_test(
        f"install -m 0600 /dev/null {CANARY_FILE} && echo {text} > {CANARY_FILE} && "
        f"install -d -m 0700 {CANARY_DIR} && echo {text} > {CANARY_DIR}/kept"
    )
    yield {"text": text, "checksums": checksums(cell)}
    cell.host.run(f"rm -rf {CANARY_FILE} {CANARY_DIR}")


def checksums(cell: Cell) -> str:
    return cell.host.check_output(
        f"stat -c '%n %a %U %h' {CANARY_FILE} {CANARY_DIR}/kept /etc/shadow /etc/passwd && "
        f"sha256sum {CANARY_FILE} {CANARY_DIR}/kept /etc/shadow /etc/passwd"
    )


# --- links ----------------------------------------------------------------------------------------

# Computation code that finds its own kernel's directory (the one its worker owns) as kernel_dir.
OWN_KERNEL_DIR = f"""
import glob, os
kernel_dir = [d for d in glob.glob("{KERNEL_RUNTIME_DIR}/*") if os.stat(d).st_uid == os.getuid()][0]
"""

PLANT_LINKS = (
    OWN_KERNEL_DIR
    + r"""
import json
targets = {"file": "CANARY_FILE", "dir": "CANARY_DIR", "shadow": "/etc/shadow"}
# Every place the worker may write: its home, the private /tmp and /var/tmp, /dev/shm, its kernel's directory.
places = [os.path.expanduser("~"), "/tmp", "/var/tmp", "/dev/shm", kernel_dir]
found = {"kernel_dir": kernel_dir, "read": {}, "hard": {}}
for place in places:
    for kind, target in targets.items():
        link = os.path.join(place, "NAME-" + kind)
        os.symlink(target, link)
        try:
            found["read"][link] = open(link + ("/kept" if kind == "dir" else "")).read()
        except OSError as error:
            found["read"][link] = error.errno
    # A hard link is no symlink to follow: it would be the file itself, so the kernel must refuse to make it.
    for target in ("CANARY_FILE", "/etc/passwd", "/etc/shadow"):
        try:
            os.link(target, os.path.join(place, "NAME-hard" + str(len(found["hard"]))))
            found["hard"][place + " " + target] = "linked"
        except OSError as error:
            found["hard"][place + " " + target] = error.errno
print(json.dumps(found))
"""
)


def plant_links_code(name: str) -> str:
    return PLANT_LINKS.replace("CANARY_FILE", CANARY_FILE).replace("CANARY_DIR", CANARY_DIR).replace("NAME", name)


def test_links_planted_by_a_computation_are_never_followed_by_root(cell: Cell, canaries: dict[str, str]) -> None:
    name = "escape-" + secrets.token_hex(3)
    answer = cell.compute(plant_links_code(name) + "import os; print(os.getuid())")
    assert answer["status"] == 200, answer
    output = answer["body"]["stdout"].splitlines()
    found, uid = json.loads(output[0]), int(output[1])
    # The worker itself gets nothing through its links ...
    assert len(found["read"]) == 15, found
    assert all(not isinstance(result, str) for result in found["read"].values()), found["read"]
    assert canaries["text"] not in answer["body"]["stdout"]
    assert set(found["hard"].values()) <= {1, 13, 18}, found["hard"]  # EPERM, EACCES, EXDEV: never "linked"
    # ... and root's release of the kernel and reset of the worker (rmtree, reset, restorecon) followed none.
    left = files_left(cell, uid, name)
    assert left == "", f"left after the reset: {left}"
    assert cell.host.run(f"test -e {found['kernel_dir']}").rc == 1, "the kernel's directory outlived it"
    assert checksums(cell) == canaries["checksums"]


# --- hard links and the quota -----------------------------------------------------------------------

HARD_LINK_HOARD = (
    OWN_KERNEL_DIR
    + r"""
home_file = os.path.expanduser("~/NAME")
with open(home_file, "wb") as f:
    f.write(os.urandom(8 << 20))
linked = []
# Extra names for the same 8 MiB wherever they would be allowed: a reset that missed one would leave the
# data for the next computation and the disk usage on the worker's quota.
for place in ("/tmp", "/var/tmp", os.path.expanduser("~/.cache-NAME"), kernel_dir):
    try:
        os.makedirs(place, exist_ok=True)
        os.link(home_file, os.path.join(place, "NAME-link"))
        linked.append(place)
    except OSError as error:
        linked.append(error.errno)
print(os.getuid(), os.stat(home_file).st_nlink, linked)
"""
)


def quota_used(cell: Cell) -> dict[int, tuple[int, int]]:
    """uid -> (KiB, files) the quota counts on the filesystem of the homes, for every account."""
    rows = cell.host.check_output("repquota -u -n -O csv / | tail -n +2").splitlines()
    return {int(row[0].lstrip("#")): (int(row[3]), int(row[7])) for row in (line.split(",") for line in rows)}


def test_hard_links_keep_neither_data_nor_quota_past_the_reset(cell: Cell) -> None:
    cell.wait_until_idle()
    # A clean worker uses its home directory; one holding an idle preforked kernel a few KiB more. The most any
    # worker uses now is what a worker may use after its reset (the pool may give it a preforked kernel at once).
    before = quota_used(cell)
    most_kib, most_files = max(before[uid][0] for uid in cell.uids), max(before[uid][1] for uid in cell.uids)
    name = "hoard-" + secrets.token_hex(3)
    hoarded = cell.stdout(HARD_LINK_HOARD.replace("NAME", name))
    uid, links, _ = hoarded.split(" ", 2)
    assert int(links) >= 2, f"no extra name could be made, the test proves nothing: {hoarded}"
    left = files_left(cell, int(uid), name)
    assert left == "", f"left after the reset: {left}"
    kib, files = quota_used(cell)[int(uid)]
    assert kib <= most_kib and files <= most_files, f"the reset left {kib} KiB in {files} files on the quota"


# --- environment and file descriptors -------------------------------------------------------------

INHERITED = r"""
import json, os
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        pass
print(json.dumps({"environ": dict(os.environ), "fds": fds}))
"""
# What systemd hands a service (its notify socket, journal stream, credentials, invocation) and sudo's traces:
# a kernel holding one could speak for the service or learn about it.
SERVICE_VARIABLES = {
    "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "INVOCATION_ID", "JOURNAL_STREAM", "CREDENTIALS_DIRECTORY",
    "LISTEN_FDS", "LISTEN_PID", "MAINPID", "SYSTEMD_EXEC_PID", "RUNTIME_DIRECTORY", "SUDO_USER", "SUDO_UID",
    "SUDO_COMMAND", "MANAGERPID", "MEMORY_PRESSURE_WATCH",
}  # fmt: skip


def service_environment(cell: Cell, unit: str) -> set[str]:
    raw = cell.host.check_output(f"tr '\\0' '\\n' < /proc/{main_pid(cell.host, unit)}/environ")
    return {line for line in raw.splitlines() if "=" in line}


def test_a_kernel_inherits_no_service_environment_and_no_open_file(cell: Cell) -> None:
    seen = json.loads(cell.stdout(INHERITED))
    environment = {f"{name}={value}" for name, value in seen["environ"].items()}
    assert not SERVICE_VARIABLES & set(seen["environ"]), seen["environ"]
    pool = json.loads(cell.host.file("/etc/cellfleet/worker-pool.json").content_string)
    allowed = {f"{name}={value}" for name, value in pool["environment"].items()}
    for unit in (units.KERNEL_PROVIDER, units.CELL_SERVER):
        leaked = (service_environment(cell, unit) & environment) - allowed
        assert not leaked, f"{unit}'s environment reached the kernel: {leaked}"
    # The kernel's descriptors are its own sockets, pipes and event fds, /dev/null and its kernel directory:
    # never a file of the services (configuration, journal, the provider's socket) nor a directory to escape by.
    for fd, target in seen["fds"].items():
        assert target.startswith(("socket:", "pipe:", "anon_inode:", "/dev/null", KERNEL_RUNTIME_DIR)), (fd, target)


# --- /proc and the sockets of others ----------------------------------------------------------------

HOLDER = r"""
import os, subprocess, time
subprocess.Popen(["python3", "-c", "import time; time.sleep(40)", "SECRET"], env={"HOLDER_SECRET": "SECRET"})
open(os.path.expanduser("~/holding-SECRET"), "w").close()
time.sleep(20)
"""

SNOOP = r"""
import glob, json, os, socket
found = {}
def attempt(what, action):
    try:
        found[what] = str(action())[:200]
    except OSError as error:
        found[what] = error.errno
for pid in PIDS:
    for entry in ("cmdline", "environ", "status", "maps", "mem"):
        attempt(f"{pid}/{entry}", lambda: open(f"/proc/{pid}/{entry}", "rb").read(64))
    for entry in ("cwd", "root", "exe"):
        attempt(f"{pid}/{entry}", lambda: os.readlink(f"/proc/{pid}/{entry}"))
    attempt(f"{pid}/fd", lambda: os.listdir(f"/proc/{pid}/fd"))
    attempt(f"{pid}/root/etc", lambda: os.listdir(f"/proc/{pid}/root/etc"))
# Whatever /proc shows, no process of another may reveal the secret.
for path in glob.glob("/proc/[0-9]*/cmdline") + glob.glob("/proc/[0-9]*/environ"):
    attempt("scan " + path, lambda: "SECRET" in open(path, "rb").read().decode(errors="replace"))
mine = os.getuid()
for directory in glob.glob("KERNEL_RUNTIME_DIR/*"):
    if os.stat(directory).st_uid != mine:
        attempt("list " + directory, lambda: os.listdir(directory))
        for path in glob.glob(directory + "/k*"):
            attempt("connect " + path, lambda: socket.socket(socket.AF_UNIX).connect(path))
attempt("connect provider", lambda: socket.socket(socket.AF_UNIX).connect("PROVIDER_SOCKET"))
print(json.dumps(found))
"""


def test_proc_and_sockets_of_other_computations_and_services_are_out_of_reach(cell: Cell) -> None:
    secret = "cf" + secrets.token_hex(8)
    with ThreadPoolExecutor(1) as background:
        holding = background.submit(cell.compute, HOLDER.replace("SECRET", secret))
        deadline = time.monotonic() + 20
        held = f"holding-{secret}"
        while held not in cell.find_in_kernels_view("/home/*", f"-maxdepth 1 -name {held}"):
            assert time.monotonic() < deadline, "the holder never wrote its file"
            time.sleep(0.3)
        # The bracket keeps pgrep's own shell, whose command line holds the pattern, from matching.
        holder_pids = cell.host.check_output(f"pgrep -f '[{secret[0]}]{secret[1:]}'").split()
        assert holder_pids, "the holder's process did not start"
        services = [main_pid(cell.host, unit) for unit in (units.KERNEL_PROVIDER, units.CELL_SERVER)]
        pids = [*map(int, holder_pids), *services, 1]
        snoop = SNOOP.replace("PIDS", repr(pids)).replace("KERNEL_RUNTIME_DIR", KERNEL_RUNTIME_DIR)
        answer = cell.compute(snoop.replace("PROVIDER_SOCKET", PROVIDER_SOCKET).replace("SECRET", secret))
        assert holding.result()["status"] == 200
    assert answer["status"] == 200, answer
    found = json.loads(answer["body"]["stdout"])
    reached = {what: result for what, result in found.items() if not isinstance(result, int)}
    # A scan may read the snooper's own /proc entries; none of them holds the secret.
    reached = {what: result for what, result in reached.items() if result != "False"}
    assert not reached, f"reached: {reached}"
    assert any(what.startswith("list ") for what in found), "the holder's kernel directory was not seen at all"
    assert found["connect provider"] == 13, found["connect provider"]  # EACCES


# --- processes that try to outlive the reset --------------------------------------------------------

SURVIVORS = r"""
import os, signal, subprocess, sys, time
def detached(code):
    # A new program in its own session: neither the kernel's process group nor its children any more.
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True).pid
pids = {
    # A zombie: a child that exited and a parent that never waits for it.
    "zombie parent": detached("import os, time\nif os.fork() == 0: os._exit(0)\ntime.sleep(600)"),
    "ignores signals": detached("import signal, time\n"
        "for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "time.sleep(600)"),
    "renamed": detached("import ctypes, time\nctypes.CDLL(None).prctl(15, b'kworker/0:1', 0, 0, 0)\ntime.sleep(600)"),
}
stopped = subprocess.Popen(["sleep", "600"], start_new_session=True)
os.kill(stopped.pid, signal.SIGSTOP)
pids["stopped"] = stopped.pid
# A starved cell may take seconds to start each Python: wait until the zombie and the disguise exist.
deadline = time.monotonic() + 60
while True:
    table = [line.split() for line in os.popen("ps -o pid=,stat=,comm= -u %d" % os.getuid())]
    zombies = [int(row[0]) for row in table if "Z" in row[1]]
    renamed = [int(row[0]) for row in table if row[2] == "kworker/0:1"]
    if (zombies and renamed) or time.monotonic() > deadline:
        break
    time.sleep(float("0.2"))  # a float literal would be a Sage real, which time.sleep refuses
print(os.getuid(), " ".join(str(pid) for pid in [*zombies, *pids.values()]), len(zombies), len(renamed))
"""


def test_no_process_of_a_computation_survives_its_reset(cell: Cell) -> None:
    output = cell.stdout(SURVIVORS).split()
    uid, pids, zombies, renamed = output[0], output[1:-2], int(output[-2]), int(output[-1])
    assert zombies >= 1 and renamed == 1, f"the computation made no zombie or no disguise, proving nothing: {output}"
    # The worker may take a new, preforked kernel as soon as it is clean: that one is not the attack's.
    survivors = (
        f"ps -o pid=,stat=,comm= -p {','.join(pids)}; "
        f"ps -o pid=,stat=,comm= -u {uid} | awk '$2 ~ /Z/ || $3 ~ /^(sleep|kworker)/'"
    )
    left = until_nothing_left(lambda: cell.host.run(survivors).stdout)
    assert not left, f"still there after the reset: {left}"
