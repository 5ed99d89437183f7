"""Files a computation wrote in its working directory, as `/kernel/<id>/files/<path>` serves them.

A page fetches the files after its computation, and with upstream's default timeout of 0 its kernel is gone
by then: when a session's kernel is released, what it wrote (visible files, within a budget) is copied to a
directory of the session's own, served from there until it expires.

The path comes from the page, and the directory belongs to the computation, which may have planted symlinks,
hard links, FIFOs or files it does not own there: a file is opened one component at a time from the working
directory, never following a link, and served only when it is a regular file of the kernel's own user with a
single name. Whoever opens it (the provider as root for a pooled worker, the server itself for its own
kernels) hands on only the open descriptor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import time
from pathlib import Path

WORK_DIRECTORY = "work"  # in each kernel's directory: the working directory of a kernel run as the current user
# What one answer of the provider to a file request may be: a short JSON line (the descriptor rides beside it).
MAX_ANSWER_BYTES = 4096
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
RETAINED_DIRECTORY = "retained"  # in the provider's runtime directory: files of released kernels, by session id
RETAIN_MAX_BYTES = 8 << 20  # per session: plots and data files, not a disk image
RETAIN_MAX_FILES = 64
# For every session together: the copies live in the kernels' runtime directory, on a RAM-backed /run that the
# kernels' own sockets need; the oldest go first.
RETAIN_TOTAL_BYTES = 64 << 20
RETAIN_SECONDS = 600.0  # a page fetches its images at once; a reader may follow a file link later
# A kernel session's id (upstream's are uuid4 strings), by which its kept files are filed.
SESSION_ID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
RETAIN_KEY = re.compile(SESSION_ID_PATTERN)
# A FIFO or a device must not block the opener: such a file is refused after the open anyway.
FILE_FLAGS = OPEN_FLAGS | os.O_NONBLOCK


class FileRefusedError(Exception):
    """The path names no file this kernel may hand out; the text says why (for the log, not the page)."""


def path_components(relative: str) -> list[str]:
    """The names along a path relative to the working directory; FileRefusedError for any other path."""
    components = relative.split("/")
    if not relative or "\0" in relative or any(name in ("", ".", "..") for name in components):
        raise FileRefusedError(f"not a plain relative path: {relative!r}")
    return components


def open_kernel_file(base: Path, relative: str, owner: int) -> int:
    """A read-only descriptor of the file at relative under base, opened without following any link;
    FileNotFoundError when there is none, FileRefusedError when it may not be served."""
    *directories, name = path_components(relative)
    directory = os.open(base, OPEN_FLAGS | os.O_DIRECTORY)
    try:
        for component in directories:
            inner = os.open(component, OPEN_FLAGS | os.O_DIRECTORY, dir_fd=directory)
            os.close(directory)
            directory = inner
        descriptor = os.open(name, FILE_FLAGS, dir_fd=directory)
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise FileRefusedError(f"{relative!r}: {error.strerror}") from None  # ELOOP for a link, ENOTDIR, EACCES
    finally:
        os.close(directory)
    try:
        refusal = refusal_of(os.fstat(descriptor), owner)
    except OSError:
        refusal = "cannot be examined"
    if refusal:
        os.close(descriptor)
        raise FileRefusedError(f"{relative!r}: {refusal}")
    os.set_blocking(descriptor, True)
    return descriptor


def refusal_of(status: os.stat_result, owner: int) -> str | None:
    """Why an opened file is not the kernel's own to serve, or None."""
    if not stat.S_ISREG(status.st_mode):
        return "not a regular file"
    if status.st_uid != owner:
        return f"owned by uid {status.st_uid}, not the kernel's {owner}"
    if status.st_nlink != 1:
        return "a hard link to a file elsewhere"
    return None


def file_request(kernel_id: str, relative: str) -> bytes:
    return (json.dumps({"id": 0, "op": "open_file", "kernel_id": kernel_id, "path": relative}) + "\n").encode()


def answer_with_descriptor(connection: socket.socket, answer: dict[str, object], descriptor: int | None) -> None:
    """The provider's side: one JSON line, the descriptor passed along with it (SCM_RIGHTS)."""
    data = (json.dumps(answer) + "\n").encode()
    socket.send_fds(connection, [data], [descriptor] if descriptor is not None else [])


def ask_provider_for_file(socket_path: str, kernel_id: str, relative: str, timeout: float) -> int:
    """The server's side, blocking (run it in a thread): a descriptor of the kernel's file from the root
    provider, over a connection of its own (the pool's connection carries no descriptors)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        connection.connect(socket_path)
        connection.sendall(file_request(kernel_id, relative))
        return descriptor_from_answer(connection)


def descriptor_from_answer(connection: socket.socket) -> int:
    """Read the provider's one-line answer and the descriptor passed with it."""
    data, received = b"", []
    while not data.endswith(b"\n") and len(data) < MAX_ANSWER_BYTES:
        chunk, descriptors, _flags, _address = socket.recv_fds(connection, MAX_ANSWER_BYTES, 1)
        received.extend(descriptors)
        if not chunk:
            break
        data += chunk
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {"error": "the kernel provider gave no answer"}
    if "error" in answer or len(received) != 1:
        for descriptor in received:
            with contextlib.suppress(OSError):
                os.close(descriptor)
        if answer.get("missing"):
            raise FileNotFoundError(answer.get("error", "no such file"))
        raise FileRefusedError(str(answer.get("error", "no descriptor came with the answer")))
    return received[0]


def retain_files(base: Path, owner: int, destination: Path, group: int = -1) -> tuple[int, int]:
    """Copy the visible regular files of owner under base into destination (readable by group, when given),
    within the budget, never following a link; the number of files and of bytes copied."""
    copied, budget = 0, RETAIN_MAX_BYTES
    destination.mkdir(mode=0o750)
    if group >= 0:
        os.chown(destination, -1, group)
    for top, directories, files, top_fd in os.fwalk(base, follow_symlinks=False):
        directories[:] = sorted(name for name in directories if not name.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or copied >= RETAIN_MAX_FILES:
                continue
            relative = Path(top).relative_to(base) / name
            with contextlib.suppress(OSError, FileRefusedError):
                budget -= copy_one(top_fd, name, owner, destination / relative, budget, group)
                copied += 1
    return copied, RETAIN_MAX_BYTES - budget


def copy_one(directory: int, name: str, owner: int, target: Path, budget: int, group: int) -> int:
    """Copy one file opened under directory if it may be served and fits the budget; the bytes copied."""
    descriptor = os.open(name, FILE_FLAGS, dir_fd=directory)
    with os.fdopen(descriptor, "rb") as source:
        status = os.fstat(descriptor)
        refusal = refusal_of(status, owner) or ("over the budget" if status.st_size > budget else None)
        if refusal:
            raise FileRefusedError(refusal)
        os.set_blocking(descriptor, True)
        make_directories(target.parent, group)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        with os.fdopen(fd, "wb") as copy:
            if group >= 0:
                os.fchown(fd, -1, group)
            shutil.copyfileobj(source, copy, length=1 << 16)
            return copy.tell()


def make_directories(directory: Path, group: int) -> None:
    if directory.is_dir():
        return
    make_directories(directory.parent, group)
    directory.mkdir(mode=0o750)
    if group >= 0:
        os.chown(directory, -1, group)


def remove_expired(retained: Path, older_than: float = RETAIN_SECONDS) -> None:
    """Drop the retained files of sessions released more than older_than seconds ago."""
    deadline = time.time() - older_than
    with contextlib.suppress(FileNotFoundError):
        for entry in retained.iterdir():
            with contextlib.suppress(OSError):
                if entry.lstat().st_mtime < deadline:
                    shutil.rmtree(entry, ignore_errors=True)
