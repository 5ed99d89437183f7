"""`POST /service`: run code once in a fresh kernel and answer as SageMathCell does."""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.web

from cellserver import computation_log
from cellserver.config import ServerConfig
from cellserver.handlers import JSONErrorHandler, NotFoundHandler, PublicAPIHandler
from cellserver.kernels import Kernel, KernelPool, KernelsBusyError, KernelSlowStartError, KernelStartError
from cellserver.permalinks import PermalinkStore
from cellserver.sessions import SessionManager

RETRY_AFTER_SECONDS = 5
HEALTH_TIMEOUT_SECONDS = 10.0
# How long, at least, a cell whose health computation could not run (every kernel busy) or did not answer in
# time still counts as alive on its last success: a saturated or starved cell serves late, and taking it out of
# rotation sends its load to its peers, which then starve in turn. A cell whose timeout is longer gets longer
# (slow_cell_seconds).
SLOW_CELL_SECONDS = 60.0
# Longest a probe waits for a running health computation: well inside a load balancer's check timeout
# (haproxy_check_timeout), so a starved cell answers its checks instead of timing them out.
PROBE_PATIENCE_SECONDS = 4.0


async def execute(kernel: Kernel, code: str, user_expressions: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run code; collect its stdout and stderr streams and the execute_reply."""
    streams: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def collect(message: dict[str, Any]) -> None:
        if message["msg_type"] == "stream":
            streams.setdefault(message["content"]["name"], []).append(message["content"]["text"])

    running = asyncio.ensure_future(
        kernel.client.execute_interactive(
            code, user_expressions=user_expressions, allow_stdin=False, timeout=timeout, output_hook=collect
        )
    )
    died = asyncio.ensure_future(kernel.died.wait())
    await asyncio.wait({running, died}, return_when=asyncio.FIRST_COMPLETED)
    died.cancel()
    if running.done() and not running.cancelled() and running.exception() is None:
        content = running.result()["content"]
    elif running.done() and isinstance(running.exception(), TimeoutError):
        content = {"status": "error", "ename": "TimeoutError", "evalue": f"no answer within {timeout:g} s",
                   "traceback": []}  # fmt: skip
    elif not running.done():
        # The kernel exited mid-computation: a limit killed it (CPU, memory) or the code ended the process.
        running.cancel()
        content = {"status": "error", "ename": "KernelDied", "evalue": "the kernel exited before it answered",
                   "traceback": []}  # fmt: skip
    else:
        raise running.exception()  # type: ignore[misc]
    answer: dict[str, Any] = {"success": content.get("status") == "ok", "stdout": "".join(streams["stdout"])}
    stderr = "".join(streams["stderr"])
    if stderr:
        answer["stderr"] = stderr
    answer["execute_reply"] = content
    return answer


class ServiceHandler(PublicAPIHandler):
    def initialize(self, pool: KernelPool, timeout: float, health: HealthProbe) -> None:
        self.pool = pool
        self.timeout = timeout
        self.health = health

    def parse_request(self) -> tuple[str, dict[str, str]] | None:
        if not self.terms_accepted():
            return None
        code = self.code_argument(required=False)
        if code is None:
            return None
        raw = self.get_argument("user_expressions", default="{}", strip=False)
        try:
            expressions = json.loads(raw)
        except ValueError:
            expressions = None
        if not isinstance(expressions, dict) or not all(isinstance(v, str) for v in expressions.values()):
            self.fail(400, "user_expressions must be a JSON object of strings")
            return None
        return code, expressions

    async def post(self) -> None:
        parsed = self.parse_request()
        if parsed is None:
            return
        code, expressions = parsed
        try:
            kernel = await self.pool.acquire()
        except KernelStartError:
            self.fail(503, "a kernel failed to start; retry later", {"Retry-After": str(RETRY_AFTER_SECONDS)})
            return
        except KernelsBusyError:
            self.fail(503, "every kernel is busy; retry later", {"Retry-After": str(RETRY_AFTER_SECONDS)})
            return
        started = time.monotonic()
        try:
            answer = await execute(kernel, code, expressions, self.timeout)
        finally:
            self.pool.release(kernel)
            computation_log.record("service", self.request, kernel.kernel_id, time.monotonic() - started, code)
        if not answer["success"] and self.pool.provider.lost.is_set():
            # The kernel went with its provider, not because of the code; this server exits next.
            self.fail(503, "the kernel provider went away; retry later", {"Retry-After": str(RETRY_AFTER_SECONDS)})
            return
        self.health.witness(answer)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(answer, default=str))


def probe_sum() -> tuple[str, str]:
    """Two random integers to add, as upstream's monitoring check does: an expression no cache can answer,
    and the text it must give."""
    a, b = (secrets.randbelow(1 << 32) - (1 << 31) for _ in range(2))
    return f"{a} + {b}", str(a + b)


async def evaluate_quietly(kernel: Kernel, expression: str, timeout: float) -> str | None:
    """expression's value as text, evaluated by the kernel without a trace: a silent request keeps no
    history and no execution count, and an expression assigns nothing. None when the kernel did not answer."""
    try:
        reply = await asyncio.wait_for(
            kernel.client.execute_interactive(
                "", silent=True, store_history=False, user_expressions={"probe": expression}, allow_stdin=False,
                timeout=timeout,
            ),
            timeout,
        )  # fmt: skip
    except (asyncio.TimeoutError, TimeoutError):
        return None
    value = reply["content"].get("user_expressions", {}).get("probe", {})
    return value.get("data", {}).get("text/plain") if value.get("status") == "ok" else None


@dataclass(frozen=True)
class Verdict:
    """One health computation's result: failure is None when it answered right; a failure that is not
    conclusive (every kernel busy, no answer in time) says the cell is saturated or slow, not broken."""

    failure: str | None
    conclusive: bool = True


def slow_cell_seconds(config: ServerConfig) -> float:
    """How long a busy cell may go without a successful computation: one whose every kernel runs a computation
    to its wall limit, and then starts a fresh kernel, shows none for that long and is still serving."""
    return max(SLOW_CELL_SECONDS, config.timeout + config.kernel_start_timeout)


class HealthProbe:
    """One real computation, shared: load balancers probe every second, a kernel per probe would be a load
    of its own. A result younger than max_age answers; an older one starts a fresh computation: a reserve
    kernel adds two random numbers and stays in the reserve, or, with the reserve empty, a kernel of its own
    prints their sum.

    While that computation runs, probes get the previous result at once (for up to HEALTH_TIMEOUT_SECONDS
    more) instead of waiting for it: a probe that waits on a computation holds its connection open, and a
    load balancer only notices that a VM is gone once such an in-flight probe times out (seconds, not one
    check interval). Past that, probes wait for the computation, for PROBE_PATIENCE_SECONDS at most: one that
    has not answered by then is judged as a slow one.

    A user's computation that succeeded proves the same as the probe's own, so it counts as the recent
    result: a busy cell spends no kernels on probes (on the lab's emulated cells they were a kernel start
    every 5 s each, while they served). Failed ones do not count: user code fails for reasons of its own.

    A wrong answer or a kernel that cannot start makes the cell unhealthy at once. A computation that could
    not run because every kernel is busy, whose kernel started but stayed silent past the start timeout, or
    that did not answer in time, proves nothing either way: the cell stays healthy on its last success for
    slow_seconds, and only then is it called unhealthy.
    """

    def __init__(self, pool: KernelPool, max_age: float, slow_seconds: float = SLOW_CELL_SECONDS) -> None:
        self.pool = pool
        self.max_age = max_age
        self.slow_seconds = slow_seconds
        self._last: tuple[float, str | None] | None = None  # (finished at, failure or None)
        self._last_success: float | None = None
        self._running: asyncio.Future[str | None] | None = None

    async def failure(self) -> str | None:
        """None when a computation answered right recently enough, otherwise why it did not."""
        last = self._last
        age = time.monotonic() - last[0] if last else math.inf
        if last and age < self.max_age:
            return last[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._compute())
            self._running.add_done_callback(self._forget)
        if last and age < self.max_age + HEALTH_TIMEOUT_SECONDS:
            return last[1]
        try:
            return await asyncio.wait_for(asyncio.shield(self._running), PROBE_PATIENCE_SECONDS)
        except asyncio.TimeoutError:
            silence = f"for {age:.0f} s" if last else "yet"
            return self._judge(Verdict(f"no health computation has answered {silence}", False))

    def witness(self, answer: dict[str, Any]) -> None:
        """A user's computation just ended with this answer."""
        if answer["success"]:
            self._succeeded()

    def _succeeded(self) -> None:
        now = time.monotonic()
        self._last, self._last_success = (now, None), now

    def _forget(self, finished: asyncio.Future[str | None]) -> None:
        if self._running is finished:
            self._running = None

    async def _compute(self) -> str | None:
        # It may run with no probe awaiting it: whatever goes wrong is recorded as the failure, not raised.
        try:
            verdict = await self._compute_once()
        except Exception as error:
            verdict = Verdict(f"the health computation failed: {error!r}")
        if verdict.failure is None:
            self._succeeded()
            return None
        self._last = (time.monotonic(), self._judge(verdict))
        return self._last[1]

    def _judge(self, verdict: Verdict) -> str | None:
        """The failure a probe reports for a computation that did not answer right."""
        if verdict.conclusive:
            return verdict.failure
        since = time.monotonic() - self._last_success if self._last_success is not None else math.inf
        if since < self.slow_seconds:
            return None
        return f"{verdict.failure}, and no computation has succeeded for {self.slow_seconds:.0f} s"

    async def _compute_once(self) -> Verdict:
        expression, expected = probe_sum()
        kernel = await self.pool.borrow(HEALTH_TIMEOUT_SECONDS)
        if kernel is not None:
            # A waiting reserve kernel adds the numbers and stays in the reserve: a kernel start per probe
            # would cost an emulated cell most of its CPU while it serves nobody.
            value = await evaluate_quietly(kernel, expression, HEALTH_TIMEOUT_SECONDS)
            self.pool.give_back(kernel, usable=value == expected)
            if value is None:
                return Verdict(f"a reserve kernel gave no answer within {HEALTH_TIMEOUT_SECONDS:g} s", False)
            return Verdict(None if value == expected else f"a reserve kernel answered {value!r}, not {expected}")
        try:
            kernel = await self.pool.acquire()
        except KernelSlowStartError as error:
            return Verdict(f"a kernel was slow to start: {error}", False)
        except KernelStartError as error:
            return Verdict(f"a kernel failed to start: {error}")
        except KernelsBusyError:
            return Verdict("every kernel is busy", False)
        try:
            answer = await execute(kernel, f"print({expression})", {}, HEALTH_TIMEOUT_SECONDS)
        finally:
            self.pool.release(kernel)
        if answer["success"] and answer["stdout"].strip() == expected:
            return Verdict(None)
        if answer["execute_reply"].get("ename") == "TimeoutError":
            return Verdict(f"the health computation gave no answer within {HEALTH_TIMEOUT_SECONDS:g} s", False)
        return Verdict(f"the health computation answered {answer['stdout']!r}, not {expected}")


class HealthHandler(JSONErrorHandler):
    """For the load balancer: healthy means a computation succeeded within the last seconds."""

    def initialize(self, probe: HealthProbe) -> None:
        self.probe = probe

    async def get(self) -> None:
        failure = await self.probe.failure()
        if failure is not None:
            self.fail(503, failure, {"Retry-After": str(RETRY_AFTER_SECONDS)})
            return
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps({"healthy": True}))


class TermsHandler(JSONErrorHandler):
    """/tos.html: the terms a request accepts with accepted_tos=true, when the operator configured them."""

    def initialize(self, terms: str) -> None:
        self.terms = terms

    def get(self) -> None:
        if not self.terms:
            self.fail(404, "No Terms of Service Required")
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(self.terms)


def make_app(
    pool: KernelPool,
    config: ServerConfig,
    permalink_store: PermalinkStore | None = None,
    sessions: SessionManager | None = None,
) -> tornado.web.Application:
    """The compute server's routes. Permalinks go to the permalink service at config.permalink_url, or,
    with no URL (a laptop), to permalink_store in this process. Kernel sessions need sessions."""
    from cellserver import page
    from cellserver.permalink_service import permalink_routes
    from cellserver.session_handlers import MAX_MESSAGE_BYTES, WEBSOCKET_PING_SECONDS, session_routes

    if config.permalink_url:
        permalinks: list[Any] = [(r"/permalink", page.PermalinkForwardHandler, {"url": config.permalink_url})]
        source = page.PermalinkSource(url=config.permalink_url)
    else:
        assert permalink_store is not None
        permalinks = permalink_routes(permalink_store, paths=("/permalink",))
        source = page.PermalinkSource(store=permalink_store)
    health = HealthProbe(pool, config.health_max_age, slow_cell_seconds(config))
    terms = Path(config.tos_file).read_text() if config.tos_file else ""
    return tornado.web.Application(
        [
            (r"/", page.CellPageHandler, {"permalinks": source, "kernel": config.kernel}),
            (r"/service", ServiceHandler, {"pool": pool, "timeout": config.timeout, "health": health}),
            (r"/health", HealthHandler, {"probe": health}),
            (r"/tos\.html", TermsHandler, {"terms": terms}),
            # Where upstream's pages load the embed script from; /static/embedded_sagecell.js is the same file.
            (r"/(embedded_sagecell\.js)", tornado.web.StaticFileHandler, {"path": str(page.STATIC_DIR)}),
            *permalinks,
            *(session_routes(sessions, config.origins()) if sessions is not None else []),
        ],
        websocket_max_message_size=MAX_MESSAGE_BYTES,
        websocket_ping_interval=WEBSOCKET_PING_SECONDS,
        default_handler_class=NotFoundHandler,
        static_path=str(page.STATIC_DIR),
        template_path=str(page.TEMPLATE_DIR),
        allowed_origins=config.origins(),
        terms_of_service=bool(terms),
    )
