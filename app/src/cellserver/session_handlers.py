"""`POST /kernel`, `DELETE /kernel/<id>`, the WebSocket `/kernel/<id>/channels`, the same channels over SockJS
at `/sockjs` and the files of `/kernel/<id>/files/<path>`, as SageMathCell answers them."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mimetypes
import os
import urllib.parse
from typing import Any

import tornado.web
import tornado.websocket
from sockjs.tornado import SockJSConnection, SockJSRouter

from cellserver.handlers import PublicAPIHandler, origin_allowed
from cellserver.kernel_files import SESSION_ID_PATTERN, FileRefusedError
from cellserver.kernels import KernelsBusyError, KernelStartError
from cellserver.service import RETRY_AFTER_SECONDS
from cellserver.sessions import (
    BadMessageError,
    DrainingError,
    SessionManager,
    TooManySessionsError,
    message_for_kernel,
)

log = logging.getLogger("cellserver.sessions")

# Larger messages close the connection (code 1009): code is limited to 65,000 characters, and even as
# JSON escapes that stays well under this.
MAX_MESSAGE_BYTES = 1 << 20
# An idle session (an interact waiting for its slider) still sends a ping this often: proxies on the way (nginx's
# proxy_read_timeout, HAProxy's tunnel timeout) close connections that carry nothing for longer than theirs.
WEBSOCKET_PING_SECONDS = 30
FILE_CHUNK_BYTES = 1 << 16
SOCKJS_CLIENT_URL = "/static/sockjs.min.js"
# Upstream's words for a page over its cap, so its pages show them.
TOO_MANY_KERNELS = (
    "This page requested too many simultaneous kernels. Please wait for existing computations to finish, "
    "reload the page, or contact the author of this page for assistance."
)


def client_key(handler: tornado.web.RequestHandler) -> str:
    """Whose kernels count together against the cap: the page's cell session when it names one (upstream's
    `CellSessionID`), otherwise the client's address (the first proxy's view of it)."""
    cell_session = handler.get_argument("CellSessionID", "")
    if cell_session:
        return f"cell-session:{cell_session}"
    forwarded = handler.request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
    return f"address:{forwarded or handler.request.remote_ip}"


def requested_timeout(value: str) -> float | None:
    """The page's idle timeout in seconds ("inf" allowed), or None when it is not a number >= 0."""
    try:
        timeout = float(value)
    except ValueError:
        return None
    return timeout if timeout >= 0 and not math.isnan(timeout) else None


def form_fields_parse(body: bytes) -> bool:
    """Whether a form body is name=value pairs (tornado skips what is not, silently)."""
    try:
        urllib.parse.parse_qsl(body.decode("latin-1"), keep_blank_values=True, strict_parsing=bool(body))
    except ValueError:
        return False
    return True


def json_fields(body: bytes) -> dict[str, str] | None:
    """A JSON object's fields as the form fields they stand for (true is "true"), or None when the body is
    not an object of plain values."""
    try:
        document = json.loads(body or b"{}")
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    fields = {}
    for name, value in document.items():
        if isinstance(value, bool):
            fields[name] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            fields[name] = str(value)
        else:
            return None
    return fields


class KernelHandler(PublicAPIHandler):
    def initialize(self, sessions: SessionManager) -> None:
        self.sessions = sessions

    def prepare(self) -> None:
        # Upstream reads form fields; a client may send the same fields as a JSON object.
        content_type = self.request.headers.get("Content-Type", "")
        if self.request.method != "POST":
            return
        if content_type.startswith("application/x-www-form-urlencoded") and not form_fields_parse(self.request.body):
            self.fail(400, "the body is not form fields (name=value&...)")
            return
        if not content_type.startswith("application/json"):
            return
        fields = json_fields(self.request.body)
        if fields is None:
            self.fail(400, "the body must be a JSON object of strings, numbers and booleans")
            return
        for name, value in fields.items():
            self.request.arguments.setdefault(name, []).append(value.encode())

    def options(self, session_id: str | None = None) -> None:
        self.set_header("Access-Control-Allow-Methods", "POST, GET, OPTIONS, DELETE")
        self.set_header("Access-Control-Allow-Headers", "X-XSRFToken, Content-Type")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    async def post(self, session_id: str | None = None) -> None:
        # Pages that cannot send DELETE (a form in an iframe) say method=DELETE.
        method = self.get_argument("method", "POST")
        if method == "DELETE":
            self.delete(session_id)
            return
        if method == "OPTIONS":
            self.options(session_id)
            return
        if not self.terms_accepted():
            return
        timeout = requested_timeout(self.get_argument("timeout", "0"))
        if timeout is None:
            self.fail(400, "timeout must be a number of seconds, 0 or more (or inf)")
            return
        try:
            session = await self.sessions.open(client_key(self), timeout)
        except TooManySessionsError:
            self.set_status(429)
            self.answer({"error": "too_many_kernels_for_cell_session", "message": TOO_MANY_KERNELS})
            return
        except DrainingError as error:
            # A load balancer that retries on 503 sends the page to another cell (see the haproxy role).
            self.fail(503, f"{error}; retry later", {"Retry-After": str(RETRY_AFTER_SECONDS)})
            return
        except (KernelsBusyError, KernelStartError):
            self.fail(503, "every kernel is busy; retry later", {"Retry-After": str(RETRY_AFTER_SECONDS)})
            return
        self.set_header("Jupyter-Kernel-ID", session.session_id)
        self.answer({"ws_url": self.ws_url(), "id": session.session_id})

    def delete(self, session_id: str | None = None) -> None:
        if session_id is None:
            self.fail(405, "DELETE names a kernel: /kernel/<id>")
            return
        session = self.sessions.get(session_id)
        if session is not None:
            self.sessions.end(session, "the page deleted it")
        self.answer(None)

    def ws_url(self) -> str:
        """Where the page opens its channels: this server as the page reached it (through TLS at the load
        balancer, the scheme it reports)."""
        scheme = self.request.headers.get("X-Forwarded-Proto", self.request.protocol).split(",")[0].strip()
        return f"{'wss' if scheme == 'https' else 'ws'}://{self.request.host}/"

    def answer(self, data: dict[str, Any] | None) -> None:
        """JSON, or for a form posted into an iframe (`frame`), a script that posts it to the page."""
        if "frame" in self.request.arguments:
            self.set_header("Content-Type", "text/html")
            # json.dumps twice: the payload is a JSON string inside a script; </ cannot close the element.
            text = json.dumps(json.dumps(data)).replace("</", "<\\/")
            self.finish(f'<script>parent.postMessage({text},"*");</script>')
        elif data is None:
            self.finish()
        else:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(data))


class ChannelsHandler(tornado.websocket.WebSocketHandler):
    """One page's connection to its session's kernel: its shell requests in, the shell and iopub messages
    out. Closing it ends the session, as upstream's does."""

    def initialize(self, sessions: SessionManager) -> None:
        self.sessions = sessions
        self.session_id = ""

    def check_origin(self, origin: str) -> bool:
        return origin_allowed(origin, self.settings.get("allowed_origins", ()))

    async def get(self, session_id: str) -> None:
        if self.sessions.get(session_id) is None:
            raise tornado.web.HTTPError(404, reason="no such kernel")
        await super().get(session_id)

    def open(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is None:  # ended between the check and the upgrade
            self.close(1011, "the kernel is gone")
            return
        self.session_id = session_id
        self.sessions.attach(session, self)

    def deliver(self, text: str) -> None:
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self.write_message(text)

    def kernel_gone(self, last_message: str) -> None:
        self.deliver(last_message)
        self.close(1000, "the kernel is gone")

    def replaced(self) -> None:
        self.close(4000, "another connection took this kernel")

    def on_message(self, message: str | bytes) -> None:
        session = self.sessions.get(self.session_id)
        if session is None:
            self.close(1011, "the kernel is gone")
            return
        try:
            self.sessions.send(session, message_for_kernel(message, session.session_id))
        except BadMessageError as error:
            self.close(1008, str(error)[:120])
            self.sessions.end(session, f"the page sent a bad message ({error})")

    def on_close(self) -> None:
        session = self.sessions.get(self.session_id)
        if session is not None:
            self.sessions.detach(session, self)


class KernelFileHandler(PublicAPIHandler):
    """A file the session's computation wrote in its working directory (a plot, a `savefig`), as upstream
    serves `/kernel/<id>/files/<path>`: fresh on every request, since a recomputation rewrites it."""

    def initialize(self, sessions: SessionManager) -> None:
        self.sessions = sessions

    async def get(self, session_id: str, relative: str) -> None:
        session = self.sessions.get(session_id)
        provider = self.sessions.pool.provider
        try:
            if session is not None:
                descriptor = await provider.open_file(session.kernel.kernel_id, relative)
            else:
                # Upstream's page fetches a plot after its computation, when its kernel is usually gone.
                await self.sessions.files_kept(session_id)
                descriptor = provider.open_retained_file(session_id, relative)
        except FileNotFoundError:
            self.fail(404, "no such file")
            return
        except (FileRefusedError, OSError) as error:
            log.info("session %s: file %r refused: %s", session_id, relative, error)
            self.fail(403, "this file is not served")
            return
        with os.fdopen(descriptor, "rb") as stream:
            # The size it had when opened: a kernel still writing to it cannot make the answer overrun.
            remaining = os.fstat(stream.fileno()).st_size
            self.set_header("Content-Type", mimetypes.guess_type(relative)[0] or "application/octet-stream")
            self.set_header("Content-Length", str(remaining))
            self.set_header("Cache-Control", "no-cache")
            # What a computation wrote is the stranger's, served from this server's origin: a page of its
            # own (HTML, SVG) opened directly runs no script as this origin, and nothing is sniffed.
            self.set_header("Content-Security-Policy", "sandbox")
            self.set_header("X-Content-Type-Options", "nosniff")
            while remaining > 0 and (chunk := stream.read(min(FILE_CHUNK_BYTES, remaining))):
                remaining -= len(chunk)
                self.write(chunk)
                await self.flush()
            # Cut short by the kernel meanwhile: pad, so the answer still has the length it announced.
            self.write(b"\0" * remaining)
        self.finish()


class SockJSKernelLink:
    """One kernel's share of a page's SockJS connection: its messages go out behind `<id>/channels,`."""

    def __init__(self, connection: SockJSChannels, session_id: str) -> None:
        self.connection = connection
        self.prefix = f"{session_id}/channels,"
        self.session_id = session_id

    def deliver(self, text: str) -> None:
        if not self.connection.is_closed:
            self.connection.send(self.prefix + text)

    def kernel_gone(self, last_message: str) -> None:
        self.deliver(last_message)
        self.connection.links.pop(self.session_id, None)

    def replaced(self) -> None:
        self.connection.links.pop(self.session_id, None)


class SockJSChannels(SockJSConnection):  # type: ignore[misc]
    """A page's SockJS connection (what the embed falls back to where WebSockets are blocked): upstream
    multiplexes every kernel of the page over it, each message prefixed with `<kernel id>/channels,`. A
    kernel's first message attaches it to this connection; closing the connection ends them all."""

    sessions: SessionManager  # set on the class session_routes makes

    def on_open(self, request: Any) -> None:
        self.links: dict[str, SockJSKernelLink] = {}

    def on_message(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_BYTES:
            self.close(1009, "message too big")
            return
        prefix, separator, body = message.partition(",")
        session_id, _slash, channels = prefix.partition("/")
        session = self.sessions.get(session_id)
        if not separator or channels != "channels" or session is None:
            return  # upstream ignores messages to kernels it does not have
        link = self.links.get(session_id)
        if link is None:
            link = self.links[session_id] = SockJSKernelLink(self, session_id)
            self.sessions.attach(session, link)
        try:
            self.sessions.send(session, message_for_kernel(body, session_id))
        except BadMessageError as error:
            # Only this kernel's session ends: the connection carries the page's other kernels too.
            self.sessions.end(session, f"the page sent a bad message over SockJS ({error})")

    def on_close(self) -> None:
        for session_id, link in list(self.links.items()):
            session = self.sessions.get(session_id)
            if session is not None:
                self.sessions.detach(session, link)
        self.links.clear()


def sockjs_routes(sessions: SessionManager, allowed_origins: tuple[str, ...]) -> list[Any]:
    channels = type("BoundSockJSChannels", (SockJSChannels,), {"sessions": sessions})
    settings = {
        # The library compares hosts, not whole origins; none listed lets every page embed a cell.
        "websocket_allow_origin": [urllib.parse.urlsplit(origin).netloc.lower() for origin in allowed_origins] or "*",
        # The page that iframe-based transports load asks for the SockJS client here, never from a CDN.
        "sockjs_url": SOCKJS_CLIENT_URL,
    }
    return list(SockJSRouter(channels, "/sockjs", user_settings=settings).urls)


def session_routes(sessions: SessionManager, allowed_origins: tuple[str, ...] = ()) -> list[Any]:
    options = {"sessions": sessions}
    return [
        (r"/kernel", KernelHandler, options),
        (rf"/kernel/({SESSION_ID_PATTERN})", KernelHandler, options),
        (rf"/kernel/({SESSION_ID_PATTERN})/channels", ChannelsHandler, options),
        (rf"/kernel/({SESSION_ID_PATTERN})/files/(.+)", KernelFileHandler, options),
        *sockjs_routes(sessions, allowed_origins),
    ]
