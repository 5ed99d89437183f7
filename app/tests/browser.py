"""Drive Debian's headless Chromium through the DevTools protocol (a websocket, spoken with tornado)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

from tornado.ioloop import IOLoop
from tornado.websocket import websocket_connect

DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://\S+)")


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, binary: str, *arguments: str) -> None:
        """arguments: more of Chromium's flags (the lab's self-signed load balancer needs
        --ignore-certificate-errors)."""
        self.profile = tempfile.mkdtemp(prefix="cellfleet-chromium-")
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.profile}",
             *arguments, "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        browser_url = self._devtools_url()
        port = browser_url.split(":")[2].split("/")[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            page = next(target for target in json.load(answer) if target["type"] == "page")
        self.loop = IOLoop()
        self.socket = self.loop.run_sync(lambda: websocket_connect(page["webSocketDebuggerUrl"]), timeout=10)
        self.next_id = 0

    def _devtools_url(self) -> str:
        assert self.process.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                break
            found = DEVTOOLS_LINE.search(line)
            if found:
                return found.group(1)
        raise RuntimeError("chromium did not open its DevTools port")

    def command(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        request_id = self.next_id

        async def exchange() -> dict[str, Any]:
            await self.socket.write_message(json.dumps({"id": request_id, "method": method, "params": params}))
            while True:
                message = await self.socket.read_message()
                if message is None:
                    raise RuntimeError("chromium closed the DevTools connection")
                answer = json.loads(message)
                if answer.get("id") == request_id:
                    return answer

        answer = self.loop.run_sync(exchange, timeout=30)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.command("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, ready: str = "window.sagecell && sagecell.cells.length > 0") -> None:
        """Go to url and wait until the page has loaded and the ready expression holds (the cell page's cell)."""
        self.command("Page.navigate", url=url)
        self.wait_for(f"document.readyState === 'complete' && location.href !== 'about:blank' && ({ready})")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"still false after {timeout} s: {expression}")

    def close(self) -> None:
        self.socket.close()
        self.loop.close()
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
