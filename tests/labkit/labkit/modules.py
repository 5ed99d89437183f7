"""The project's own Ansible modules (library/) as Python modules, for the benchmarks that call their functions
directly: loaded from their files, so nobody edits sys.path to reach them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

LIBRARY = Path(__file__).resolve().parents[3] / "library"


def library_module(name: str) -> ModuleType:
    """library/<name>.py, imported once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, LIBRARY / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no module {name} in {LIBRARY}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
