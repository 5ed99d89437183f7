"""Kernel sessions as SageMathCell's pages and clients use them: `POST /kernel`, the WebSocket channels, the
ways a session ends (its computations done, the page's DELETE or disconnect, idle and lifetime limits), the
per-page cap, and messages a page must not get through."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from http.client import HTTPMessage
from pathlib import Path
from typing import Any

import pytest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from cellserver.session_handlers import WEBSOCKET_PING_SECONDS
from conftest import RemoteService, Service, compute_server, lab_url, sage_python, serving

CLIENT = Path(__file__).resolve().parents[2] / "tests" / "clients" / "sagecell_session_client.py"
LIFETIME_SECONDS = 6
FACTORIAL_2020_START = "38609695182672487237"  # Sage's factorial(2020) begins so (5,799 digits)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A Python-kernel laptop server with room for four kernels and short session limits."""
    directory = tmp_path_factory.mktemp("sessions")
    settings = directory / "cellserver.toml"
    settings.write_text(f"max_kernels = 4\npreforked = 2\nsession_lifetime_seconds = {LIFETIME_SECONDS}\n")
    running = compute_server(directory, "--config", str(settings))
    running.start()
    yield running
    running.stop()


def new_kernel(server: Service, **fields: str) -> tuple[int, HTTPMessage, dict[str, Any]]:
    status, headers, body = server.request(
        "POST", "/kernel", {"accepted_tos": "true", **fields}, headers={"Accept": "application/json"}
    )
    return status, headers, json.loads(body) if body else {}


def execute_request(code: str, channel: str = "shell") -> dict[str, Any]:
    return {
        "channel": channel,
        "header": {"msg_type": "execute_request", "msg_id": str(uuid.uuid4()), "username": "", "session": "s"},
        "parent_header": {}, "metadata": {},
        "content": {"code": code, "silent": False, "user_expressions": {}, "allow_stdin": False},
    }  # fmt: skip


async def connect(server: Service, kernel_id: str) -> WebSocketClientConnection:
    return await websocket_connect(f"ws://127.0.0.1:{server.port}/kernel/{kernel_id}/channels")


async def until_closed(connection: WebSocketClientConnection, timeout: float = 20) -> list[dict[str, Any]]:
    """Every message until the server closes the connection."""
    messages = []
    while (text := await asyncio.wait_for(connection.read_message(), timeout)) is not None:
        messages.append(json.loads(text))
    return messages


async def run_to_idle(connection: WebSocketClientConnection, code: str) -> list[dict[str, Any]]:
    """Send code and collect the messages up to its reply and the kernel's idle status."""
    request = execute_request(code)
    connection.write_message(json.dumps(request))
    return await read_to_idle(connection, request)


async def read_to_idle(connection: WebSocketClientConnection, request: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages answering request, up to its reply (an execute or an interact update's) and the
    kernel's idle status: the reply (shell) may come before the output (iopub), the idle status never does."""
    messages, replied, idle = [], False, False
    while not (replied and idle):
        text = await asyncio.wait_for(connection.read_message(), 20)
        assert text is not None, f"closed after {messages}"
        message = json.loads(text)
        messages.append(message)
        assert message["parent_header"].get("msg_id") == request["header"]["msg_id"], message
        replied = replied or message["msg_type"].endswith("_reply")
        idle = idle or message["content"].get("execution_state") == "idle"
    return messages


def stdout_of(messages: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")


def channels_status(server: Service, kernel_id: str) -> int:
    """What a new connection to the kernel's channels gets: 404 once the session is gone; while it lives, not 404
    (urllib sends `Connection: close`, so the server refuses the upgrade itself with 400 instead of a 101)."""
    status, _headers, _body = server.request(
        "GET", f"/kernel/{kernel_id}/channels",
        headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
    )  # fmt: skip
    return status


def wait_for_status(server: Service, kernel_id: str, wanted: int, patience: float) -> float:
    """Seconds until the kernel's channels answer wanted; fails after patience."""
    started = time.monotonic()
    while (status := channels_status(server, kernel_id)) != wanted:
        assert time.monotonic() - started < patience, f"still {status} after {patience} s"
        time.sleep(0.2)
    return time.monotonic() - started


def test_a_kernel_is_a_ws_url_and_an_id_as_upstream_answers(server: Service) -> None:
    status, headers, answer = new_kernel(server, timeout="30")
    assert status == 200, answer
    assert answer["ws_url"] == f"ws://127.0.0.1:{server.port}/"
    assert uuid.UUID(answer["id"]).version == 4 and str(uuid.UUID(answer["id"])) == answer["id"]
    assert headers["Jupyter-Kernel-ID"] == answer["id"]
    server.request("DELETE", f"/kernel/{answer['id']}")


def test_a_page_computes_in_its_kernel_and_keeps_its_state(server: Service) -> None:
    _status, _headers, answer = new_kernel(server, timeout="30")

    async def session() -> tuple[str, str]:
        connection = await connect(server, answer["id"])
        first = await run_to_idle(connection, "x = 6 * 7")
        second = await run_to_idle(connection, "print(x)")
        connection.close()
        return stdout_of(first), stdout_of(second)

    assert asyncio.run(session()) == ("", "42\n")


def test_with_no_timeout_the_session_ends_once_its_computation_is_done(server: Service) -> None:
    _status, _headers, answer = new_kernel(server)

    async def session() -> tuple[list[dict[str, Any]], float]:
        connection = await connect(server, answer["id"])
        connection.write_message(json.dumps(execute_request("print(1)")))
        sent = time.monotonic()
        return await until_closed(connection), time.monotonic() - sent

    messages, took = asyncio.run(session())
    assert took < LIFETIME_SECONDS / 2, took  # ended by its computation's end, not by the lifetime limit
    assert stdout_of(messages) == "1\n"
    # upstream's last word to the page, with the reason
    assert messages[-1]["content"] == {"execution_state": "dead", "reason": "its computations are done"}
    assert channels_status(server, answer["id"]) == 404


@pytest.mark.parametrize("how", ["DELETE", "POST method=DELETE"])
def test_a_page_ends_its_session(server: Service, how: str) -> None:
    _status, _headers, answer = new_kernel(server, timeout="30")
    assert channels_status(server, answer["id"]) != 404
    if how == "DELETE":
        status, _headers, _body = server.request("DELETE", f"/kernel/{answer['id']}")
    else:
        status, _headers, _body = server.request("POST", f"/kernel/{answer['id']}", {"method": "DELETE"})
    assert status == 200
    assert channels_status(server, answer["id"]) == 404


def test_closing_the_connection_ends_the_session(server: Service) -> None:
    _status, _headers, answer = new_kernel(server, timeout="30")

    async def open_and_close() -> None:
        connection = await connect(server, answer["id"])
        await run_to_idle(connection, "1")
        connection.close()

    asyncio.run(open_and_close())
    wait_for_status(server, answer["id"], 404, patience=5)


def test_an_idle_session_ends_after_the_timeout_the_page_asked_for(server: Service) -> None:
    _status, _headers, answer = new_kernel(server, timeout="1")
    took = wait_for_status(server, answer["id"], 404, patience=5)
    assert took >= 0.5, took  # not at once: the session lived until its idle timeout


def test_code_in_the_kernel_sets_its_sessions_idle_timeout(server: Service) -> None:
    # How an interact keeps its kernel while the page's controls may still change: a kernel_timeout message.
    _status, _headers, answer = new_kernel(server, timeout="600")

    async def shorten() -> list[dict[str, Any]]:
        connection = await connect(server, answer["id"])
        await run_to_idle(connection, "sys._sage_.reset_kernel_timeout(1)")
        return await until_closed(connection, timeout=LIFETIME_SECONDS / 2)  # open: only the timeout ends it

    assert asyncio.run(shorten())[-1]["content"] == {"execution_state": "dead", "reason": "idle for 1 s"}


def test_a_kernel_timeout_that_is_not_a_number_is_ignored(server: Service) -> None:
    # The kernel runs the page's code: a kernel_timeout it sends is as untrusted as the page.
    _status, _headers, answer = new_kernel(server, timeout="600")
    sent = "; ".join(f"sys._sage_._send('kernel_timeout', {{'timeout': {value}}})"
                     for value in ("'soon'", "{}", "-1", "True", "float('nan')"))  # fmt: skip

    async def still_serving() -> str:
        connection = await connect(server, answer["id"])
        await run_to_idle(connection, sent)
        output = stdout_of(await run_to_idle(connection, "print('still here')"))
        connection.close()
        return output

    assert asyncio.run(still_serving()) == "still here\n"


@pytest.fixture(scope="module")
def long_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A server with the default session limits (the module's own server ends sessions within seconds)."""
    yield from serving(tmp_path_factory.mktemp("long-lived"), "--max-kernels", "2", "--preforked", "1")


def test_an_idle_session_is_pinged_so_proxies_keep_its_connection(long_lived: Service) -> None:
    # nginx in front of a cell closes a connection that carries nothing for 90 s: a waiting interact's would go.
    _status, _headers, answer = new_kernel(long_lived, timeout="600")

    async def wait_for_ping() -> float:
        connection = await connect(long_lived, answer["id"])
        pinged = asyncio.Event()
        connection.on_ping = lambda _data: pinged.set()  # type: ignore[method-assign]
        started = time.monotonic()
        await asyncio.wait_for(pinged.wait(), WEBSOCKET_PING_SECONDS + 10)
        connection.close()
        return time.monotonic() - started

    assert asyncio.run(wait_for_ping()) <= WEBSOCKET_PING_SECONDS + 10


def test_no_session_outlives_the_lifetime_limit(server: Service) -> None:
    # inf asks for the longest idle timeout; the server's lifetime limit ends the session anyway.
    _status, _headers, answer = new_kernel(server, timeout="inf")
    took = wait_for_status(server, answer["id"], 404, patience=2 * LIFETIME_SECONDS)
    assert LIFETIME_SECONDS / 2 < took < LIFETIME_SECONDS * 1.5, took


def test_a_page_over_its_cap_gets_429_with_upstreams_error(server: Service) -> None:
    page = str(uuid.uuid4())
    kept = [new_kernel(server, CellSessionID=page, timeout="30") for _ in range(2)]
    assert [status for status, _h, _a in kept] == [200, 200]
    status, _headers, answer = new_kernel(server, CellSessionID=page, timeout="30")
    assert status == 429 and answer["error"] == "too_many_kernels_for_cell_session", answer
    other_status, _headers, other = new_kernel(server, CellSessionID=str(uuid.uuid4()), timeout="30")
    assert other_status == 200, other  # another page is not held back
    for _status, _h, kernel in [*kept, (other_status, {}, other)]:
        server.request("DELETE", f"/kernel/{kernel['id']}")


@pytest.mark.parametrize("timeout", ["-1", "soon", "nan"])
def test_a_bad_timeout_is_refused(server: Service, timeout: str) -> None:
    status, _headers, answer = new_kernel(server, timeout=timeout)
    assert status == 400 and "timeout" in answer["error"], answer


def post_json(server: Service, body: bytes) -> tuple[int, dict[str, Any]]:
    status, _headers, answer = server.request(
        "POST", "/kernel", data=body, headers={"Content-Type": "application/json", "Accept": "application/json"}
    )
    return status, json.loads(answer) if answer else {}


def test_a_kernel_may_be_asked_for_with_a_json_body(server: Service) -> None:
    status, answer = post_json(server, json.dumps({"accepted_tos": True, "timeout": 30}).encode())
    assert status == 200 and uuid.UUID(answer["id"]), answer
    assert channels_status(server, answer["id"]) != 404  # the timeout came through: it waits for the page
    server.request("DELETE", f"/kernel/{answer['id']}")
    assert post_json(server, json.dumps({"timeout": "soon"}).encode())[0] == 400


@pytest.mark.parametrize("body", [b"{", b"[1]", b'{"timeout": [30]}'], ids=["broken", "array", "nested"])
def test_a_json_body_that_is_not_an_object_of_fields_is_refused(server: Service, body: bytes) -> None:
    status, answer = post_json(server, body)
    assert status == 400 and "JSON object" in answer["error"], answer


def test_unknown_kernels_are_404(server: Service) -> None:
    assert channels_status(server, str(uuid.uuid4())) == 404
    assert server.request("GET", "/kernel/not-a-kernel/channels")[0] == 404


def test_cross_origin_pages_get_their_origin_back_with_credentials(server: Service) -> None:
    origin = "http://127.0.0.1:1"
    status, headers, body = server.request(
        "POST", "/kernel", {"accepted_tos": "true", "timeout": "30"}, headers={"Origin": origin}
    )
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == origin
    assert headers["Access-Control-Allow-Credentials"] == "true"
    server.request("DELETE", f"/kernel/{json.loads(body)['id']}")


# --- messages a page must not get through -----------------------------------------------------------


async def refused(server: Service, payload: str | bytes) -> tuple[int | None, str | None]:
    """The close code and reason the server answers payload with, on a fresh session."""
    _status, _headers, answer = new_kernel(server, timeout="30")
    connection = await connect(server, answer["id"])
    connection.write_message(payload, binary=isinstance(payload, bytes))
    await until_closed(connection)
    assert channels_status(server, answer["id"]) == 404  # the session ended with it
    return connection.close_code, connection.close_reason


@pytest.mark.parametrize(
    "payload, reason",
    [
        (json.dumps(execute_request("print(1)", channel="control")), "channel 'control'"),
        (json.dumps({**execute_request("1"), "header": {"msg_type": "shutdown_request"}}), "shutdown_request"),
        ("not json", "not JSON"),
    ],
)
def test_messages_not_for_the_shell_close_the_connection(server: Service, payload: str, reason: str) -> None:
    code, why = asyncio.run(refused(server, payload))
    assert code == 1008 and why is not None and reason in why, (code, why)


def test_a_huge_message_closes_the_connection(server: Service) -> None:
    code, _why = asyncio.run(refused(server, json.dumps(execute_request("#" * (2 << 20)))))
    # 1009, message too big; or no code at all when the server's close overtook the client still writing.
    assert code in (1009, None), code


def test_a_flood_of_computations_closes_the_connection(server: Service) -> None:
    async def flood() -> tuple[int | None, str | None]:
        _status, _headers, answer = new_kernel(server, timeout="30")
        connection = await connect(server, answer["id"])
        for _ in range(40):
            connection.write_message(json.dumps(execute_request("import time; time.sleep(1)")))
        await until_closed(connection)
        return connection.close_code, connection.close_reason

    code, why = asyncio.run(flood())
    assert code == 1008 and "computations waiting" in str(why), (code, why)


def test_one_session_cannot_reach_another(server: Service) -> None:
    async def two_sessions() -> tuple[str, list[dict[str, Any]]]:
        _s, _h, mine = new_kernel(server, timeout="30")
        _s, _h, theirs = new_kernel(server, timeout="30")
        their_connection = await connect(server, theirs["id"])
        await run_to_idle(their_connection, "secret = 'theirs'")
        my_connection = await connect(server, mine["id"])
        # Naming the other kernel in the message changes nothing: the connection decides the kernel.
        request = execute_request("print(globals().get('secret'))")
        request["header"]["session"] = theirs["id"]
        my_connection.write_message(json.dumps(request))
        mine_seen = await read_to_idle(my_connection, request)
        theirs_after = await run_to_idle(their_connection, "print(secret)")
        my_connection.close()
        their_connection.close()
        return stdout_of(mine_seen) + stdout_of(theirs_after), theirs_after

    both, theirs_after = asyncio.run(two_sessions())
    assert both == "None\ntheirs\n"
    assert all(m["parent_header"]["msg_id"] for m in theirs_after)  # nothing of mine reached them


def test_the_server_keeps_serving_after_hostile_pages(server: Service) -> None:
    status, _headers, body = server.request("POST", "/service", {"code": "print(2 + 2)"})
    assert status == 200 and json.loads(body)["stdout"] == "4\n"


# --- SageMathCell's own client -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service | RemoteService]:
    if lab_url():  # `make embed-lab`: upstream's client against the cluster
        yield RemoteService(lab_url() or "")
        return
    running = compute_server(tmp_path_factory.mktemp("sage-sessions"), "--kernel", "sage", "--max-kernels", "2",
                             python=sage_python())  # fmt: skip
    running.start()
    yield running
    running.stop()


def test_upstreams_client_computes_factorial_2020_with_sage(sage: Service) -> None:
    insecure = ["--insecure"] if sage.url.startswith("https:") else []  # the lab's self-signed certificate
    run = subprocess.run([sys.executable, str(CLIENT), sage.url, *insecure, "--timeout", "120"],
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert run.returncode == 0, run.stderr
    messages = json.loads(run.stdout)
    results = [m for m in messages["iopub"] if m["msg_type"] == "execute_result"]
    assert results and results[0]["content"]["data"]["text/plain"].startswith(FACTORIAL_2020_START), results
    reply = next(m for m in messages["shell"] if m["msg_type"] == "execute_reply")
    assert reply["content"]["status"] == "ok"
    assert reply["content"]["user_expressions"]["_sagecell_files"]["status"] == "ok"
    assert reply["content"]["payload"] == [{"new_files": []}]


def test_files_a_computation_writes_are_announced_as_upstream_does(sage: Service) -> None:
    code = "open('plot.txt', 'w').write('x'); print(len(sys._sage_.sent_files))"
    run = subprocess.run([sys.executable, str(CLIENT), sage.url, code, "--timeout", "120"],
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert run.returncode == 0, run.stderr
    reply = next(m for m in json.loads(run.stdout)["shell"] if m["msg_type"] == "execute_reply")
    assert reply["content"]["payload"] == [{"new_files": ["plot.txt"]}]
