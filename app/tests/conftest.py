"""Start the permalink service as a real process on a free loopback port."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from browser import Browser, chromium_binary


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_request(
    url: str, method: str, fields: dict[str, str] | None = None, timeout: float = 60,
    headers: dict[str, str] | None = None, data: bytes | None = None, context: ssl.SSLContext | None = None,
) -> tuple[int, http.client.HTTPMessage, str]:  # fmt: skip
    """Status, headers and text of one request; fields go as a form. An error status is an answer, not an
    exception; a 101 (a WebSocket upgrade) has no body, so reading it returns at once."""
    if fields is not None:
        data = urllib.parse.urlencode(fields).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


@dataclass
class Service:
    port: int
    database: Path
    process: subprocess.Popen[bytes] | None = None
    arguments: tuple[str, ...] = ()
    python: str = sys.executable  # the environment the server runs in (the Sage one for Sage kernels)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        """Where the server's own log goes: a failed test's message quotes its end (log_tail)."""
        return self.database.parent / f"cellserver-{self.port}.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(no server log: {error})"

    def start(self) -> None:
        command = [self.python, "-m", "cellserver", *self.arguments, "--port", str(self.port)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{' '.join(command)} did not start listening")

    def kill_hard(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def request(
        self,
        method: str,
        path: str,
        fields: dict[str, str] | None = None,
        timeout: float = 60,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, http.client.HTTPMessage, str]:
        return http_request(self.url + path, method, fields, timeout, headers, data)


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster from Debian's packages, on a free loopback port."""

    directory: Path
    port: int
    bin_dir: Path

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _as_owner(self, *command: str) -> list[str]:
        # PostgreSQL refuses to run as root; CI runs the tests as root, so the cluster runs as `postgres`.
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)

    def start(self) -> None:
        subprocess.run(self._as_owner(str(self.bin_dir / "pg_ctl"), "-D", str(self.directory / "data"), "-w",
                       "-l", str(self.directory / "log"), "-o", f"-p {self.port} -k {self.directory} -c fsync=on",
                       "start"), check=True, stdout=subprocess.DEVNULL)  # fmt: skip

    def kill_hard(self) -> None:
        postmaster = int((self.directory / "data" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{postmaster}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Backends outlive a SIGKILLed postmaster briefly; the next start waits for them through pg_ctl.
        time.sleep(1)

    def stop(self) -> None:
        subprocess.run(self._as_owner(str(self.bin_dir / "pg_ctl"), "-D", str(self.directory / "data"), "-m",
                       "immediate", "stop"), check=False, capture_output=True)  # fmt: skip


def postgres_bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (apt install postgresql); CI must run these tests")
        pytest.skip("PostgreSQL is not installed (apt install postgresql)")
    # Not under pytest's temporary root: that is closed to other users, and the cluster runs as `postgres`.
    directory = Path(tempfile.mkdtemp(prefix="cellfleet-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    cluster = Postgres(directory=directory, port=free_port(), bin_dir=bin_dir)
    subprocess.run(cluster._as_owner(str(bin_dir / "initdb"), "-D", str(directory / "data"), "--auth=trust",
                                     "-U", "postgres"), check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    """The permalink service on each store the cluster may use."""
    database = tmp_path / "permalinks.sqlite3"
    if request.param == "sqlite":
        arguments: tuple[str, ...] = ("permalink", "--db", str(database))
    else:
        cluster = request.getfixturevalue("postgres")
        arguments = ("permalink", "--postgres", cluster.conninfo)
    running = Service(port=free_port(), database=database, arguments=arguments)
    running.start()
    yield running
    running.stop()


def descendants(pid: int) -> set[int]:
    """Every process under pid: its children, theirs, and so on."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, pending = set(), [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.add(child)
            pending.append(child)
    return found


def only_child(parent: int, other_than: int | None = None, patience: float = 10) -> int:
    """The single child parent settles on (the kernel that just ran has exited), and not other_than."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        children = descendants(parent)
        if len(children) == 1 and other_than not in children:
            return children.pop()
        time.sleep(0.05)
    raise AssertionError(f"process {parent} kept children {sorted(descendants(parent))}")


def compute_server(tmp_path: Path, *options: str, python: str = sys.executable) -> Service:
    return Service(port=free_port(), database=tmp_path / "unused", arguments=("serve", *options), python=python)


def serving(directory: Path, *options: str, python: str = sys.executable) -> Iterator[Service]:
    """A compute server with these options for the tests of a module (yield from it in a fixture)."""
    running = compute_server(directory, *options, python=python)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def serving_with_settings(directory: Path, settings: str, python: str = sys.executable) -> Iterator[Service]:
    """serving() from a cellserver.toml holding these settings."""
    config = directory / "cellserver.toml"
    config.write_text(settings)
    yield from serving(directory, "--config", str(config), python=python)


def sage_python() -> str:
    """The Python of the Sage environment (`make sage`); skips the test without one, fails it under CI."""
    found = os.environ.get("CELLFLEET_SAGE_PYTHON") or str(
        Path(__file__).resolve().parents[2] / ".venv-sage/bin/python"
    )
    if Path(found).exists():
        return found
    if os.environ.get("CI"):
        pytest.fail(f"no Sage environment at {found} (make sage); CI must run the Sage tests")
    pytest.skip(f"no Sage environment at {found} (make sage)")


@pytest.fixture
def compute(tmp_path: Path) -> Iterator[Service]:
    """A compute server with two kernel slots and a 5 s computation limit."""
    running = compute_server(tmp_path, "--max-kernels", "2", "--preforked", "1", "--timeout", "5")
    running.start()
    yield running
    running.stop()


def lab_url() -> str | None:
    """The cluster that the embed page and upstream's client tests run against instead of a laptop server
    (`make embed-lab` sets it to the lab's load balancer); None: they start servers of their own."""
    return os.environ.get("CELLFLEET_LAB_URL") or None


@dataclass(frozen=True)
class RemoteService:
    """A running cluster in place of a laptop Service: its load balancer's URL, and requests to it (its
    self-signed certificate taken as it is)."""

    url: str

    def request(
        self, method: str, path: str, fields: dict[str, str] | None = None, timeout: float = 60,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, str]:  # fmt: skip
        return http_request(self.url + path, method, fields, timeout, headers, context=ssl._create_unverified_context())


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium for a module's tests; skips without it, fails under CI. Against the lab, it takes the
    load balancer's self-signed certificate."""
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt install chromium); CI must run the browser tests")
        pytest.skip("chromium is not installed (apt install chromium)")
    running = Browser(binary, *(["--ignore-certificate-errors"] if lab_url() else []))
    yield running
    running.close()


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[str, dict[str, str]]]:
    """An embedding site on another loopback port (another origin, as far as the browser's rules go): it serves
    the pages a test puts in its dict, by path."""
    pages: dict[str, str] = {}

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", pages
    server.shutdown()
    server.server_close()
