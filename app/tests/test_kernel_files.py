"""Files a computation writes, as `/kernel/<id>/files/<path>` serves them: while the session lives, after it
ended (upstream's page fetches its plot once the kernel is gone), and never anything the computation planted
to reach beyond its own files: links, FIFOs, files of other users, other sessions' files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_sessions import connect, execute_request, new_kernel, run_to_idle, until_closed

from cellserver.kernel_files import (
    RETAIN_MAX_BYTES,
    RETAIN_MAX_FILES,
    FileRefusedError,
    descriptor_from_answer,
    file_request,
    open_kernel_file,
    remove_expired,
    retain_files,
)
from conftest import Service, serving

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from serving(tmp_path_factory.mktemp("files"), "--max-kernels", "4", "--preforked", "1")


def fetch(server: Service, session_id: str, relative: str) -> tuple[int, dict[str, str], bytes]:
    url = f"{server.url}/kernel/{session_id}/files/{relative}"
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def open_session(server: Service) -> str:
    status, _headers, answer = new_kernel(server, timeout="60")
    assert status == 200, answer
    return answer["id"]


WRITE_PLOT = f"""
import os
os.makedirs('out', exist_ok=True)
open('plot.png', 'wb').write({PNG!r})
open('out/data.txt', 'w').write('1,2,3')
"""


def test_a_file_the_computation_wrote_is_served_while_its_session_lives(server: Service) -> None:
    session = open_session(server)
    try:
        # The page's connection stays open: closing it would end the session.
        async def write_then_fetch() -> list[tuple[int, dict[str, str], bytes]]:
            connection = await connect(server, session)
            await run_to_idle(connection, WRITE_PLOT)
            fetched = await asyncio.to_thread(
                lambda: [fetch(server, session, "plot.png"), fetch(server, session, "out/data.txt")]
            )
            connection.close()
            return fetched

        (status, headers, body), (data_status, _data_headers, data) = asyncio.run(write_then_fetch())
    finally:
        server.request("DELETE", f"/kernel/{session}")
    assert status == 200 and body == PNG
    assert headers["Content-Type"] == "image/png"
    assert headers["Cache-Control"] == "no-cache"  # a recomputation rewrites it under the same name
    assert headers["Content-Security-Policy"] == "sandbox"
    assert (data_status, data) == (200, b"1,2,3")


def test_a_session_that_ended_with_its_computation_still_serves_what_it_wrote(server: Service) -> None:
    # Upstream's page asks for no timeout: the kernel goes as soon as the computation is done, and the page
    # fetches the plot after that.
    _status, _headers, answer = new_kernel(server)

    async def run() -> None:
        connection = await connect(server, answer["id"])
        connection.write_message(json.dumps(execute_request(WRITE_PLOT)))
        await until_closed(connection)

    asyncio.run(run())
    status, _headers, body = fetch(server, answer["id"], "plot.png")
    assert (status, body) == (200, PNG)
    assert fetch(server, answer["id"], "out/data.txt")[2] == b"1,2,3"
    assert fetch(server, answer["id"], "missing.png")[0] == 404


PLANT = """
import os
os.symlink('/etc/passwd', 'passwd-link')
os.symlink('/etc', 'etc-link')
os.mkfifo('fifo')
open('mine.txt', 'w').write('mine')
try:
    os.link('/etc/passwd', 'passwd-hardlink')  # root may; any other user is refused (protected_hardlinks)
except OSError:
    pass
"""
HOSTILE_PATHS = ["passwd-link", "etc-link/passwd", "fifo", "passwd-hardlink", "../../../../etc/passwd",
                 "%2e%2e/%2e%2e/etc/passwd", "./mine.txt", "mine.txt/", "%2fetc%2fpasswd"]  # fmt: skip


Answer = tuple[int, dict[str, str], bytes]


def plant_and_fetch(server: Service, session: str, after_the_end: bool) -> tuple[dict[str, Answer], Answer]:
    """Plant links and a FIFO in the session's directory; fetch them (and a file of its own) while the page is
    connected, or once closing the connection ended the session."""

    async def run() -> tuple[dict[str, Answer], Answer]:
        connection = await connect(server, session)
        await run_to_idle(connection, PLANT)
        if after_the_end:
            connection.close()
            await asyncio.to_thread(wait_until_ended, server, session)
        answers = await asyncio.to_thread(lambda: {path: fetch(server, session, path) for path in HOSTILE_PATHS})
        own = await asyncio.to_thread(fetch, server, session, "mine.txt")
        connection.close()
        return answers, own

    return asyncio.run(asyncio.wait_for(run(), 60))


def wait_until_ended(server: Service, session: str) -> None:
    deadline = time.monotonic() + 20
    while server.request("GET", f"/kernel/{session}/channels")[0] != 404:
        assert time.monotonic() < deadline, "the session did not end when its page closed the connection"
        time.sleep(0.1)


@pytest.mark.parametrize("after_the_end", [False, True], ids=["live", "ended"])
def test_links_fifos_and_paths_out_of_the_directory_are_not_served(server: Service, after_the_end: bool) -> None:
    session = open_session(server)
    try:
        answers, mine = plant_and_fetch(server, session, after_the_end)
    finally:
        server.request("DELETE", f"/kernel/{session}")
    served = {path: status for path, (status, _headers, body) in answers.items() if status == 200 or b"root:" in body}
    assert served == {}, served
    assert (mine[0], mine[2]) == (200, b"mine")


def test_one_session_cannot_fetch_another_sessions_files(server: Service) -> None:
    writer, reader = open_session(server), open_session(server)
    try:

        async def write_then_fetch_as_the_other() -> tuple[int, bytes]:
            connection = await connect(server, writer)
            await run_to_idle(connection, "open('secret.txt', 'w').write('s3cret')")
            status, _headers, body = await asyncio.to_thread(fetch, server, reader, "secret.txt")
            connection.close()
            return status, body

        status, body = asyncio.run(write_then_fetch_as_the_other())
    finally:
        server.request("DELETE", f"/kernel/{writer}")
        server.request("DELETE", f"/kernel/{reader}")
    assert status == 404 and b"s3cret" not in body
    unknown = "00000000-0000-4000-8000-000000000000"
    assert fetch(server, unknown, "secret.txt")[0] == 404


# --- opening and keeping files, in process ------------------------------------------------------------


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "plot.png").write_bytes(PNG)
    (work / "sub" / "data.txt").write_text("data")
    (work / ".hidden").write_text("hidden")
    (tmp_path / "outside.txt").write_text("outside")
    (work / "link").symlink_to(tmp_path / "outside.txt")
    (work / "dirlink").symlink_to(tmp_path)
    os.mkfifo(work / "fifo")
    os.link(work / "plot.png", work / "second-name.png")
    return work


def test_only_the_owners_regular_files_open(planted: Path) -> None:
    descriptor = open_kernel_file(planted, "sub/data.txt", os.getuid())
    assert os.read(descriptor, 100) == b"data"
    os.close(descriptor)
    for refused in ("link", "dirlink/outside.txt", "fifo", "plot.png", "../outside.txt", "/etc/passwd", "sub/", ""):
        with pytest.raises(FileRefusedError):
            os.close(open_kernel_file(planted, refused, os.getuid()))
    with pytest.raises(FileNotFoundError):
        open_kernel_file(planted, "sub/none.txt", os.getuid())
    with pytest.raises(FileRefusedError, match="owned by uid"):
        open_kernel_file(planted, "sub/data.txt", os.getuid() + 1)


def test_what_is_kept_is_the_visible_regular_files_within_the_budget(planted: Path, tmp_path: Path) -> None:
    (planted / "second-name.png").unlink()  # plot.png has one name again
    kept = tmp_path / "kept"
    assert retain_files(planted, os.getuid(), kept) == (2, len(PNG) + len("data"))
    names = {str(path.relative_to(kept)) for path in kept.rglob("*") if path.is_file()}
    assert names == {"plot.png", "sub/data.txt"}  # not the hidden file, the links or the FIFO
    assert (kept / "plot.png").read_bytes() == PNG
    for number in range(RETAIN_MAX_FILES):
        (planted / f"many{number:03}.txt").write_text("x")
    assert retain_files(planted, os.getuid(), tmp_path / "kept-many")[0] == RETAIN_MAX_FILES
    (planted / "huge.bin").write_bytes(b"x" * (RETAIN_MAX_BYTES + 1))
    assert not (tmp_path / "kept-huge").exists()
    retain_files(planted, os.getuid(), tmp_path / "kept-huge")
    assert not (tmp_path / "kept-huge" / "huge.bin").exists()


def test_kept_files_expire(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    os.utime(tmp_path / "old", (time.time() - 700, time.time() - 700))
    remove_expired(tmp_path, older_than=600)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["new"]


def test_the_provider_passes_a_descriptor_over_its_socket(planted: Path, tmp_path: Path) -> None:
    from cellserver.kernel_provider import Client, KernelRecord, Provider, ProviderSettings

    (planted / "second-name.png").unlink()
    provider = Provider(ProviderSettings(runtime_dir=tmp_path))
    try:
        ours, theirs = socket.socketpair()
        client = Client(ours.fileno(), ours.fileno())
        provider.kernels["k1"] = KernelRecord("k1", os.getpid(), planted.parent, client, None)

        def ask(kernel_id: str, relative: str) -> bytes:
            provider.handle(client, file_request(kernel_id, relative))
            descriptor = descriptor_from_answer(theirs)
            with os.fdopen(descriptor, "rb") as stream:
                return stream.read()

        assert ask("k1", "plot.png") == PNG
        with pytest.raises(FileRefusedError):
            ask("k1", "link")
        with pytest.raises(FileNotFoundError):
            ask("k1", "none.png")
        with pytest.raises(FileNotFoundError):
            ask("k2", "plot.png")
    finally:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def test_the_oldest_kept_files_go_when_all_sessions_together_pass_their_budget(
    planted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cellserver.kernel_provider as kernel_provider

    (planted / "second-name.png").unlink()
    (planted / "sub" / "data.txt").unlink()
    monkeypatch.setattr(kernel_provider, "RETAIN_TOTAL_BYTES", len(PNG) * 5 // 2)
    (tmp_path / "runtime").mkdir()
    provider = kernel_provider.Provider(kernel_provider.ProviderSettings(runtime_dir=tmp_path / "runtime"))
    try:
        record = kernel_provider.KernelRecord("k1", os.getpid(), planted.parent, None, None)  # type: ignore[arg-type]
        keys = [f"0000000{number}-0000-4000-8000-000000000000" for number in range(3)]
        for key in keys:
            provider.retain(record, key)
        kept = sorted(path.name for path in provider.retained.iterdir())
    finally:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    assert kept == keys[1:], kept
