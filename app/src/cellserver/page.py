"""The cell page at `/`, and `/permalink` on the compute server.

`/?z=<zip>`, `/?q=<id>` and `/?c=<code>` (with optional `&autoeval`) open the page with that code in the
cell, as upstream's links do; the server resolves the code and puts it in the page, so a link works
even where scripts cannot reach the permalink service themselves.
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

from cellserver.handlers import JSONErrorHandler
from cellserver.permalink_service import PERMALINK_ID
from cellserver.permalinks import PermalinkStore, unzip_text

PACKAGE_DIR = Path(__file__).parent
STATIC_DIR = PACKAGE_DIR / "static"
TEMPLATE_DIR = PACKAGE_DIR / "templates"


class PermalinkSource:
    """Where `?q=` ids are looked up: the permalink service over HTTP, or a store in this process."""

    def __init__(self, url: str = "", store: PermalinkStore | None = None) -> None:
        self.url = url.rstrip("/")
        self.store = store

    async def code_of(self, ident: str) -> str | None:
        if self.store is not None:
            permalink = self.store.get(ident)
            return permalink.code if permalink else None
        response = await tornado.httpclient.AsyncHTTPClient().fetch(
            f"{self.url}/permalink?q={ident}", raise_error=False, request_timeout=10
        )
        if response.code == 404:
            return None
        if response.code != 200:
            raise LookupError(f"the permalink service answered {response.code}")
        return str(json.loads(response.body)[0])


def script_json(value: dict[str, Any]) -> str:
    """JSON that is safe inside a <script> element: no `</script>` can end it early."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class CellPageHandler(JSONErrorHandler):
    def initialize(self, permalinks: PermalinkSource) -> None:
        self.permalinks = permalinks

    async def get(self) -> None:
        code, error = await self.requested_code()
        initial = {"code": code, "autoeval": "autoeval" in self.request.arguments, "error": error}
        self.set_header("Cache-Control", "no-store")
        self.render("index.html", initial_cell=script_json(initial))

    async def requested_code(self) -> tuple[str, str]:
        """The code a link asks for, and a message for the page when it cannot be found."""
        if "c" in self.request.arguments:
            return self.get_query_argument("c", strip=False), ""
        if "z" in self.request.arguments:
            try:
                return unzip_text(self.get_query_argument("z")), ""
            except (binascii.Error, zlib.error, UnicodeDecodeError, ValueError):
                return "", "this link's code is damaged (z= does not decompress)"
        if "q" in self.request.arguments:
            ident = self.get_query_argument("q")
            if not PERMALINK_ID.match(ident):
                return "", "q= is not a permalink id"
            try:
                code = await self.permalinks.code_of(ident)
            except (LookupError, OSError, tornado.httpclient.HTTPClientError) as failure:
                return "", f"the permalink could not be fetched ({failure})"
            return (code, "") if code is not None else ("", f"no permalink {ident}")
        return "", ""


class PermalinkForwardHandler(JSONErrorHandler):
    """/permalink on the compute server, passed on to the permalink service (its own process or machine)."""

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
            self.set_status(502)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": "the permalink service did not answer", "status": 502}))
            return
        self.set_status(response.code)
        for name in ("Content-Type", "Access-Control-Allow-Origin", "Retry-After"):
            if name in response.headers:
                self.set_header(name, response.headers[name])
        self.finish(response.body)

    async def get(self) -> None:
        await self.forward("GET")

    async def post(self) -> None:
        await self.forward("POST")
