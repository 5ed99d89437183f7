"""Permalinks as SageMathCell makes them: a compressed copy of the code for `?z=` URLs, and a short id for
`?q=` URLs backed by a store. Storage is SQLite here (WAL, fsync on every write, so an acknowledged permalink
survives a crash)."""

from __future__ import annotations

import base64
import secrets
import sqlite3
import string
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

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
            for _ in range(20):
                ident = new_id()
                try:
                    self._connection.execute(
                        "INSERT INTO permalinks (ident, code, language, interacts) VALUES (?, ?, ?, ?)",
                        (ident, permalink.code, permalink.language, permalink.interacts),
                    )
                    return ident
                except sqlite3.IntegrityError:
                    continue  # 26**6 ids: a collision is rare, twenty in a row means something else is wrong
        raise RuntimeError("could not find a free permalink id")

    def get(self, ident: str) -> Permalink | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT code, language, interacts FROM permalinks WHERE ident = ?", (ident,)
            ).fetchone()
        return Permalink(*row) if row else None

    def close(self) -> None:
        with self._lock:
            self._connection.close()
