"""Permalinks as SageMathCell makes them: a compressed copy of the code for `?z=` URLs, and a short id for
`?q=` URLs backed by a store: SQLite (WAL, fsync on every write) or PostgreSQL (each insert committed before
the answer). Either way an acknowledged permalink survives a crash."""

from __future__ import annotations

import base64
import secrets
import sqlite3
import string
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ID_ALPHABET = string.ascii_lowercase
ID_LENGTH = 6


@dataclass(frozen=True)
class Permalink:
    code: str
    language: str
    interacts: str


def zip_text(text: str) -> str:
    """urlsafe base64 of zlib-compressed UTF-8: the `zip` field and the `?z=` parameter."""
    return base64.urlsafe_b64encode(zlib.compress(text.encode("utf-8"))).decode("ascii")


def unzip_text(value: str) -> str:
    """Inverse of zip_text; the `=` padding may have been dropped from a URL, as upstream allows."""
    padded = value + "=" * (-len(value) % 4)
    return zlib.decompress(base64.urlsafe_b64decode(padded.encode("ascii"))).decode("utf-8")


def new_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


class StoreUnavailableError(Exception):
    """The database cannot be reached now (down, restarting): the caller answers 503, not a server error."""


class PermalinkStore(Protocol):
    def put(self, permalink: Permalink) -> str: ...
    def get(self, ident: str) -> Permalink | None: ...
    def close(self) -> None: ...


def candidate_ids() -> Iterator[str]:
    # 26**6 ids: a collision is rare, twenty in a row means something else is wrong.
    for _ in range(20):
        yield new_id()
    raise RuntimeError("could not find a free permalink id")


class SQLiteStore:
    """A permalink table in one SQLite file. Calls are blocking: run them off the event loop."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS permalinks (
            ident TEXT PRIMARY KEY,
            code TEXT NOT NULL,
            language TEXT NOT NULL,
            interacts TEXT NOT NULL,
            created REAL NOT NULL DEFAULT (julianday('now')),
            requested INTEGER NOT NULL DEFAULT 0
        )
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        # WAL lets readers go on while a write commits; FULL makes each commit durable before we answer.
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.execute(self.SCHEMA)

    def put(self, permalink: Permalink) -> str:
        with self._lock:
            for ident in candidate_ids():
                try:
                    self._connection.execute(
                        "INSERT INTO permalinks (ident, code, language, interacts) VALUES (?, ?, ?, ?)",
                        (ident, permalink.code, permalink.language, permalink.interacts),
                    )
                    return ident
                except sqlite3.IntegrityError:
                    continue
        raise AssertionError("unreachable")

    def get(self, ident: str) -> Permalink | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT code, language, interacts FROM permalinks WHERE ident = ?", (ident,)
            ).fetchone()
        return Permalink(*row) if row else None

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class PostgresStore:
    """The same table in PostgreSQL (the cluster's choice). One connection per calling thread, reopened
    once when the server went away (a restart), so a restarted database costs no request."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS permalinks (
            ident TEXT PRIMARY KEY,
            code TEXT NOT NULL,
            language TEXT NOT NULL,
            interacts TEXT NOT NULL,
            created TIMESTAMPTZ NOT NULL DEFAULT now(),
            requested INTEGER NOT NULL DEFAULT 0
        )
    """

    def __init__(self, conninfo: str) -> None:
        import psycopg  # only the PostgreSQL deployments need the driver

        self._psycopg = psycopg
        self.conninfo = conninfo
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self._run(lambda connection: connection.execute(self.SCHEMA))

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None or connection.closed:
            # autocommit: every INSERT is its own transaction, committed (and flushed) before put() returns.
            connection = self._psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _run(self, action: Any) -> Any:
        try:
            return action(self._connection())
        except self._psycopg.OperationalError:
            self._local.connection = None  # the server restarted or the link broke: one fresh try
        try:
            return action(self._connection())
        except self._psycopg.OperationalError as error:
            self._local.connection = None
            raise StoreUnavailableError(f"the permalink database is unavailable: {type(error).__name__}") from error

    def put(self, permalink: Permalink) -> str:
        for ident in candidate_ids():
            try:
                self._run(lambda connection, ident=ident: connection.execute(
                    "INSERT INTO permalinks (ident, code, language, interacts) VALUES (%s, %s, %s, %s)",
                    (ident, permalink.code, permalink.language, permalink.interacts),
                ))  # fmt: skip
                return ident
            except self._psycopg.errors.UniqueViolation:
                continue
        raise AssertionError("unreachable")

    def get(self, ident: str) -> Permalink | None:
        row = self._run(lambda connection: connection.execute(
            "SELECT code, language, interacts FROM permalinks WHERE ident = %s", (ident,)
        ).fetchone())  # fmt: skip
        return Permalink(*row) if row else None

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
