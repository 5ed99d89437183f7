"""The kernel provider: a process that imports the kernel's heavy modules once, then forks one kernel per request.

The cell server starts it and talks to it over its stdin/stdout, one JSON object per line:
    {"connection_file": PATH, "cpu_seconds": N, "memory_bytes": N}  ->  {"pid": PID} or {"error": TEXT}
Each kernel is forked from this already-initialised interpreter (no import cost per kernel), becomes the
leader of its own process group (so the server can kill it and everything it started at once), gets its
resource limits, and serves exactly one connection file.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import signal
import sys
from typing import Any

# Imported once here, inherited by every fork: this is the point of the provider.
from ipykernel.kernelapp import IPKernelApp

# Modules a kernel would otherwise import while it initialises, after the fork, every time (measured:
# the debugger alone took 80 of the 120 ms a forked kernel spent starting).
WARM_MODULES = (
    "ipykernel.ipkernel", "ipykernel.debugger", "ipykernel.zmqshell", "ipykernel.comm",
    "IPython.core.completer", "IPython.core.completerlib", "IPython.core.debugger", "IPython.core.oinspect",
    "IPython.extensions.storemagic", "IPython.utils.wildcard", "faulthandler", "pdb", "tornado.platform.asyncio",
)  # fmt: skip
for _module in WARM_MODULES:
    importlib.import_module(_module)

PR_SET_PDEATHSIG = 1  # linux/prctl.h

KERNEL_ARGUMENTS = [
    # No history database in the worker's home, no banner, no extensions: a one-shot computation.
    "--HistoryManager.enabled=False",
    "--IPKernelApp.quiet=True",
    "--InteractiveShellApp.extensions=[]",
]


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, so nothing outlives the server.

    parent is the pid the caller knew before it was started: if that parent is already gone (we were
    re-parented before the request took effect), exit now instead of living on as an orphan.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


def reap_children(_signum: int, _frame: Any) -> None:
    """Collect exited kernels so none lingers as a zombie."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def apply_limits(cpu_seconds: int, memory_bytes: int) -> None:
    if cpu_seconds > 0:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_kernel(connection_file: str) -> None:
    """In the forked child: detach from the provider's pipes and serve the kernel until it is killed."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    app = IPKernelApp.instance()
    app.initialize(["-f", connection_file, *KERNEL_ARGUMENTS])
    app.start()


def fork_kernel(request: dict[str, Any]) -> int:
    connection_file = str(request["connection_file"])
    cpu_seconds = int(request.get("cpu_seconds", 0))
    memory_bytes = int(request.get("memory_bytes", 0))
    provider = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            die_with_parent(provider)
            apply_limits(cpu_seconds, memory_bytes)
            run_kernel(connection_file)
        finally:
            os._exit(0)
    return pid


def serve(server_pid: int, stdin: Any = sys.stdin, stdout: Any = sys.stdout) -> None:
    die_with_parent(server_pid)
    signal.signal(signal.SIGCHLD, reap_children)
    for line in stdin:
        try:
            answer: dict[str, Any] = {"pid": fork_kernel(json.loads(line))}
        except (ValueError, KeyError, OSError) as error:
            answer = {"error": str(error)}
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()


if __name__ == "__main__":
    # The server passes its own pid, so a provider whose server died while it started exits at once.
    serve(int(sys.argv[1]))
