"""Binds a Unix socket at PATH and holds it for SECONDS: a live socket the tmp cleaning must leave alone.

Usage: hold_unix_socket.py PATH SECONDS. Standard library only: it runs on the lab's VMs with their python3.
"""

from __future__ import annotations

import socket
import sys
import time


def main(path: str, seconds: str) -> None:
    with socket.socket(socket.AF_UNIX) as held:
        held.bind(path)
        time.sleep(float(seconds))


if __name__ == "__main__":
    main(*sys.argv[1:3])
