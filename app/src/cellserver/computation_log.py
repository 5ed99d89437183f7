"""One syslog line per computation (facility local3): where it came from, what kind, how long, which kernel,
and the code, so abuse can be traced and the central log host collects it."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import stat

import tornado.httputil

LOGGER_NAME = "cellserver.computations"
DEFAULT_SYSLOG_SOCKET = "/dev/log"


def origin(request: tornado.httputil.HTTPServerRequest) -> str:
    """The embedding page if the browser says, else the client address the load balancer saw first."""
    referer = request.headers.get("Referer")
    if referer:
        return referer
    forwarded = request.headers.get("X-Forwarded-For", "")
    first = forwarded.split(",")[0].strip()
    return first or request.remote_ip or "-"


def is_socket(path: str) -> bool:
    """Only a socket takes the log: anything else (no such path, /dev/null) means no computation log, rather
    than a logging error on every computation."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def setup(syslog_socket: str = DEFAULT_SYSLOG_SOCKET) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if is_socket(syslog_socket) and not logger.handlers:
        handler = logging.handlers.SysLogHandler(
            address=syslog_socket, facility=logging.handlers.SysLogHandler.LOG_LOCAL3
        )
        handler.setFormatter(logging.Formatter("cellserver: %(message)s"))
        logger.addHandler(handler)
    return logger


def record(kind: str, request: tornado.httputil.HTTPServerRequest, kernel_id: str, seconds: float, code: str) -> None:
    entry = {"type": kind, "origin": origin(request), "kernel": kernel_id, "seconds": round(seconds, 3), "code": code}
    logging.getLogger(LOGGER_NAME).info(json.dumps(entry, ensure_ascii=False))
