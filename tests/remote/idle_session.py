"""Opens a page's kernel session on the cell server on this VM's loopback, asking for an idle timeout, runs one
computation, then stays silent until the server ends the session. Prints JSON: {"stdout": the computation's
output, "last": the last message's content (the dead status), "ended_after": seconds from the reply to the end}.

Usage: idle_session.py PORT CODE IDLE_SECONDS. Run it with the cell server's venv python: it needs tornado.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.parse
import uuid
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

SILENCE_LIMIT_SECONDS = 600


def execute_request(session: str, code: str) -> str:
    header = {"msg_type": "execute_request", "msg_id": str(uuid.uuid4()), "session": session, "username": ""}
    content = {"code": code, "silent": False, "user_expressions": {}, "allow_stdin": False}
    message = {"channel": "shell", "header": header, "parent_header": {}, "metadata": {}, "content": content}
    return json.dumps(message)


async def main(port: str, code: str, idle: str) -> None:
    body = urllib.parse.urlencode({"accepted_tos": "true", "timeout": idle})
    request = HTTPRequest(f"http://127.0.0.1:{port}/kernel", method="POST", body=body)
    kernel = json.loads((await AsyncHTTPClient().fetch(request)).body)
    connection = await websocket_connect(f"{kernel['ws_url']}kernel/{kernel['id']}/channels")
    await connection.write_message(execute_request(kernel["id"], code))
    output, replied = "", time.monotonic()
    last: dict[str, Any] = {}
    while (text := await asyncio.wait_for(connection.read_message(), SILENCE_LIMIT_SECONDS)) is not None:
        last = json.loads(text)
        if last["msg_type"] == "stream":
            output += last["content"]["text"]
        if last["msg_type"] == "execute_reply":
            replied = time.monotonic()
    print(json.dumps({"stdout": output, "last": last.get("content"), "ended_after": time.monotonic() - replied}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
