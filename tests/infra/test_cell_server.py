"""The cell server on a cell: computations run as pooled, confined workers and leave nothing behind.

Requests go to the server on the cell's loopback (see cells.py), exactly as nginx and the load balancer reach it.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cells import Cell, cell_server_python, start_health_checks, stop_health_checks
from cellserver.kernel_box import KERNEL_OOM_SCORE_ADJ
from conftest import main_pid, seconds_until_back
from labkit import units
from labkit.sending import SCRIPTS, fetch, script_command
from labkit.waiting import until


def test_both_services_run_and_the_server_is_unprivileged(cell: Cell) -> None:
    for unit in (units.KERNEL_PROVIDER, units.CELL_SERVER):
        assert cell.host.service(unit).is_running, unit
    assert cell.host.check_output(f"systemctl show -p User --value {units.CELL_SERVER}") == "cellserver"
    assert cell.host.check_output(f"systemctl show -p Type --value {units.CELL_SERVER}") == "notify"


def test_the_units_parse_without_a_complaint(cell: Cell) -> None:
    installed = [units.KERNEL_PROVIDER, units.CELL_SERVER, units.CELL_HEALTH, units.CELL_HEALTH_TIMER]
    paths = " ".join(f"/etc/systemd/system/{unit}" for unit in installed)
    verified = cell.host.run(f"systemd-analyze verify {paths}")
    assert verified.rc == 0 and not verified.stderr.strip() and not verified.stdout.strip(), verified.stderr
    # A line glued to the one before it by a template parses, as an argument of that line's command.
    assert cell.host.check_output(f"systemctl show -P Restart {units.KERNEL_PROVIDER}") == "always"


def test_a_computation_runs_as_a_pooled_worker_in_the_confined_domain(cell: Cell) -> None:
    code = "import os; print(os.getuid(), os.getgid(), os.getgroups(), open('/proc/self/attr/current').read())"
    uid, gid, groups, context = cell.stdout(code).split(" ", 3)
    assert int(uid) in cell.uids
    assert groups == "[]"
    assert context.rstrip("\0\n") == cell.context
    assert int(gid) != 0


def test_worker_code_cannot_regain_privileges(cell: Cell) -> None:
    code = (
        "import os, subprocess\n"
        "print(open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0])\n"
        "print(subprocess.run(['sudo', '-n', 'id'], capture_output=True).returncode != 0)\n"
        "try:\n    os.setuid(0)\nexcept PermissionError:\n    print('refused')\n"
    )
    assert cell.stdout(code).split() == ["1", "True", "refused"]


def test_out_of_memory_takes_a_kernel_and_never_the_provider(cell: Cell) -> None:
    provider = main_pid(cell.host, units.KERNEL_PROVIDER)
    assert cell.host.check_output(f"cat /proc/{provider}/oom_score_adj") == "-1000"
    code = (
        "path = '/proc/self/oom_score_adj'\n"
        "print(open(path).read().strip())\n"
        "try:\n    open(path, 'w').write('0'); print('lowered')\n"
        "except PermissionError:\n    print('refused')\n"
    )
    assert cell.stdout(code).split() == [str(KERNEL_OOM_SCORE_ADJ), "refused"]


def test_a_computation_sees_no_other_process_and_no_network(cell: Cell) -> None:
    code = (
        "import os, socket\n"
        "others = [p for p in os.listdir('/proc') if p.isdigit() and os.stat('/proc/' + p).st_uid != os.getuid()]\n"
        "print(len(others))\n"
        "try:\n    socket.create_connection(('127.0.0.1', 22), timeout=3); print('connected')\n"
        "except OSError:\n    print('blocked')\n"
    )
    assert cell.stdout(code).split() == ["0", "blocked"]


# A process that escapes the kernel's process group, and files in every place a worker may write; prints the
# worker's uid and the escaped process's pid.
LEAVE_BEHIND = (
    "import os, time\n"
    "pid = os.fork()\n"
    "if pid == 0:\n    os.setsid(); os.execvp('sleep', ['sleep', '600'])\n"
    # float(): with the Sage kernel 0.05 is a RealNumber, which time.sleep refuses (as in any Sage).
    "while os.getsid(pid) != pid:\n    time.sleep(float(0.05))\n"
    "for path in (os.path.expanduser('~/left-behind'), '/tmp/left-behind', '/dev/shm/left-behind'):\n"
    "    open(path, 'w').write('x')\n"
    "print(os.getuid(), pid)\n"
)


def leftovers_once_released(cell: Cell, uid: str, pid: str, name: str) -> str:
    """The worker's processes and its files called name, once they are gone or 90 s have passed: the release
    comes after the answer, and on an emulated cell it waits its turn behind the reserve's refill."""
    deadline = time.monotonic() + 90
    while True:
        left = cell.host.run(f"ps -o pid= -u {uid}").stdout
        left += cell.find_in_kernels_view("/ /home/*", f"-user {uid} -name {name}")
        if (pid not in left.split() and name not in left) or time.monotonic() > deadline:
            return left
        time.sleep(1)


def test_what_a_computation_leaves_is_gone_after_its_answer(cell: Cell) -> None:
    uid, pid = cell.stdout(LEAVE_BEHIND).split()
    left = leftovers_once_released(cell, uid, pid, "left-behind")
    assert pid not in left.split(), "the escaped process outlived the answer"
    assert "left-behind" not in left, left


def test_what_a_session_leaves_is_gone_after_its_idle_end(cell: Cell) -> None:
    # The same leftovers as a /service computation's, from a kernel session a page keeps idle: the server ends
    # it after the idle timeout the page asked for, and its worker is reset like any other.
    code = LEAVE_BEHIND.replace("left-behind", "left-by-session")
    python = cell_server_python(cell.host)
    command = script_command(SCRIPTS / "idle_session.py", str(cell.port), code, "5", python=python)
    session = json.loads(cell.host.check_output(command))
    uid, pid = session["stdout"].split()
    assert session["last"] == {"execution_state": "dead", "reason": "idle for 5 s"}, session
    assert 4 <= session["ended_after"] < 60, session
    left = leftovers_once_released(cell, uid, pid, "left-by-session")
    assert pid not in left.split(), "the escaped process outlived the session"
    assert "left-by-session" not in left, left


def test_a_computation_cannot_read_what_another_left_running(cell: Cell) -> None:
    holder = (
        "import os, time\n"
        "open('/tmp/secret-of-a', 'w').write('a'); open(os.path.expanduser('~/secret-of-a'), 'w').write('a')\n"
        "time.sleep(20)\n"
    )
    thief = (
        "import glob, os\n"
        "found = []\n"
        "for path in glob.glob('/tmp/secret-of-a') + glob.glob('/home/*/secret-of-a'):\n"
        "    try:\n        found.append(open(path).read())\n"
        "    except OSError as error:\n        found.append(error.errno)\n"
        "print(found)\n"
    )
    with ThreadPoolExecutor(1) as background:
        holding = background.submit(cell.compute, holder)
        assert until(lambda: cell.a_kernel_sees("/tmp/secret-of-a"), 60, interval=0.5), "the holder never ran"
        stolen = cell.stdout(thief)
        held_throughout = cell.a_kernel_sees("/tmp/secret-of-a")
        assert holding.result()["status"] == 200
    assert held_throughout, "the holder's files were gone before the thief's answer: nothing was tested"
    # Each worker's /tmp file is private to it (13: permission denied) and homes are closed (nothing found).
    assert "'a'" not in stolen, stolen


@pytest.mark.load
def test_every_worker_busy_answers_503_with_retry_after(cell: Cell) -> None:
    slots = len(cell.uids)
    # Nothing else may take a worker meanwhile: load balancers probe /health through nginx, and the health
    # timer computes too. Both come back afterwards.
    nginx_ran = cell.host.service("nginx.service").is_running
    stop_health_checks(cell.host)
    cell.host.run_test("systemctl stop nginx.service")
    try:
        cell.wait_until_idle()
        # Each holder marks its home once it runs, then sleeps until just before the wall limit.
        limit = int(cell.node.setting("cellfleet_computation_seconds"))
        hold = f"import os, time; open(os.path.expanduser('~/holding'), 'w').close(); time.sleep({limit - 1})"
        with ThreadPoolExecutor(1) as background:
            # One process on the cell sends them all at once (one SSH command and Python start each would
            # spread them over seconds of emulated CPU).
            # A holder refused while the pool still refills after the tests before (a worker being reset,
            # its kernel on the way) tries again, as a client would: this test is about a full pool.
            # Each may wait for a kernel start (up to the start timeout, 30 s) before it holds for the wall limit.
            holding = background.submit(cell.compute_many, hold, slots, limit / 3, limit + 90)
            deadline = time.monotonic() + limit - 2
            running = 0
            while running != slots and time.monotonic() < deadline:
                running = cell.find_in_kernels_view("/home/*", "-maxdepth 1 -name holding").count("holding")
                time.sleep(0.3)
            asked = time.monotonic()
            refused = cell.compute("print(1)")
            waited = time.monotonic() - asked
            answers = holding.result()
    finally:
        cell.host.run("systemctl start nginx.service" if nginx_ran else "true")
        start_health_checks(cell.host)
        cell.wait_until_idle()  # the next test needs a free worker: the holders' workers are being reset
    not_held = [answer for answer in answers if answer["status"] != 200]
    assert running == slots, f"only {running} of {slots} workers ran a holder at once; refused: {not_held}"
    assert refused["status"] == 503, refused
    assert refused["headers"]["Retry-After"].isdigit()
    assert waited < 6, "a full pool must answer at once, not queue the request"
    assert all(answer["status"] == 200 for answer in answers), answers


def test_the_wall_limit_and_the_memory_limit_hold(cell: Cell) -> None:
    limit = int(cell.node.setting("cellfleet_computation_seconds"))
    started = time.monotonic()
    answer = cell.compute("import time; time.sleep(100000)")
    assert answer["body"]["execute_reply"]["ename"] == "TimeoutError"
    assert time.monotonic() - started < limit + 30
    memory = cell.compute("x = bytearray(8 << 30)")["body"]
    assert memory["execute_reply"]["ename"] == "MemoryError"


def test_an_idle_cell_keeps_its_reserve_while_health_is_probed(cell: Cell) -> None:
    # A server that took every reserve kernel for dead released and restarted them without end: the idle
    # cell's whole CPU went on starting kernels, and every computation waited seconds for one.
    health = f"http://127.0.0.1:{cell.port}/health"
    stop_health_checks(cell.host)
    try:
        cell.wait_until_idle()
        kernels = cell.wait_for_full_reserve()
        # /health refreshes (in a reserve kernel) once its answer is older than cell_server_health_max_age.
        max_age = float(cell.node.setting("cell_server_health_max_age"))
        for _ in range(4):
            assert fetch(cell.host, health, timeout=60)[0] == 200
            time.sleep(max_age + 1)
        after = cell.reserve_kernels()
    finally:
        start_health_checks(cell.host)
    assert after == kernels, f"reserve kernels {sorted(kernels)} became {sorted(after)} with nobody computing"


def test_the_health_endpoint_runs_a_computation(cell: Cell) -> None:
    status, _headers, body = fetch(cell.host, f"http://127.0.0.1:{cell.port}/health")
    assert status == 200 and json.loads(body)["healthy"] is True, body


def seconds_after_signal(cell: Cell, signame: str, limit: float) -> dict:
    """Send signame to the server and time its replacement: a new process, ready, then a /health answer from it."""
    health = f"http://127.0.0.1:{cell.port}/health"
    timing = script_command(SCRIPTS / "after_signal.py", units.CELL_SERVER, signame, str(limit), "--health", health)
    return json.loads(cell.host.check_output(timing))


def test_a_killed_server_is_back_and_healthy_within_seconds(cell: Cell) -> None:
    took = seconds_after_signal(cell, "SIGKILL", 60)
    print(f"kill -9: new process after {took['new_process']} s, ready {took['running']} s, healthy {took['healthy']} s")
    # 5 s is the target on real hardware; the emulated lab is several times slower.
    assert took["healthy"] is not None and took["healthy"] < 30, took


def test_a_frozen_server_is_restarted_by_the_watchdog(cell: Cell) -> None:
    watchdog = int(cell.node.setting("cell_server_watchdog_seconds"))
    old = main_pid(cell.host, units.CELL_SERVER)
    try:
        took = seconds_after_signal(cell, "SIGSTOP", watchdog + 60)
    finally:
        cell.host.run(f"kill -CONT {old} 2>/dev/null")
    print(f"SIGSTOP (WatchdogSec={watchdog}): new process after {took['new_process']} s, healthy: {took['healthy']} s")
    assert took["healthy"] is not None and took["healthy"] < watchdog + 30, took
    journal = cell.host.check_output(f"journalctl -u {units.CELL_SERVER} --since -3min --no-pager")
    assert "watchdog timeout" in journal.lower()


def test_a_killed_nginx_is_started_again(cell: Cell) -> None:
    # Debian's packaged unit has no Restart=: without the role's drop-in, the cell stayed out of rotation.
    old = main_pid(cell.host, "nginx")
    cell.host.run_test(f"kill -9 {old}")
    seconds_until_back(cell.node, "nginx", old, 30)
    assert fetch(cell.host, "http://127.0.0.1/", timeout=30)[0] == 200


def test_the_health_timer_restarts_a_server_whose_computations_fail(cell: Cell) -> None:
    # The port still answers, but no computation can run: the provider is frozen and the reserve kernels
    # are killed behind its back (it cannot reap them nor tell the server).
    assert cell.host.service(units.CELL_HEALTH_TIMER).is_running
    # A check the timer started before the fault would answer `systemctl start` with its own success.
    stop_health_checks(cell.host)
    provider = main_pid(cell.host, units.KERNEL_PROVIDER)
    server = main_pid(cell.host, units.CELL_SERVER)
    cell.host.run_test(f"kill -STOP {provider}")
    # Its forks too: one still starting runs as root until it becomes its worker, out of reach of a kill by
    # uid, and would come up as a working kernel. Its worker resets (another command line) finish.
    cell.host.run(f"pkill -KILL -P {provider} -f 'cellserver kernel-provider'")
    for uid in cell.uids:
        cell.host.run(f"pkill -KILL -U {uid}")
    try:
        check = cell.host.run(f"systemctl start {units.CELL_HEALTH}")
    finally:
        cell.host.run(f"kill -CONT {provider}")
        start_health_checks(cell.host)
    assert check.rc != 0
    log = cell.host.check_output(f"journalctl -u {units.CELL_HEALTH} --since '-5min' --no-pager")
    assert f"restarting {units.CELL_SERVER}" in log and "failed" in log
    seconds_until_back(cell.node, units.CELL_SERVER, server, 60)  # the check queued the restart
    health = f"http://127.0.0.1:{cell.port}/health"
    healthy = until(lambda: fetch(cell.host, health)[0] == 200, 120, interval=1)
    assert healthy, "the restarted server is not healthy in 120 s"
