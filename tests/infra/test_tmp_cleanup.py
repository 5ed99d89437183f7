"""The tmp cleaner, run exactly as cron runs it: old files go; fresh ones, sockets and open files stay."""

from __future__ import annotations

from conftest import Node
from labkit.sending import SCRIPTS, script_command

CRON_FILE = "/etc/cron.d/cellfleet-tmp-cleanup"


def cron_command(node: Node) -> str:
    """The command line of the installed cron entry (after the five time fields and the user)."""
    lines = node.host.file(CRON_FILE).content_string.splitlines()
    entry = [line for line in lines if "cellfleet-tmp-clean" in line and not line.startswith("#")]
    assert len(entry) == 1, lines
    return entry[0].split(None, 6)[6]


def test_the_cleaner_removes_aged_files_and_keeps_fresh_ones_sockets_and_open_files(nodes: dict[str, Node]) -> None:
    for node in nodes.values():
        host = node.host
        command = cron_command(node)
        assert host.service("cron").is_running or host.service("crond").is_running
        base = "/var/tmp/cf-clean-test"
        host.run_test(f"rm -rf {base} && mkdir -p {base}/nested")
        host.run_test(f"echo old > {base}/old.txt && echo old > {base}/nested/old.txt && echo new > {base}/fresh.txt")
        host.run_test(f"echo open > {base}/held-open.log")
        holder = script_command(SCRIPTS / "hold_unix_socket.py", f"{base}/app.sock", "300")
        host.run_test(f"systemd-run --unit=cf-test-socket --collect {holder}")
        host.run_test(
            f"systemd-run --unit=cf-test-holder --collect --property=StandardInput=file:{base}/held-open.log sleep 300"
        )
        host.run_test(f"for i in $(seq 50); do [ -S {base}/app.sock ] && exit 0; sleep 0.1; done; exit 1")
        # Aged after opening, so opening cannot have refreshed the access time.
        host.run_test(
            f"touch -h -d '3 days ago' {base}/old.txt {base}/nested/old.txt {base}/held-open.log {base}/app.sock"
        )
        try:
            # The installed job cleans /tmp and /var/tmp; the test directory sits in /var/tmp.
            result = host.run(command.replace(">/dev/null", ""))
            assert result.rc == 0, result.stderr
            assert not host.file(f"{base}/old.txt").exists
            assert not host.file(f"{base}/nested/old.txt").exists
            assert host.file(f"{base}/fresh.txt").exists
            assert host.file(f"{base}/app.sock").is_socket
            assert host.file(f"{base}/held-open.log").exists
        finally:
            host.run("systemctl stop cf-test-socket cf-test-holder")
            host.run(f"rm -rf {base}")
