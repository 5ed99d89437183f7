"""`@interact` in a kernel session, as SageMathCell's pages drive it: the controls announced, the function
run with the defaults, a change sent as `sagenb.interact.update_interact` runs it again in the same kernel,
and its output is tagged with the interact's id and replaces the last."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from test_sessions import connect, new_kernel, read_to_idle, run_to_idle
from tornado.websocket import WebSocketClientConnection

from conftest import Service, sage_python, serving, serving_with_settings

INTERACT = "application/sage-interact"
CODE = """
@interact
def shown(n=(1, 10, 1), word="hi", flag=True, choice=["a", "b", "c"], total=5):
    print("n", n, word, flag, choice, total)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from serving(tmp_path_factory.mktemp("interacts"), "--max-kernels", "3", "--preforked", "1")


def update_request(interact_id: str, values: dict[str, Any]) -> dict[str, Any]:
    return {
        "channel": "shell",
        "header": {"msg_type": "sagenb.interact.update_interact", "msg_id": str(uuid.uuid4()), "session": "s"},
        "parent_header": {}, "metadata": {},
        "content": {"interact_id": interact_id, "values": values, "update_last": False},
    }  # fmt: skip


async def update(connection: WebSocketClientConnection, interact_id: str, values: dict[str, Any]) -> list[dict]:
    request = update_request(interact_id, values)
    connection.write_message(json.dumps(request))
    return await read_to_idle(connection, request)


def announced(messages: list[dict[str, Any]]) -> dict[str, Any]:
    found = [m["content"]["data"][INTERACT] for m in messages if INTERACT in m["content"].get("data", {})]
    assert len(found) == 1, messages
    return found[0]


def interact_output(messages: list[dict[str, Any]], interact_id: str) -> str:
    """The interact's text since its last clear, as the page shows it in the interact's output area."""
    text = ""
    for message in messages:
        if message["metadata"].get("interact_id") != interact_id:
            continue
        if "application/sage-clear" in message["content"].get("data", {}):
            text = ""
        text += message["content"].get("text", "")
    return text


def reply_of(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return next(m for m in messages if m["msg_type"].endswith("_reply"))["content"]


async def open_interact(server: Service, code: str = CODE) -> tuple[WebSocketClientConnection, list[dict]]:
    """A session running code, as an upstream page's unlinked cell asks for it (timeout 0: the interact's own
    kernel_timeout keeps it), and the messages of that first run."""
    status, _headers, answer = new_kernel(server, timeout="0")
    assert status == 200, answer
    connection = await connect(server, answer["id"])
    return connection, await run_to_idle(connection, code)


def test_an_interact_announces_its_controls_and_runs_with_the_defaults(server: Service) -> None:
    async def session() -> list[dict]:
        connection, messages = await open_interact(server)
        connection.close()
        return messages

    messages = asyncio.run(session())
    announcement = announced(messages)
    controls = announcement["controls"]
    assert controls["n"] == {
        "control_type": "slider", "subtype": "continuous", "display_value": True, "default": 1,
        "range": [1, 10], "step": 1, "raw": True, "label": "n", "update": True,
    }  # fmt: skip
    assert (controls["word"]["control_type"], controls["word"]["default"]) == ("input_box", "hi")
    assert (controls["flag"]["control_type"], controls["flag"]["default"]) == ("checkbox", True)
    assert controls["choice"]["value_labels"] == ["a", "b", "c"]
    assert (controls["total"]["default"], controls["total"]["evaluate"]) == ("5", True)
    assert interact_output(messages, announcement["new_interact_id"]) == "n 1 hi True a 5\n"


def test_a_change_recomputes_in_the_same_kernel(server: Service) -> None:
    async def session() -> tuple[str, list[dict], list[dict]]:
        connection, messages = await open_interact(server)
        interact_id = announced(messages)["new_interact_id"]
        changed = await update(connection, interact_id, {"n": 7, "choice": 2, "total": "2 + 3 * 4"})
        # The session outlived the first run's idle status (timeout 0): the interact asked the server to keep it.
        later = await update(connection, interact_id, {"n": 99, "flag": False})
        connection.close()
        return interact_id, changed, later

    interact_id, changed, later = asyncio.run(session())
    assert reply_of(changed)["status"] == "ok", changed
    assert interact_output(changed, interact_id) == "n 7 hi True c 14\n"
    assert interact_output(later, interact_id) == "n 10 hi False c 14\n"  # the slider's end bounds it


def test_bad_updates_are_refused_and_the_kernel_keeps_serving(server: Service) -> None:
    refusals = (
        ("not-an-interact", {"n": 2}, "no interact"),
        (None, {"nothere": 2}, "no control"),
        (None, {"flag": "yes"}, "true or false"),
        (None, {"n": "many"}, "not a number"),
        (None, {"n": float("inf")}, "number"),  # JSON has no infinity: it may arrive as a string
    )

    async def session() -> tuple[str, list[dict], list[dict], list[dict]]:
        connection, messages = await open_interact(server)
        interact_id = announced(messages)["new_interact_id"]
        replies = [reply_of(await update(connection, target or interact_id, values)) for target, values, _ in refusals]
        failing = await update(connection, interact_id, {"total": "1/0"})
        good = await update(connection, interact_id, {"n": 3})
        connection.close()
        return interact_id, replies, failing, good

    interact_id, replies, failing, good = asyncio.run(session())
    for (_target, values, expected), reply in zip(refusals, replies, strict=True):
        assert reply["status"] == "error" and expected in reply["evalue"], (values, reply)
    assert reply_of(failing)["status"] == "error"
    assert interact_output(good, interact_id) == "n 3 hi True a 5\n"


def test_an_error_in_the_function_is_shown_in_the_interact(server: Service) -> None:
    async def session() -> tuple[str, list[dict], list[dict]]:
        connection, messages = await open_interact(server, "@interact\ndef broken(k=(0, 4, 1)):\n    print(1 / k)\n")
        interact_id = announced(messages)["new_interact_id"]
        fixed = await update(connection, interact_id, {"k": 4})
        connection.close()
        return interact_id, messages, fixed

    interact_id, messages, fixed = asyncio.run(session())
    errors = [m for m in messages if m["msg_type"] == "error"]
    assert errors and errors[0]["metadata"]["interact_id"] == interact_id, messages
    assert errors[0]["content"]["ename"] == "ZeroDivisionError"
    assert interact_output(fixed, interact_id) == "0.25\n"


@pytest.fixture(scope="module")
def sage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    settings = 'kernel = "sage"\nmax_kernels = 2\npreforked = 1\n'
    yield from serving_with_settings(tmp_path_factory.mktemp("sage-interacts"), settings, python=sage_python())


def test_sage_interacts_take_sage_controls_and_sage_input(sage: Service) -> None:
    code = (
        "@interact\n"
        "def f(n=slider(1, 20, 1, default=5, label='degree'), expr=input_box(x^2, label='f(x)')):\n"
        "    print(n, expr.diff(x, 2), 2^n)\n"
    )

    async def session() -> tuple[dict, list[dict], list[dict]]:
        connection, messages = await open_interact(sage, code)
        announcement = announced(messages)
        changed = await update(connection, announcement["new_interact_id"], {"n": 10, "expr": "x^4"})
        connection.close()
        return announcement, messages, changed

    announcement, messages, changed = asyncio.run(session())
    interact_id = announcement["new_interact_id"]
    assert announcement["controls"]["n"]["label"] == "degree"
    assert interact_output(messages, interact_id) == "5 2 32\n"
    assert interact_output(changed, interact_id) == "10 12*x^2 1024\n"
