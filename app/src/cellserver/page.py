"""The cell page at `/`, and `/permalink` on the compute server.

`/?z=<zip>`, `/?q=<id>` and `/?c=<code>` (with optional `&lang=`, `&interacts=` and `&autoeval=`) open the
page with that code in the cell and run it, as upstream's links do (`&autoeval=false` only opens it). The
server resolves the code and puts it in the page, so a link works even where scripts cannot reach the
permalink service themselves. A damaged `z` answers 400 and an unknown `q` 404, as upstream's do.
"""

from __future__ import annotations

import binascii
import json
import urllib.parse
import zlib
from pathlib import Path
from typing import Any

import tornado.httpclient
import tornado.web

from cellserver.handlers import JSONErrorHandler, PublicAPIHandler
from cellserver.permalink_service import MAX_ID_CHARS, RETRY_AFTER_SECONDS
from cellserver.permalinks import Permalink, PermalinkStore, unzip_text

PACKAGE_DIR = Path(__file__).parent
STATIC_DIR = PACKAGE_DIR / "static"
TEMPLATE_DIR = PACKAGE_DIR / "templates"
# What the cell page offers per kernel: upstream's page sends Python to the Sage kernel wrapped in exec().
LANGUAGES = {"sage": ["sage", "python"], "python3": ["python"]}
# Values of autoeval that keep a link from running on open (upstream writes the value into its page as a
# JavaScript literal, so these are the ones that read as false there).
NO_AUTOEVAL = ("false", "0")


class PermalinkSource:
    """Where `?q=` ids are looked up: the permalink service over HTTP, or a store in this process."""

    def __init__(self, url: str = "", store: PermalinkStore | None = None) -> None:
        self.url = url.rstrip("/")
        self.store = store

    async def lookup(self, ident: str) -> Permalink | None:
        if len(ident) > MAX_ID_CHARS:
            return None
        if self.store is not None:
            return self.store.get(ident)
        query = urllib.parse.urlencode({"q": ident})
        response = await tornado.httpclient.AsyncHTTPClient().fetch(
            f"{self.url}/permalink?{query}", raise_error=False, request_timeout=10
        )
        if response.code == 404:
            return None
        if response.code != 200:
            raise LookupError(f"the permalink service answered {response.code}")
        code, language, interacts = json.loads(response.body)
        return Permalink(code=str(code), language=str(language), interacts=str(interacts))


def script_json(value: dict[str, Any]) -> str:
    """JSON that is safe inside a <script> element: no `</script>` can end it early."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class LinkError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class CellPageHandler(JSONErrorHandler):
    def initialize(self, permalinks: PermalinkSource, kernel: str) -> None:
        self.permalinks = permalinks
        self.languages = LANGUAGES[kernel]

    async def get(self) -> None:
        try:
            cell = await self.linked_cell()
        except LinkError as error:
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status == 503 else {}
            self.fail(error.status, str(error), headers)
            return
        autoeval = self.get_query_argument("autoeval", "true") not in NO_AUTOEVAL
        language = cell.language if cell.language in self.languages else self.languages[0]
        initial = {"code": cell.code, "language": language, "languages": self.languages,
                   "interacts": cell.interacts, "autoeval": autoeval and bool(cell.code)}  # fmt: skip
        self.set_header("Cache-Control", "no-store")
        self.render("index.html", initial_cell=script_json(initial))

    async def linked_cell(self) -> Permalink:
        """The cell a link asks for (an empty one without a link); LinkError when it cannot be had."""
        language = self.get_query_argument("lang", "")
        if "c" in self.request.arguments:
            return Permalink(code=self.get_query_argument("c", strip=False), language=language, interacts="[]")
        if "z" in self.request.arguments:
            try:
                code = unzip_text(self.get_query_argument("z"))
                interacts = (
                    unzip_text(self.get_query_argument("interacts")) if "interacts" in self.request.arguments else "[]"
                )
            except (binascii.Error, zlib.error, UnicodeDecodeError, ValueError) as error:
                raise LinkError(400, f"Invalid zipped code: {error}") from None
            return Permalink(code=code, language=language, interacts=interacts)
        if "q" in self.request.arguments:
            ident = self.get_query_argument("q")
            try:
                permalink = await self.permalinks.lookup(ident)
            except (LookupError, OSError, tornado.httpclient.HTTPClientError) as failure:
                raise LinkError(503, f"the permalink could not be fetched ({failure}); retry later") from None
            if permalink is None:
                raise LinkError(404, "ID not found in permalink database")
            return permalink
        return Permalink(code="", language=language, interacts="[]")


class PermalinkForwardHandler(PublicAPIHandler):
    """/permalink on the compute server, passed on to the permalink service (its own process or machine).
    Cross-origin headers are this server's own, like every public call it answers."""

    def initialize(self, url: str) -> None:
        self.url = url.rstrip("/")

    async def forward(self, method: str) -> None:
        query = urllib.parse.urlencode(self.request.query_arguments, doseq=True)
        response = await tornado.httpclient.AsyncHTTPClient().fetch(
            f"{self.url}/permalink" + (f"?{query}" if query else ""),
            method=method,
            body=self.request.body if method == "POST" else None,
            headers={"Content-Type": self.request.headers.get("Content-Type", "application/x-www-form-urlencoded")},
            raise_error=False,
            request_timeout=15,
        )
        if response.code == 599:  # no answer at all
            self.fail(502, "the permalink service did not answer")
            return
        self.set_status(response.code)
        for name in ("Content-Type", "Retry-After"):
            if name in response.headers:
                self.set_header(name, response.headers[name])
        self.finish(response.body)

    async def get(self) -> None:
        await self.forward("GET")

    async def post(self) -> None:
        await self.forward("POST")
