"""Where benchmarks and chaos keep their numbers.

A run writes its files under bench/results/ (this machine's, not committed). The report copies each into the
committed record, docs/measurements/results/, with when it was measured: a later run on another machine, of
one benchmark or one chaos scenario, then adds to the record instead of replacing it with "no result".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from labkit.lab import ROOT

RUN_RESULTS = ROOT / "bench" / "results"
RECORD = ROOT / "docs" / "measurements" / "results"
STAMPS = RECORD / "measured.json"


def recorded_stamps() -> dict[str, float]:
    """When each file in the record was measured (seconds since the epoch): git keeps no file times."""
    return json.loads(STAMPS.read_text()) if STAMPS.exists() else {}


def newest(name: str) -> tuple[Path | None, float | None]:
    """The newest copy of a result file, this machine's run or the record's, and when it was measured."""
    run, recorded_at = RUN_RESULTS / name, recorded_stamps().get(name)
    run_at = run.stat().st_mtime if run.exists() else None
    if run_at is not None and (recorded_at is None or run_at > recorded_at):
        return run, run_at
    if recorded_at is not None and (RECORD / name).exists():
        return RECORD / name, recorded_at
    return None, None


def keep(names: list[str]) -> list[str]:
    """Copy into the record each named file this machine measured after the record's copy; the ones copied."""
    stamps = recorded_stamps()
    kept = []
    for name in names:
        path, measured_at = newest(name)
        if path is None or measured_at is None or path.parent != RUN_RESULTS:
            continue
        RECORD.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, RECORD / name)
        stamps[name] = measured_at
        kept.append(name)
    if kept:
        STAMPS.write_text(json.dumps(stamps, indent=2, sort_keys=True) + "\n")
    return kept
