"""cellfleet's cell server: a SageMathCell-compatible compute service."""

# The one place the release is named: pyproject.toml reads it from here when the wheel is built, and a
# rolling update changes it here. A literal, not importlib.metadata.version(): importing importlib.metadata is
# a large share of the server's start, the time a restarted server is out of rotation.
__version__ = "0.1.0"
