"""HTTP side of permalinks, answering exactly as SageMathCell does, so upstream clients and URLs keep working.

POST code[, language, interacts, n] -> {"query": id, "zip": ..., "interacts": ..., "n": n when sent}
GET ?q=id[&callback=f]              -> [code, language, interacts], or f("<that JSON>"); as JSONP
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tornado.web

from cellserver.handlers import JSONErrorHandler, PublicAPIHandler
from cellserver.permalinks import (
    Permalink,
    PermalinkStore,
    StoreUnavailableError,
    zip_text,
)

MAX_INTERACTS_CHARS = 65_000
# A JSONP callback is a dotted JavaScript name; anything else could inject script into the response.
CALLBACK = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*(\.[A-Za-z_$][A-Za-z0-9_$]*)*$")
# Ids this store makes are six letters; older stores made others (uuids), so any shape is looked up.
# Longer than this is no id any store made: 404 without asking the database.
MAX_ID_CHARS = 64
# A restarted database is back within seconds; clients (and the page) retry after this.
RETRY_AFTER_SECONDS = 5
ANSWERED = object()  # returned by a step that has already answered the request with an error


class PermalinkHandler(PublicAPIHandler):
    def initialize(self, store: PermalinkStore, executor: ThreadPoolExecutor) -> None:
        self.store = store
        self.executor = executor

    async def _in_store(self, call: Callable[[Any], Any], argument: Any) -> Any:
        """The store call, off the event loop; a database that cannot be reached is a 503 to retry, not a 500."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, call, argument)
        except StoreUnavailableError as error:
            self.fail(503, f"{error}; retry later", {"Retry-After": str(RETRY_AFTER_SECONDS)})
            return ANSWERED

    async def post(self) -> None:
        code = self.code_argument(required=True)
        if code is None:
            return None
        language = self.get_argument("language", default="sage")
        interacts = self.get_argument("interacts", default="[]", strip=False)
        if len(interacts) > MAX_INTERACTS_CHARS or len(language) > 64:
            return self.fail(413, "interacts or language too long")
        sequence = self.sequence_number()
        if sequence is ANSWERED:
            return None
        permalink = Permalink(code=code, language=language, interacts=interacts)
        ident = await self._in_store(self.store.put, permalink)
        if ident is ANSWERED:
            return None
        answer: dict[str, Any] = {"query": ident, "zip": zip_text(code), "interacts": zip_text(interacts)}
        if sequence is not None:
            answer["n"] = sequence
        if "frame" in self.request.arguments:
            # Embeds in an iframe get the answer as a message to the parent page, as upstream does.
            self.set_header("Content-Type", "text/html")
            self.finish(f'<script>parent.postMessage({json.dumps(json.dumps(answer))},"*");</script>')
            return None
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(answer))
        return None

    def sequence_number(self) -> int | object | None:
        """The page's request number `n`, echoed: upstream's page drops an answer whose n is not its last."""
        raw = self.get_argument("n", default=None)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            self.fail(400, "n must be an integer")
            return ANSWERED

    async def get(self) -> None:
        ident = self.get_query_argument("q", default="")
        callback = self.get_query_argument("callback", default=None)
        if "q" not in self.request.query_arguments:
            return self.fail(400, "q is required")
        if callback is not None and not CALLBACK.match(callback):
            return self.fail(400, "callback must be a JavaScript name")
        permalink = await self._in_store(self.store.get, ident) if len(ident) <= MAX_ID_CHARS else None
        if permalink is ANSWERED:
            return None
        if permalink is None:
            return self.fail(404, f"no permalink {ident}")
        body = json.dumps([permalink.code, permalink.language, permalink.interacts])
        if callback is None:
            self.set_header("Content-Type", "application/json")
            self.finish(body)
        else:
            # Upstream hands the callback the JSON text as a string, not as an object; clients parse it.
            self.set_header("Content-Type", "application/javascript")
            self.finish(f"{callback}({json.dumps(body)});")
        return None


class PermalinkHealthHandler(JSONErrorHandler):
    """For the load balancer: healthy means the store answered a lookup just now."""

    def initialize(self, store: PermalinkStore, executor: ThreadPoolExecutor) -> None:
        self.store = store
        self.executor = executor

    async def get(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.store.get, "health")
        except Exception as error:  # any failure of the store is an unhealthy answer, never a crash
            self.fail(503, f"the permalink store failed: {type(error).__name__}")
            return
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps({"healthy": True}))


def permalink_routes(store: PermalinkStore, paths: tuple[str, ...] = ("/", "/permalink")) -> list[Any]:
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="permalink-store")
    return [(path, PermalinkHandler, {"store": store, "executor": executor}) for path in paths]


def make_app(store: PermalinkStore, allowed_origins: tuple[str, ...] = ()) -> tornado.web.Application:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="permalink-health")
    health = (r"/health", PermalinkHealthHandler, {"store": store, "executor": executor})
    return tornado.web.Application([*permalink_routes(store), health], allowed_origins=allowed_origins)
