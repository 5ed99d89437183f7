"""The compute server's settings: built-in defaults, then one TOML file, then command-line flags.
Every value is checked at start; a bad one stops the start with one line that names it."""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # EL9's Python 3.9
    import tomli as tomllib


class ConfigError(Exception):
    """A setting that cannot be used; the message is the one line the operator sees."""


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "127.0.0.1"
    port: int = 8888
    max_kernels: int = 8
    preforked: int = 2
    timeout: float = 30.0
    idle_seconds: float = 900.0
    # Seconds a kernel may take from the request for it to its first answer; kernels starting at once share
    # the CPU, so a slow machine needs more.
    kernel_start_timeout: float = 30.0
    cpu_seconds: int = 30
    # Address space per kernel, MiB; 0: the kernel's own need (KERNEL_MEMORY_MB).
    memory_mb: int = 0
    syslog_socket: str = "/dev/log"
    # /health answers from a computation at most this many seconds old (load balancers probe every second).
    health_max_age: float = 5.0
    # The root kernel provider's socket (pooled workers); empty: kernels run as the current user.
    provider_socket: str = ""
    # Kernel of a provider this server spawns: python3, or sage (needs passagemath).
    kernel: str = "python3"
    # The permalink service (http://host:port); empty: permalinks are kept in this process (permalink_db).
    permalink_url: str = ""
    # SQLite file for permalinks kept in this process; empty: in memory, lost at exit.
    permalink_db: str = ""
    # Pages (scheme://host[:port], space-separated) whose scripts may call this server with the user's
    # credentials; empty: every page, as upstream's public server allows.
    allowed_origins: str = ""
    # HTML file of terms of service; when set, computations need accepted_tos=true (else 403).
    tos_file: str = ""
    # Kernel sessions (POST /kernel): the longest idle timeout a page may ask for, the longest a session
    # lives, and how many live sessions one page (its CellSessionID, else its address) may hold.
    session_idle_seconds: float = 900.0
    session_lifetime_seconds: float = 1800.0
    sessions_per_client: int = 2
    # Seconds a drain (SIGUSR1, before a rolling update or a removal) lets open sessions end by themselves
    # before it ends them, telling their pages why.
    session_drain_seconds: float = 60.0

    def origins(self) -> tuple[str, ...]:
        return tuple(self.allowed_origins.split())

    def kernel_memory_mb(self) -> int:
        return self.memory_mb or KERNEL_MEMORY_MB[self.kernel]


# Address space a kernel may map, MiB. Address space is not memory: a Sage kernel maps 2.2-2.4 GiB
# (importing its libraries alone 1.7 GiB) while a few hundred MiB of it are resident, and threads fail to
# start below that. Resident memory is what a per-kernel cgroup limits; this only stops runaway mappings.
KERNEL_MEMORY_MB = {"python3": 2048, "sage": 8192}


# name -> (lowest, highest) for the numbers; checked after the types.
RANGES: dict[str, tuple[float, float]] = {
    "port": (1, 65535),
    "max_kernels": (1, 1000),
    "preforked": (0, 1000),
    "timeout": (0.1, 3600),
    "idle_seconds": (1, 86400),
    "kernel_start_timeout": (1, 600),
    "cpu_seconds": (1, 86400),
    "memory_mb": (0, 1 << 20),
    "health_max_age": (0, 300),
    "session_idle_seconds": (1, 86400),
    "session_lifetime_seconds": (1, 7 * 86400),
    "sessions_per_client": (1, 1000),
    "session_drain_seconds": (0, 3600),
}


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


ORIGIN = re.compile(r"^https?://[^/\s]+$")

TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


def check_value(name: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or isinstance(value, bool):
        raise ConfigError(f"{name} must be {TYPE_NAMES[expected]}, got {value!r}")
    if name in RANGES:
        low, high = RANGES[name]
        if not low <= value <= high:
            raise ConfigError(f"{name} must be from {number(low)} to {number(high)}, got {value!r}")
    return value


def apply(config: ServerConfig, values: dict[str, Any], source: str) -> ServerConfig:
    known = {field.name: field for field in fields(ServerConfig)}
    checked = {}
    for name, value in values.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown setting {name!r}{hint}")
        expected = {"int": int, "float": float, "str": str}[str(known[name].type)]
        try:
            checked[name] = check_value(name, value, expected)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
    if checked.get("kernel", "python3") not in ("python3", "sage"):
        raise ConfigError(f"{source}: kernel must be python3 or sage, got {checked['kernel']!r}")
    for origin in str(checked.get("allowed_origins", "")).split():
        if not ORIGIN.match(origin):
            raise ConfigError(f"{source}: allowed_origins: {origin!r} is not an origin like https://example.org")
    tos = str(checked.get("tos_file", ""))
    if tos and not Path(tos).is_file():
        raise ConfigError(f"{source}: tos_file {tos!r} is not a readable file")
    url = str(checked.get("permalink_url", ""))
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: permalink_url must start with http:// or https://, got {url!r}")
    result = replace(config, **checked)
    if 0 < result.memory_mb < 64:
        raise ConfigError(
            f"{source}: memory_mb must be 0 (the kernel's own need) or at least 64, got {result.memory_mb}"
        )
    if result.preforked > result.max_kernels:
        raise ConfigError(
            f"{source}: preforked ({result.preforked}) must not exceed max_kernels ({result.max_kernels})"
        )
    return result


def load(path: Path | None, overrides: dict[str, Any]) -> ServerConfig:
    config = ServerConfig()
    if path is not None:
        try:
            values = tomllib.loads(path.read_text())
        except OSError as error:
            raise ConfigError(f"{path}: cannot read it ({error.strerror})") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML ({error})") from None
        config = apply(config, values, str(path))
    return apply(config, {k: v for k, v in overrides.items() if v is not None}, "command line")


def check_kernel_installed(config: ServerConfig) -> None:
    """A Sage kernel needs passagemath in this Python environment: say so at the check, not at the first fork."""
    import importlib.util

    if config.kernel == "sage" and importlib.util.find_spec("sage") is None:
        raise ConfigError(
            "kernel = sage needs passagemath in this Python environment (the image's Sage layer, or `make sage`)"
        )
