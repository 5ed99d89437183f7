#!/usr/bin/env python3
"""SageMathCell's own interactive client, as its contrib/sagecell-client/sagecell-client.py talks to a server.

Usage: sagecell_session_client.py BASE_URL [CODE] [--insecure] [--timeout SECONDS] [--fetch-files]. Asks
BASE_URL/kernel for
a kernel (form POST of accepted_tos=true, Accept: application/json), opens `<ws_url>kernel/<id>/channels`
with the Jupyter-Kernel-ID header, sends one execute_request of CODE (default `factorial(2020)`) with the
`_sagecell_files` user expression, and waits for both its execute_reply and an idle status. Prints
{"shell": [...], "iopub": [...]} as JSON and exits 0; exits 1 when the server refuses or goes silent. The
same messages as upstream's script, written with tornado (which the project's environment has) instead of
websocket-client and requests. With --fetch-files it then fetches each file the reply's `new_files` payload
names from `<BASE_URL>/kernel/<id>/files/<name>`, as upstream's page does once the computation is done, and
adds {"files": {name: {"status", "type", "sha256"}}}.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import sys
import urllib.parse
import uuid
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

TIMEOUT_SECONDS = 10


def execute_request(code: str) -> dict[str, Any]:
    return {
        "channel": "shell",
        "header": {
            "msg_type": "execute_request",
            "msg_id": str(uuid.uuid4()),
            "username": "",
            "session": str(uuid.uuid4()),
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": code,
            "silent": False,
            "user_expressions": {"_sagecell_files": "sys._sage_.new_files()"},
            "allow_stdin": False,
        },
    }


def received(messages: dict[str, Any]) -> str:
    """What came before the server went silent, for the error: each message's channel, type and state."""
    seen = []
    for channel in ("shell", "iopub"):
        for message in messages[channel]:
            state = message.get("content", {}).get("execution_state")
            seen.append(f"{channel}:{message['header']['msg_type']}" + (f"({state})" if state else ""))
    return ", ".join(seen) or "no message at all"


def new_files(messages: dict[str, Any]) -> list[str]:
    """The files the execute reply's payload announces."""
    replies = [m for m in messages["shell"] if m["header"]["msg_type"] == "execute_reply"]
    payloads = replies[0]["content"].get("payload", []) if replies else []
    return [name for payload in payloads for name in payload.get("new_files", [])]


async def fetch_files(kernel_url: str, names: list[str], context: ssl.SSLContext | None, timeout: float) -> dict:
    """Each named file as the page gets it: the status, its type and a digest of what came."""
    files = {}
    for name in names:
        request = HTTPRequest(kernel_url + "files/" + urllib.parse.quote(name), ssl_options=context,
                              request_timeout=timeout)  # fmt: skip
        try:
            answer = await AsyncHTTPClient().fetch(request)
        except HTTPClientError as error:
            files[name] = {"status": error.code, "type": None, "sha256": None}
            continue
        digest = hashlib.sha256(answer.body).hexdigest()
        files[name] = {"status": answer.code, "type": answer.headers.get("Content-Type"), "sha256": digest}
    return files


async def run(
    base_url: str, code: str, context: ssl.SSLContext | None, timeout: float, with_files: bool = False
) -> dict[str, Any]:
    url = base_url.rstrip("/") + "/"
    answer = await AsyncHTTPClient().fetch(HTTPRequest(
        url + "kernel", method="POST", body=urllib.parse.urlencode({"accepted_tos": "true"}),
        headers={"Accept": "application/json"}, ssl_options=context, request_timeout=timeout,
    ))  # fmt: skip
    kernel = json.loads(answer.body)
    kernel_url = f"{kernel['ws_url']}kernel/{kernel['id']}/"
    connection = await websocket_connect(HTTPRequest(
        kernel_url + "channels", headers={"Jupyter-Kernel-ID": kernel["id"]}, ssl_options=context,
        connect_timeout=timeout, request_timeout=timeout,
    ))  # fmt: skip
    connection.write_message(json.dumps(execute_request(code)))
    messages: dict[str, Any] = {"shell": [], "iopub": []}
    replied = idle = False
    while not (replied and idle):
        try:
            text = await asyncio.wait_for(connection.read_message(), timeout)
        except asyncio.TimeoutError:  # noqa: UP041 - not the builtin TimeoutError before Python 3.11 (EL9)
            raise TimeoutError(f"silent for {timeout:g} s, after {received(messages)}") from None
        if text is None:
            raise ConnectionError("the server closed the connection before the computation ended")
        message = json.loads(text)
        if message["channel"] == "shell":
            messages["shell"].append(message)
            replied = replied or message["header"]["msg_type"] == "execute_reply"
        elif message["channel"] == "iopub":
            messages["iopub"].append(message)
            idle = idle or (message["header"]["msg_type"] == "status"
                            and message["content"]["execution_state"] == "idle")  # fmt: skip
    connection.close()
    if with_files:
        files_url = f"{url}kernel/{kernel['id']}/"
        messages["files"] = await fetch_files(files_url, new_files(messages), context, timeout)
    return messages


def main(argv: list[str]) -> int:
    options = [argument for argument in argv if argument.startswith("--")]
    positional = [argument for argument in argv if not argument.startswith("--")]
    timeout = TIMEOUT_SECONDS
    if "--timeout" in argv:
        timeout = float(argv[argv.index("--timeout") + 1])
        positional.remove(argv[argv.index("--timeout") + 1])
    context = ssl._create_unverified_context() if "--insecure" in options else None
    code = positional[1] if len(positional) > 1 else "factorial(2020)"
    try:
        messages = asyncio.run(run(positional[0], code, context, timeout, "--fetch-files" in options))
    except Exception as error:
        print(f"the server did not compute: {error!r}", file=sys.stderr)
        return 1
    print(json.dumps(messages))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
