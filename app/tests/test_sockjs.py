"""Kernel sessions over SockJS at `/sockjs`, what upstream's embed falls back to where WebSockets are blocked:
every kernel of a page multiplexed over one connection, each message behind `<kernel id>/channels,`, over
SockJS's WebSocket transport and over plain XHR polling."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from test_sessions import channels_status, execute_request, new_kernel
from tornado.websocket import WebSocketClientConnection, websocket_connect

from conftest import Service, serving


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from serving(tmp_path_factory.mktemp("sockjs"), "--max-kernels", "4", "--preforked", "2")


def open_session(server: Service) -> str:
    status, _headers, answer = new_kernel(server, timeout="60")
    assert status == 200, answer
    return answer["id"]


def framed(session_id: str, message: dict[str, Any]) -> str:
    return f"{session_id}/channels,{json.dumps(message)}"


def unframed(text: str) -> tuple[str, dict[str, Any]]:
    prefix, _comma, body = text.partition(",")
    session_id, _slash, channels = prefix.partition("/")
    assert channels == "channels", text
    return session_id, json.loads(body)


class SockJSOverWebSocket:
    """SockJS's WebSocket transport: "o" opens, "a[...]" carries messages, "h" is a heartbeat."""

    def __init__(self, connection: WebSocketClientConnection) -> None:
        self.connection = connection
        self.pending: list[str] = []

    @classmethod
    async def open(cls, server: Service) -> SockJSOverWebSocket:
        url = f"ws://127.0.0.1:{server.port}/sockjs/000/{uuid.uuid4().hex[:8]}/websocket"
        connection = await websocket_connect(url)
        assert await asyncio.wait_for(connection.read_message(), 10) == "o"
        return cls(connection)

    def send(self, text: str) -> None:
        self.connection.write_message(json.dumps([text]))

    async def receive(self, timeout: float = 20) -> str | None:
        while not self.pending:
            frame = await asyncio.wait_for(self.connection.read_message(), timeout)
            if frame is None or frame.startswith("c"):
                return None
            if frame.startswith("a"):
                self.pending.extend(json.loads(frame[1:]))
        return self.pending.pop(0)


async def run_to_idle(link: SockJSOverWebSocket, session_id: str, code: str) -> list[dict[str, Any]]:
    """Send code to one kernel and collect that kernel's messages up to its reply and idle status."""
    request = execute_request(code)
    link.send(framed(session_id, request))
    messages, replied, idle = [], False, False
    while not (replied and idle):
        text = await link.receive()
        assert text is not None, f"closed after {messages}"
        owner, message = unframed(text)
        assert owner == session_id, text
        messages.append(message)
        replied = replied or message["msg_type"] == "execute_reply"
        idle = idle or message["content"].get("execution_state") == "idle"
    return messages


def stdout_of(messages: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")


def test_two_kernels_of_a_page_share_one_sockjs_connection(server: Service) -> None:
    first, second = open_session(server), open_session(server)

    async def page() -> tuple[str, str, str]:
        link = await SockJSOverWebSocket.open(server)
        one = await run_to_idle(link, first, "x = 'first'; print(x)")
        two = await run_to_idle(link, second, "print('second')")
        again = await run_to_idle(link, first, "print(x)")  # the same kernel, its state kept
        link.connection.close()
        return stdout_of(one), stdout_of(two), stdout_of(again)

    try:
        assert asyncio.run(asyncio.wait_for(page(), 60)) == ("first\n", "second\n", "first\n")
    finally:
        for session in (first, second):
            server.request("DELETE", f"/kernel/{session}")


def test_closing_the_sockjs_connection_ends_its_sessions(server: Service) -> None:
    session = open_session(server)

    async def page() -> None:
        link = await SockJSOverWebSocket.open(server)
        await run_to_idle(link, session, "1")
        link.connection.close()

    asyncio.run(asyncio.wait_for(page(), 60))
    deadline = time.monotonic() + 20
    while channels_status(server, session) != 404:
        assert time.monotonic() < deadline, "the session outlived its page's SockJS connection"
        time.sleep(0.1)


def test_a_bad_message_ends_only_its_own_kernel_and_unknown_kernels_are_ignored(server: Service) -> None:
    hostile, innocent = open_session(server), open_session(server)

    async def page() -> tuple[dict[str, Any], str]:
        link = await SockJSOverWebSocket.open(server)
        await run_to_idle(link, innocent, "1")
        link.send(framed(str(uuid.uuid4()), execute_request("print('nobody')")))  # no such kernel
        link.send(framed(hostile, execute_request("print('forged')", channel="iopub")))
        owner, last = unframed(await link.receive() or "")
        assert owner == hostile
        answer = stdout_of(await run_to_idle(link, innocent, "print('still here')"))
        link.connection.close()
        return last, answer

    try:
        last, answer = asyncio.run(asyncio.wait_for(page(), 60))
    finally:
        server.request("DELETE", f"/kernel/{innocent}")
    assert last["content"]["execution_state"] == "dead", last
    assert channels_status(server, hostile) == 404
    assert answer == "still here\n"


def xhr(server: Service, path: str, body: bytes = b"") -> tuple[int, str]:
    request = urllib.request.Request(f"{server.url}/sockjs/000/{path}", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status, answer.read().decode()


def test_a_page_without_websockets_computes_over_xhr_polling(server: Service) -> None:
    session = open_session(server)
    connection = uuid.uuid4().hex[:8]
    try:
        assert xhr(server, f"{connection}/xhr") == (200, "o\n")
        request = execute_request("print(6 * 7)")
        status, _body = xhr(server, f"{connection}/xhr_send", json.dumps([framed(session, request)]).encode())
        assert status == 204
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while not any(m["content"].get("execution_state") == "idle" for m in messages):
            assert time.monotonic() < deadline, messages
            _status, frame = xhr(server, f"{connection}/xhr")  # a long poll: answers once there is news
            if frame.startswith("a"):
                messages.extend(unframed(text)[1] for text in json.loads(frame[1:]))
    finally:
        server.request("DELETE", f"/kernel/{session}")
    assert stdout_of(messages) == "42\n"
    assert all(m["parent_header"]["msg_id"] == request["header"]["msg_id"] for m in messages)


def test_sockjs_answers_its_info_request(server: Service) -> None:
    with urllib.request.urlopen(f"{server.url}/sockjs/info", timeout=10) as answer:
        info = json.loads(answer.read())
    assert info["websocket"] is True


def test_the_sockjs_client_the_server_names_is_served(server: Service) -> None:
    # SockJS's iframe transports load the client from the URL the server names in its iframe page.
    status, _headers, body = server.request("GET", "/sockjs/iframe.html")
    assert status == 200, body
    client_url = next(
        line.split('src="', 1)[1].split('"', 1)[0] for line in body.splitlines() if "<script" in line and "src=" in line
    )
    assert client_url == "/static/sockjs.min.js", body
    status, headers, script = server.request("GET", client_url)
    assert status == 200, script[:200]
    assert "javascript" in headers["Content-Type"]
    assert script.startswith("/* sockjs-client v1.6.1 |"), script[:80]
