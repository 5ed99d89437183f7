"""The permalink service on its data host: kill -9 of the service and of PostgreSQL's postmaster while a cell
keeps writing, and both come back with every acknowledged permalink; the nightly backup restores."""

from __future__ import annotations

import json
import shlex
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Node, main_pid, seconds_until_back
from labkit import units
from labkit.sending import SCRIPTS, fetch, script_command
from labkit.waiting import until

SERVICE = units.PERMALINKS
# A kill lands while writes are under way: only then could a lost acknowledgement show.
WRITES_UNDER_WAY = 5


@pytest.fixture(scope="module")
def data(nodes: dict[str, Node]) -> Node:
    hosts = [node for node in nodes.values() if "permalink_db" in node.groups]
    if not hosts:
        pytest.skip("no permalink_db host in the inventory")
    return hosts[0]


@pytest.fixture(scope="module")
def writer_host(nodes: dict[str, Node]) -> Node:
    cells = sorted((node for node in nodes.values() if "cells" in node.groups), key=lambda node: node.name)
    if not cells:
        pytest.skip("no cell in the inventory to write permalinks from")
    return cells[0]


@pytest.fixture(scope="module")
def url(data: Node, mesh_addresses: dict[str, str]) -> str:
    return f"http://{mesh_addresses[data.name]}:{data.setting('cellfleet_permalink_port')}/permalink"


def write_for(host: Node, url: str, seconds: float, run: str) -> dict:
    """Permalinks written one at a time for seconds from host: the acknowledged ones and the failures."""
    return json.loads(host.host.check_output(script_command(SCRIPTS / "permalink_writer.py", url, str(seconds), run)))


def read_back(host: Node, url: str, idents: list[str]) -> dict[str, str]:
    reader = script_command(SCRIPTS / "permalink_reader.py", url)
    return json.loads(host.host.check_output(f"echo {shlex.quote(json.dumps(idents))} | {reader}"))


def rows_of_run(data: Node, run: str) -> int:
    """How many permalinks of this run the database holds: the writes that went through, seen from the data host."""
    query = f"SELECT count(*) FROM permalinks WHERE code LIKE 'print(''{run} %'"
    database = shlex.quote(data.setting("permalink_db_name"))
    return int(data.host.check_output(f"runuser -u postgres -- psql -d {database} -tAc {shlex.quote(query)}"))


def writes_go_on(data: Node, run: str) -> None:
    """Returns once WRITES_UNDER_WAY more of the run's permalinks have landed than when it was called; fails if
    the writer stalls."""
    past = rows_of_run(data, run)
    landed = until(lambda: rows_of_run(data, run) >= past + WRITES_UNDER_WAY, 30)
    assert landed, f"fewer than {WRITES_UNDER_WAY} permalinks of {run} written within 30 s (had {past})"


def postgresql_unit(node: Node) -> str:
    listed = node.host.check_output(
        "systemctl list-units --plain --no-legend 'postgresql@*.service' postgresql.service"
    )
    running = [line.split()[0] for line in listed.splitlines() if " running " in f" {line} "]
    assert running, f"no running PostgreSQL server unit on {node.name}: {listed}"
    return running[0]


def test_kill_9_of_the_service_and_of_postgresql_loses_no_acknowledged_permalink(
    data: Node, writer_host: Node, url: str
) -> None:
    database = postgresql_unit(data)
    run = f"kill{int(time.time())}"
    with ThreadPoolExecutor(1) as background:
        writing = background.submit(write_for, writer_host, url, 40, run)
        writes_go_on(data, run)
        service_pid = main_pid(data.host, SERVICE)
        data.host.run_test(f"kill -9 {service_pid}")
        service_back = seconds_until_back(data, SERVICE, service_pid, 30)
        writes_go_on(data, run)
        postmaster_pid = main_pid(data.host, database)
        data.host.run_test(f"kill -9 {postmaster_pid}")
        database_back = seconds_until_back(data, database, postmaster_pid, 60)
        result = writing.result(timeout=120)
    acknowledged: dict[str, str] = result["acknowledged"]
    print(
        f"service back in {service_back:.1f} s, PostgreSQL back in {database_back:.1f} s; "
        f"{len(acknowledged)} permalinks acknowledged, {result['failures']} writes refused meanwhile"
    )
    assert len(acknowledged) >= 20, result
    found = read_back(writer_host, url, sorted(acknowledged))
    lost = {ident: found[ident] for ident, code in acknowledged.items() if found[ident] != code}
    assert lost == {}, f"{len(lost)} of {len(acknowledged)} acknowledged permalinks lost"


def test_the_backup_restores_what_it_saved(data: Node, writer_host: Node, url: str) -> None:
    before = write_for(writer_host, url, 1, f"backup{int(time.time())}")["acknowledged"]
    assert before
    data.host.run_test(f"systemctl start {units.PERMALINK_BACKUP}")
    backup = data.host.check_output("ls -1t /var/backups/cellfleet-permalinks/permalinks-* | head -1")
    after = write_for(writer_host, url, 1, f"afterbackup{int(time.time())}")["acknowledged"]
    data.host.run_test(f"cellfleet-permalink-restore {shlex.quote(backup)}")
    health = f"http://127.0.0.1:{data.setting('cellfleet_permalink_port')}/health"
    healthy = until(lambda: fetch(data.host, health)[0] == 200, 30, interval=1)
    assert healthy, "the permalink service is not healthy 30 s after the restore"
    found = read_back(writer_host, url, sorted(before) + sorted(after))
    assert all(found[ident] == code for ident, code in before.items()), found
    assert not any(found[ident] == code for ident, code in after.items()), (
        "writes after the backup survived its restore"
    )
