"""What every cellserver HTTP handler shares: errors as JSON, and the code field both public calls take."""

from __future__ import annotations

import json
from typing import Any

import tornado.web

from cellserver import __version__

# Upstream's limit for /service and /permalink: longer code is refused with 413.
MAX_CODE_CHARS = 65_000


class JSONErrorHandler(tornado.web.RequestHandler):
    def set_default_headers(self) -> None:
        # Which release answered: during a rolling update old and new servers answer side by side.
        self.set_header("X-Cellserver-Version", __version__)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # send_error clears every header first: the ones an error needs come through kwargs.
        self.set_header("Content-Type", "application/json")
        if status_code == 405:
            # RFC 9110: a 405 names the methods the resource has.
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        for name, value in kwargs.get("headers", {}).items():
            self.set_header(name, value)
        reason = kwargs.get("reason") or self._reason
        self.finish(json.dumps({"error": reason, "status": status_code}))

    def allowed_methods(self) -> list[str]:
        """The HTTP methods this handler implements (tornado answers 405 for the others, HEAD included)."""
        base = tornado.web.RequestHandler
        methods = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
        handler = type(self)
        return [method for method in methods if getattr(handler, method.lower()) is not getattr(base, method.lower())]

    def fail(self, status_code: int, reason: str, headers: dict[str, str] | None = None) -> None:
        self.send_error(status_code, reason=reason, headers=headers or {})


class PublicAPIHandler(JSONErrorHandler):
    """/service and /permalink: callable from any page that embeds a cell, as upstream allows."""

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Access-Control-Allow-Origin", "*")

    def code_argument(self) -> str | None:
        """The code field, or None after answering 400 (missing) or 413 (too long)."""
        code = self.get_body_argument("code", default=None, strip=False)
        if code is None:
            self.fail(400, "the code field is required")
            return None
        if len(code) > MAX_CODE_CHARS:
            self.fail(413, f"code longer than {MAX_CODE_CHARS} characters")
            return None
        return code
