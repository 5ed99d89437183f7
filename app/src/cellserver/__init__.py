"""cellfleet's cell server: a SageMathCell-compatible compute service."""

__version__ = "0.1.0"
