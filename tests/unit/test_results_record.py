"""The committed record of measurements: a run on a machine that measured only some benchmarks keeps the
others' results and dates, and a newer local result replaces the record's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from labkit import results


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    run, record = tmp_path / "run", tmp_path / "record"
    run.mkdir()
    monkeypatch.setattr(results, "RUN_RESULTS", run)
    monkeypatch.setattr(results, "RECORD", record)
    monkeypatch.setattr(results, "STAMPS", record / "measured.json")
    return run, record


def write_result(folder: Path, name: str, value: int, measured_at: float) -> None:
    (folder / name).write_text(json.dumps({"value": value}))
    os.utime(folder / name, (measured_at, measured_at))


def test_a_fresh_machine_reads_the_record(places: tuple[Path, Path]) -> None:
    run, record = places
    write_result(run, "a.json", 1, 1000.0)
    write_result(run, "b.json", 2, 2000.0)
    assert results.keep(["a.json", "b.json", "absent.json"]) == ["a.json", "b.json"]
    for path in run.iterdir():
        path.unlink()
    assert results.newest("a.json") == (record / "a.json", 1000.0)
    assert results.newest("b.json") == (record / "b.json", 2000.0)
    assert results.newest("absent.json") == (None, None)


def test_a_newer_run_replaces_only_its_own_result(places: tuple[Path, Path]) -> None:
    run, record = places
    write_result(run, "a.json", 1, 1000.0)
    write_result(run, "b.json", 2, 2000.0)
    results.keep(["a.json", "b.json"])
    (run / "b.json").unlink()
    write_result(run, "a.json", 3, 3000.0)
    assert results.keep(["a.json", "b.json"]) == ["a.json"]
    assert json.loads((record / "a.json").read_text()) == {"value": 3}
    assert json.loads((record / "b.json").read_text()) == {"value": 2}
    assert results.recorded_stamps() == {"a.json": 3000.0, "b.json": 2000.0}


def test_an_older_local_result_does_not_replace_the_record(places: tuple[Path, Path]) -> None:
    run, record = places
    write_result(run, "a.json", 3, 3000.0)
    results.keep(["a.json"])
    write_result(run, "a.json", 1, 1000.0)
    assert results.keep(["a.json"]) == []
    assert results.newest("a.json") == (record / "a.json", 3000.0)
