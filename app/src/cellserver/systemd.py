"""sd_notify without a dependency: READY=1 at start and WATCHDOG=1 from the event loop, so a hung loop is
noticed by systemd (WatchdogSec=) and the service restarted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket


def notify(message: str) -> bool:
    """Send one sd_notify message; False when not started by systemd with Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def watchdog_interval() -> float | None:
    """Half the interval systemd expects pings at, or None when no watchdog is armed for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


async def keep_watchdog_fed(interval: float) -> None:
    # The ping comes from the event loop itself: if a handler blocks the loop, the pings stop.
    while True:
        with contextlib.suppress(OSError):
            notify("WATCHDOG=1")
        await asyncio.sleep(interval)
