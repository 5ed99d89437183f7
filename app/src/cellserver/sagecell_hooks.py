"""`sys._sage_` in every kernel: the helpers SageMathCell's pages and clients call inside the kernel.

Upstream's client asks for `sys._sage_.new_files()` as a user expression of each computation: the files the
computation wrote in its working directory come back as a `new_files` payload of the execute reply, and the
page fetches them from `/kernel/<id>/files/<path>`. `reset_kernel_timeout` is how code in the kernel (an
interact waiting for its controls) asks the server to keep the session longer.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from cellserver import interacts


class SageCellHooks:
    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel
        self.sent_files: dict[str, float] = {}

    def _send(self, msg_type: str, content: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        kernel = self._kernel
        kernel.session.send(kernel.iopub_socket, msg_type, content=content, parent=kernel.get_parent("shell"),
                            metadata=metadata)  # fmt: skip

    def new_files(self, root: str = "./") -> str:
        """Announce the files written or changed under root since the last call (a payload of the reply)."""
        self._kernel.shell.payload_manager.write_payload({"new_files": self.changed_files(root)})
        return ""

    def changed_files(self, root: str) -> list[str]:
        """Files under root written or changed since they were last counted, now counted."""
        found = []
        for top, directories, files in os.walk(root):
            directories.sort()
            for name in sorted(files):
                path = os.path.relpath(os.path.join(top, name), root)
                try:
                    changed = os.stat(os.path.join(top, name)).st_mtime
                except OSError:
                    continue
                if self.sent_files.get(path, -1.0) >= changed:
                    continue
                self.sent_files[path] = changed
                found.append(path)
        return found

    def reset_kernel_timeout(self, timeout: float) -> None:
        """Ask the server for another idle timeout (seconds; inf: as long as the server allows). Infinity is
        not JSON: it travels as "inf", as a page's own `timeout` field does."""
        seconds = float(timeout)
        self._send("kernel_timeout", {"timeout": "inf" if math.isinf(seconds) else seconds})

    def display_message(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self._send("display_data", {"data": data, "source": "sagecell"}, metadata)

    def stream_message(self, stream: str, data: str, metadata: dict[str, Any] | None = None) -> None:
        self._send("stream", {"name": stream, "text": data}, metadata)


def install(kernel: Any) -> None:
    """Give the kernel's user code `sys._sage_`, and `sys` itself, as Sage's namespace has it (upstream's
    clients ask for `sys._sage_.new_files()` in Python cells too). What the working directory holds
    already (a worker's dotfiles) is not the computation's: it counts as sent."""
    hooks = SageCellHooks(kernel)
    hooks.changed_files(".")
    sys._sage_ = hooks  # type: ignore[attr-defined]
    kernel.shell.user_ns.setdefault("sys", sys)
    interacts.install(kernel, hooks)
