"""The names a Sage cell sees, from whichever passagemath distributions are installed.

passagemath's full `passagemath-standard` has `sage.all_cmdline`, the module Sage's Jupyter kernel fills a
cell's globals from. The smaller sets cellfleet bakes do not: each distribution brings its own
`sage.all__sagemath_<name>` instead. This module joins those into `sage.all_cmdline`, so the Sage kernel
finds the names of every installed distribution (add one to the recipe, its names appear in the cells).
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys
import types
from pathlib import Path

log = logging.getLogger("cellserver.sage_environment")

ALL_MODULE = "sage.all_cmdline"
DISTRIBUTION_PREFIX = "sage.all__sagemath_"
# Distributions build on each other, and a lower one may export a stand-in for a name a higher one defines
# (passagemath-repl's Integer is Python's int until a ring library is installed). Joined lowest first, so
# the higher definition wins: these base layers first, then the rest, then these, which sit on top.
BASE = ("sage.all__sagemath_environment", "sage.all__sagemath_objects", "sage.all__sagemath_repl",
        "sage.all__sagemath_categories")  # fmt: skip
TOP = ("sage.all__sagemath_symbolics", "sage.all__sagemath_plot")


# What Sage, Maxima and matplotlib write under HOME when they are imported or first used, and where to.
STATE_DIRECTORIES = {"DOT_SAGE": "dot_sage", "MAXIMA_USERDIR": "maxima", "MPLCONFIGDIR": "matplotlib"}


def keep_state_in(directory: Path) -> None:
    """Give Sage, Maxima and matplotlib a directory of their own for what they write at import and warm-up.

    The provider service has no writable home (its unit makes the system read-only): without this, importing
    Sage fails creating ~/.sage. Kernels inherit the paths but not write access: they run as workers, and
    what they write goes to their own home or temporary directory. Must run before anything imports Sage.
    """
    for variable, name in STATE_DIRECTORIES.items():
        os.environ.setdefault(variable, str(directory / name))


def distribution_modules() -> list[str]:
    """The installed distributions' global modules, lowest layer first."""
    import sage

    found = {
        info.name for info in pkgutil.iter_modules(sage.__path__, "sage.") if info.name.startswith(DISTRIBUTION_PREFIX)
    }
    ordered = [name for name in BASE if name in found]
    ordered += sorted(found - set(BASE) - set(TOP))
    return ordered + [name for name in TOP if name in found]


def public_names(module: types.ModuleType) -> dict[str, object]:
    names = getattr(module, "__all__", None) or [name for name in vars(module) if not name.startswith("_")]
    return {name: getattr(module, name) for name in names if hasattr(module, name)}


def provide_sage_globals() -> list[str]:
    """Make `sage.all_cmdline` importable; the modules it came from (one for a full Sage)."""
    try:
        importlib.import_module(ALL_MODULE)
    except ImportError:
        pass
    else:
        return [ALL_MODULE]
    import sage

    joined = types.ModuleType(ALL_MODULE, "Sage's global names, joined from the installed distributions")
    used = []
    for name in distribution_modules():
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            # A distribution whose optional parts are missing: its names are left out, and the log says so.
            log.warning("left out %s: %s", name, error)
            continue
        vars(joined).update(public_names(module))
        used.append(name)
    sys.modules[ALL_MODULE] = joined
    sage.all_cmdline = joined  # type: ignore[attr-defined]
    return used


def warm_up() -> None:
    """Do once here, before any fork, the first-use work every kernel would repeat: starting Maxima (ECL) for
    calculus and rendering a plot. A forked kernel then integrates in milliseconds instead of a second and
    plots in a third of the time; forked children of a warm Maxima compute correctly (checked by the tests)."""
    import tempfile

    import sage.all_cmdline as sage_globals

    x = sage_globals.var("x")
    sage_globals.integrate(x * sage_globals.sin(x), x)
    with tempfile.TemporaryDirectory(prefix="cellserver-warm-") as scratch:
        sage_globals.plot(sage_globals.sin).save(f"{scratch}/plot.png")
