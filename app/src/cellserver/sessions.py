"""Kernel sessions: a kernel that lives as long as a page uses it, as SageMathCell's `POST /kernel` gives one.

The page asks for a kernel (`POST /kernel`), talks to it over a WebSocket at `/kernel/<id>/channels` (shell
and iopub messages in one stream, each carrying a `channel` field), and ends it with `DELETE /kernel/<id>`
or by closing the connection. A session's kernel is a pooled kernel like a `/service` one, released (its
worker reset) when the session ends.

How long a session lives follows upstream: the page asks for an idle `timeout` in seconds (at most
`session_idle_seconds`; the kernel may change it with a `kernel_timeout` message, as an interact does). With
a timeout of 0, the default, the session ends once its computations are done and the kernel is idle. No
session outlives `session_lifetime_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import queue
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from cellserver.kernels import Kernel, KernelPool

log = logging.getLogger("cellserver.sessions")

# What a page may ask of its kernel's shell. Upstream's interacts count as computations.
SHELL_REQUESTS = frozenset({
    "execute_request", "complete_request", "inspect_request", "is_complete_request", "kernel_info_request",
    "comm_info_request", "comm_open", "comm_msg", "comm_close", "sagenb.interact.update_interact",
})  # fmt: skip
COMPUTATIONS = frozenset({"execute_request", "sagenb.interact.update_interact"})
COMPUTATION_REPLIES = frozenset({"execute_reply", "sagenb.interact.update_interact_reply"})
# Computations one session may have waiting in its kernel: more is a flood, and ends the session.
MAX_PENDING_COMPUTATIONS = 16
PROTOCOL_VERSION = "5.3"
REAP_INTERVAL_SECONDS = 1.0
FILES_KEPT_PATIENCE_SECONDS = 10.0
DRAINED = "its cell was taken out of service for maintenance"
RELEASE_POLL_SECONDS = 0.02
# A channel's reader waits this long for the kernel's next message, then looks again: an asyncio wait on a
# zmq socket can miss the wake-up of a message already queued (its descriptor is edge-triggered), and a
# bounded wait finds such a message at its next look instead of never.
RECEIVE_WAIT_SECONDS = 1.0
# A computation whose outputs are all out (its idle status came) but whose reply has not, this long after:
# the kernel's shell is sent a kernel_info request, whose arrival makes a kernel that holds the reply unsent
# send it (ipykernel's shell reads and writes one socket; a missed wake-up there strands a message too).
REPLY_PATIENCE_SECONDS = 5.0


class TooManySessionsError(Exception):
    """The page may not have another kernel now; the message says why."""


class DrainingError(Exception):
    """The server is draining its sessions: new ones go to another cell."""


class BadMessageError(Exception):
    """A message from the page that its kernel must not get; the text says what is wrong with it."""


class PageConnection(Protocol):
    """Where a session's kernel messages go: the page's WebSocket."""

    def deliver(self, text: str) -> None: ...

    def kernel_gone(self, last_message: str) -> None: ...

    def replaced(self) -> None: ...


@dataclass
class KernelSession:
    session_id: str
    kernel: Kernel
    client_key: str
    timeout: float  # idle seconds after the kernel's last message; 0: ends once its computations are done
    started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    computations: int = 0
    # The page's computations (message ids) whose reply has not come, and those whose outputs may still
    # come: the kernel's idle status for a request follows all its outputs on iopub, but the reply travels
    # on the shell channel, which may be read before or after it.
    awaiting_reply: set[str] = field(default_factory=set)
    awaiting_idle: set[str] = field(default_factory=set)
    requests: set[str] = field(default_factory=set)  # the page's message ids: their answers are the page's
    # Computations whose idle status came before their reply: when it came, and whether the kernel was asked.
    idle_before_reply: dict[str, float] = field(default_factory=dict)
    nudged: set[str] = field(default_factory=set)
    connection: PageConnection | None = None
    ended: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def json_default(value: Any) -> Any:
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return None  # binary buffers do not go to the page, as upstream drops them
    return str(value)


def message_for_page(message: dict[str, Any], channel: str) -> str:
    """A kernel's message as upstream's pages receive it: Jupyter's fields plus its channel, no buffers."""
    keep = ("header", "parent_header", "metadata", "content", "msg_id", "msg_type")
    page_message = {name: message[name] for name in keep if name in message}
    page_message["channel"] = channel
    return json.dumps(page_message, default=json_default)


def message_for_kernel(raw: str | bytes, session_id: str) -> dict[str, Any]:
    """A page's message, checked, with the header fields it may leave out filled in; BadMessageError otherwise."""
    try:
        message = json.loads(raw)
    except ValueError:
        raise BadMessageError("not JSON") from None
    if not isinstance(message, dict):
        raise BadMessageError("not a JSON object")
    if message.get("channel") != "shell":
        raise BadMessageError(f"channel {message.get('channel')!r}: a page talks to its kernel's shell only")
    header = message.get("header")
    if not isinstance(header, dict) or not isinstance(header.get("msg_type"), str):
        raise BadMessageError("no header with a msg_type")
    if header["msg_type"] not in SHELL_REQUESTS:
        raise BadMessageError(f"msg_type {header['msg_type']!r} is not a request a page may send")
    for part in ("content", "metadata", "parent_header"):
        if not isinstance(message.get(part, {}), dict):
            raise BadMessageError(f"{part} must be an object")
    header = {
        "msg_id": str(header.get("msg_id") or uuid.uuid4()),
        "msg_type": header["msg_type"],
        "username": str(header.get("username", "")),
        "session": str(header.get("session") or session_id),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": PROTOCOL_VERSION,
    }
    return {
        "header": header,
        "parent_header": message.get("parent_header", {}),
        "metadata": message.get("metadata", {}),
        "content": message.get("content", {}),
    }


def kernel_timeout(value: Any) -> float | None:
    """The idle timeout a kernel_timeout message asks for (a number or "inf"), None when it is not one >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None  # NaN compares false


def dead_status(session_id: str, reason: str) -> str:
    """What upstream tells a page whose kernel has gone, and why (a field upstream's pages ignore; the embed
    script shows it)."""
    return json.dumps({
        "channel": "iopub",
        "header": {"msg_type": "status", "msg_id": str(uuid.uuid4()), "session": session_id, "username": ""},
        "parent_header": {}, "metadata": {}, "msg_type": "status",
        "content": {"execution_state": "dead", "reason": reason},
    })  # fmt: skip


class SessionManager:
    """Every live session of this server: opened from the kernel pool, ended by the page, by its kernel's
    death, by its idle timeout, or by the lifetime limit."""

    def __init__(self, pool: KernelPool, idle_limit: float, lifetime: float, per_client: int) -> None:
        self.pool = pool
        self.idle_limit = idle_limit
        self.lifetime = lifetime
        self.per_client = per_client
        self.sessions: dict[str, KernelSession] = {}
        self.releasing: dict[str, asyncio.Task[None]] = {}  # ended sessions whose kernel is being released
        self._reaper: asyncio.Task[None] | None = None
        self.draining = False
        self._drain: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever())

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._drain is not None:
            self._drain.cancel()
        for session in list(self.sessions.values()):
            self.end(session, "the server is stopping")

    def drain(self, patience: float) -> asyncio.Task[None]:
        """Take no new sessions until resume(); the open ones may end by themselves for patience seconds, then
        the rest are ended with a reason the page shows. What a rolling update or a removal does before it
        takes the cell away (the cell's server signals: SIGUSR1 drains, SIGUSR2 resumes)."""
        self.draining = True
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._drained(patience))
        return self._drain

    def resume(self) -> None:
        """Take new sessions again; a drain still waiting for sessions to end leaves them be."""
        self.draining = False
        if self._drain is not None:
            self._drain.cancel()
        log.info("taking new sessions again")

    async def _drained(self, patience: float) -> None:
        log.info("draining %d sessions for up to %g s", len(self.sessions), patience)
        deadline = time.monotonic() + patience
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(REAP_INTERVAL_SECONDS)
        for session in list(self.sessions.values()):
            self.end(session, DRAINED)
        log.info("drained: no session left")

    def live_for(self, client_key: str) -> int:
        return sum(1 for session in self.sessions.values() if session.client_key == client_key)

    async def open(self, client_key: str, timeout: float) -> KernelSession:
        """A new session on a ready kernel; TooManySessionsError past the per-client cap, KernelsBusyError when
        no kernel is free."""
        if self.draining:
            raise DrainingError("this cell is draining its sessions")
        if self.live_for(client_key) >= self.per_client:
            raise TooManySessionsError(f"this page already has {self.per_client} kernels")
        kernel = await self.pool.acquire()
        if self.live_for(client_key) >= self.per_client:  # others of the same page got theirs meanwhile
            self.pool.release(kernel)
            raise TooManySessionsError(f"this page already has {self.per_client} kernels")
        session = KernelSession(str(uuid.uuid4()), kernel, client_key, min(timeout, self.idle_limit))
        self.sessions[session.session_id] = session
        for channel in ("iopub", "shell"):
            session.tasks.append(asyncio.create_task(self._pump(session, channel)))
        session.tasks.append(asyncio.create_task(self._watch_death(session)))
        log.info("session %s on kernel %s for %s", session.session_id, kernel.kernel_id, client_key)
        return session

    def get(self, session_id: str) -> KernelSession | None:
        return self.sessions.get(session_id)

    async def files_kept(self, session_id: str) -> None:
        """Until the files of a session that just ended are kept (its release copies them first), or its
        release is over: a page asks for its plot right as the computation, and so the session, ends."""
        releasing = self.releasing.get(session_id)
        kept = self.pool.provider.retained_directory(session_id)
        deadline = time.monotonic() + FILES_KEPT_PATIENCE_SECONDS
        while releasing is not None and not releasing.done() and kept is not None and not kept.exists():
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(RELEASE_POLL_SECONDS)

    def attach(self, session: KernelSession, connection: PageConnection) -> None:
        """The page's connection gets the kernel's messages from now on; one it replaces is told so."""
        previous, session.connection = session.connection, connection
        if previous is not None:
            previous.replaced()

    def detach(self, session: KernelSession, connection: PageConnection) -> None:
        """The page closed this connection: the session ends with it, unless another one replaced it."""
        if session.connection is connection:
            self.end(session, "the page closed its connection")

    def send(self, session: KernelSession, message: dict[str, Any]) -> None:
        """A checked message from the page to its kernel's shell; a flood of computations ends the session."""
        msg_id = message["header"]["msg_id"]
        if message["header"]["msg_type"] in COMPUTATIONS:
            if len(session.awaiting_reply) >= MAX_PENDING_COMPUTATIONS:
                raise BadMessageError(f"more than {MAX_PENDING_COMPUTATIONS} computations waiting")
            session.awaiting_reply.add(msg_id)
            session.awaiting_idle.add(msg_id)
            session.computations += 1
        session.requests.add(msg_id)
        session.last_activity = time.monotonic()
        session.kernel.client.shell_channel.send(message)

    def end(self, session: KernelSession, reason: str) -> None:
        """Release the kernel (its worker is reset) and tell the page, once."""
        if session.ended:
            return
        session.ended = True
        self.sessions.pop(session.session_id, None)
        current = asyncio.current_task()
        for task in session.tasks:
            if task is not current:
                task.cancel()
        releasing = self.pool.release(session.kernel, retain_as=session.session_id)
        self.releasing[session.session_id] = releasing
        releasing.add_done_callback(lambda _task: self.releasing.pop(session.session_id, None))
        log.info("session %s ended: %s", session.session_id, reason)
        if session.connection is not None:
            session.connection.kernel_gone(dead_status(session.session_id, reason))

    async def _pump(self, session: KernelSession, channel: str) -> None:
        receive = session.kernel.client.get_iopub_msg if channel == "iopub" else session.kernel.client.get_shell_msg
        while not session.ended:
            try:
                message = await receive(timeout=RECEIVE_WAIT_SECONDS)
            except queue.Empty:
                continue
            except Exception:
                # A message that does not deserialize, a socket closed under the reader: the page would wait
                # for answers that cannot come, so it is told instead.
                log.exception("session %s: reading its kernel's %s channel failed", session.session_id, channel)
                self.end(session, f"the server could not read its kernel's {channel} messages")
                return
            try:
                self._from_kernel(session, message, channel)
            except Exception:
                log.exception("session %s: a %s message of its kernel was not passed on", session.session_id, channel)

    def _from_kernel(self, session: KernelSession, message: dict[str, Any], channel: str) -> None:
        kind = message.get("msg_type")
        parent = message.get("parent_header", {}).get("msg_id")
        if kind in COMPUTATION_REPLIES:
            session.awaiting_reply.discard(parent)
            self._reply_came(session, parent)
        if kind == "status" and message["content"].get("execution_state") == "idle":
            session.awaiting_idle.discard(parent)
            if parent in session.awaiting_reply:
                session.idle_before_reply[parent] = time.monotonic()
        if kind == "kernel_timeout":
            # The kernel asks to live longer or shorter (an interact waits for the page's changes).
            # The kernel runs the page's code, so what it asks for is checked like a page's request.
            requested = kernel_timeout(message["content"].get("timeout"))
            if requested is not None:
                session.timeout = min(requested, self.idle_limit)
        elif session.connection is not None and self.for_page(session, message):
            session.connection.deliver(message_for_page(message, channel))
        session.last_activity = time.monotonic()
        if session.timeout == 0 and self.computations_done(session):
            self.end(session, "its computations are done")

    @staticmethod
    def _reply_came(session: KernelSession, parent: str | None) -> None:
        idle_at = session.idle_before_reply.pop(parent, None)
        if idle_at is not None and parent in session.nudged:
            session.nudged.discard(parent)
            log.warning("session %s: the reply to %s came %.1f s after its idle status, once the kernel was asked",
                        session.session_id, parent, time.monotonic() - idle_at)  # fmt: skip

    @staticmethod
    def ask_for_late_replies(session: KernelSession, now: float) -> None:
        """Send a kernel_info request for computations whose reply is late after their idle status (once each)."""
        late = [parent for parent, idle_at in session.idle_before_reply.items()
                if parent not in session.nudged and now - idle_at > REPLY_PATIENCE_SECONDS]  # fmt: skip
        if not late:
            return
        log.warning("session %s: no reply to %s %g s after its idle status; asking the kernel's shell",
                    session.session_id, ", ".join(late), REPLY_PATIENCE_SECONDS)  # fmt: skip
        session.nudged.update(late)
        session.kernel.client.kernel_info()

    @staticmethod
    def computations_done(session: KernelSession) -> bool:
        """The page computed, and every computation has its reply and all its outputs."""
        return session.computations > 0 and not session.awaiting_reply and not session.awaiting_idle

    @staticmethod
    def for_page(session: KernelSession, message: dict[str, Any]) -> bool:
        """Answers to the page's requests, and what the kernel sends on its own; not the answers to the pool's
        readiness checks, nor the kernel's `starting` status, which came before the page had it."""
        parent = message.get("parent_header", {}).get("msg_id")
        if parent:
            return parent in session.requests
        return message.get("msg_type") != "status"

    async def _watch_death(self, session: KernelSession) -> None:
        await session.kernel.died.wait()
        self.end(session, "its kernel exited")

    def expired(self, session: KernelSession, now: float) -> str | None:
        """Why the session must end now, or None."""
        if now - session.started > self.lifetime:
            return f"the lifetime limit ({self.lifetime:g} s)"
        idle = session.timeout if session.timeout > 0 else self.idle_limit
        if now - session.last_activity > idle:
            return f"idle for {idle:g} s"
        return None

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_SECONDS)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                reason = self.expired(session, now)
                if reason is not None:
                    self.end(session, reason)
                else:
                    self.ask_for_late_replies(session, now)
