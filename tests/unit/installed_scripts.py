"""Import the scripts the roles install: they have no .py suffix, so the usual import cannot find them."""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

REPOSITORY = Path(__file__).resolve().parents[2]


def load_script(relative_path: str) -> ModuleType:
    """The script at relative_path in the repository, as a module (dataclasses need it in sys.modules)."""
    path = REPOSITORY / relative_path
    loader = SourceFileLoader(path.name.replace("-", "_"), str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module
