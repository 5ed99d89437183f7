"""What every cellserver HTTP handler shares: errors as JSON, cross-origin rules, and the code field."""

from __future__ import annotations

import json
from typing import Any

import tornado.web

from cellserver import __version__

# Upstream's limit for /service and /permalink: longer code is refused with 413.
MAX_CODE_CHARS = 65_000
# Upstream's words for a missing acceptance, so clients written against it recognise the refusal.
TOS_REFUSAL = (
    "When evaluating code, you must acknowledge your acceptance of the terms of service at /tos.html "
    "by passing the parameter accepted_tos=true\n"
)


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


class NotFoundHandler(JSONErrorHandler):
    """Every path no route matches: a JSON 404 like the API's other refusals."""

    def prepare(self) -> None:
        self.fail(404, "no such resource")


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """No list: every page may embed a cell, as on upstream's public server."""
    return not allowed or origin in allowed


class PublicAPIHandler(JSONErrorHandler):
    """/service and /permalink: callable from any page that embeds a cell, as upstream allows.

    Upstream's embed sends credentialed requests, which browsers refuse to answer with `*`: the page's
    Origin is echoed with Allow-Credentials, for every origin or only for the application's
    `allowed_origins`. Refusals carry the same headers, so the page can read why it was refused.
    """

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_cors_headers()

    def set_cors_headers(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin is None:
            self.set_header("Access-Control-Allow-Origin", "*")
            return
        self.set_header("Vary", "Origin")
        if origin_allowed(origin, self.settings.get("allowed_origins", ())):
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Credentials", "true")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_cors_headers()  # send_error cleared them
        super().write_error(status_code, **kwargs)

    def options(self, *_path_arguments: str) -> None:
        # A preflight, for pages that send more than a form (a JSON body, custom headers); the same for every
        # path a route matches, whatever it captures.
        self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Content-Type, X-Requested-With")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def code_argument(self, required: bool) -> str | None:
        """The code, or None after answering 400 (missing where required) or 413 (too long).

        Every `code` field of the query and the body, joined, as upstream reads it; a missing one is an
        empty cell where upstream runs one (/service), and a 400 where upstream refuses (/permalink).
        """
        parts = self.get_arguments("code", strip=False)
        if not parts and required:
            self.fail(400, "the code field is required")
            return None
        code = "".join(parts)
        if len(code) > MAX_CODE_CHARS:
            self.fail(413, f"code longer than {MAX_CODE_CHARS} characters")
            return None
        return code

    def terms_accepted(self) -> bool:
        """True unless terms of service are configured and the request did not accept them (then 403)."""
        if not self.settings.get("terms_of_service") or self.get_argument("accepted_tos", "false") == "true":
            return True
        self.fail(403, TOS_REFUSAL)
        return False
