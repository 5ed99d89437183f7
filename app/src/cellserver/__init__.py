"""cellfleet's cell server: a SageMathCell-compatible compute service."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One source of truth, pyproject.toml: a rolling update changes the version there and nowhere else.
    __version__ = version("cellfleet-cellserver")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
