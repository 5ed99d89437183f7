"""cellfleet-tmp-clean on real files: old ones go; fresh, open, mapped, protected files and sockets stay."""

from __future__ import annotations

import mmap
import os
import socket
import time
from pathlib import Path
from types import ModuleType

import pytest

from installed_scripts import load_script

DAY = 86400


@pytest.fixture(scope="module")
def cleaner() -> ModuleType:
    return load_script("roles/tmp_cleanup/files/usr/local/sbin/cellfleet-tmp-clean")


def aged(path: Path, days: float) -> Path:
    stamp = time.time() - days * DAY
    os.utime(path, (stamp, stamp), follow_symlinks=False)
    return path


def make_file(path: Path, days: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    return aged(path, days)


def run(cleaner: ModuleType, top: Path, **kwargs: object) -> object:
    protect = kwargs.pop("protect", ["systemd-private-*"])
    return cleaner.clean_directory(top, DAY, protect, cleaner.open_inodes(), kwargs.get("dry_run", False), time.time())


def test_old_files_go_and_fresh_ones_stay(cleaner: ModuleType, tmp_path: Path) -> None:
    old = make_file(tmp_path / "old.txt", 3)
    fresh = make_file(tmp_path / "fresh.txt", 0.1)
    nested_old = make_file(tmp_path / "dir/deeper/old.bin", 5)
    report = run(cleaner, tmp_path)
    assert not old.exists() and not nested_old.exists()
    assert fresh.exists()
    assert str(old) in report.removed


def test_sockets_fifos_and_open_files_stay(cleaner: ModuleType, tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "app.sock"))
    aged(tmp_path / "app.sock", 3)
    os.mkfifo(tmp_path / "pipe")
    aged(tmp_path / "pipe", 3)
    held = make_file(tmp_path / "held-open.log", 0)
    mapped = make_file(tmp_path / "mapped.db", 0)
    with held.open() as _handle, mapped.open("r+b") as mapped_file:
        mapping = mmap.mmap(mapped_file.fileno(), 1)
        mapped_file.close()  # only the mapping keeps it in use now
        # Aged after opening: opening may refresh the access time (relatime).
        aged(held, 3), aged(mapped, 3)
        report = run(cleaner, tmp_path)
        mapping.close()
    listener.close()
    assert (tmp_path / "app.sock").exists() and (tmp_path / "pipe").exists()
    assert held.exists() and mapped.exists()
    assert str(held) in report.kept_in_use and str(mapped) in report.kept_in_use
    assert str(tmp_path / "app.sock") in report.kept_special


def test_protected_names_and_their_contents_stay(cleaner: ModuleType, tmp_path: Path) -> None:
    inside = make_file(tmp_path / "systemd-private-abc-foo.service-x/tmp/old", 3)
    run(cleaner, tmp_path)
    assert inside.exists()


def test_symlinks_are_removed_not_followed(cleaner: ModuleType, tmp_path: Path) -> None:
    target = make_file(tmp_path.parent / f"{tmp_path.name}-outside" / "keep.txt", 3)
    link = tmp_path / "link"
    link.symlink_to(target)
    aged(link, 3)
    run(cleaner, tmp_path)
    assert not link.is_symlink() and target.exists()


def test_old_empty_directories_go_but_the_top_stays(cleaner: ModuleType, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    aged(empty, 3)
    run(cleaner, tmp_path)
    assert not empty.exists() and tmp_path.exists()


def test_dry_run_removes_nothing(cleaner: ModuleType, tmp_path: Path) -> None:
    old = make_file(tmp_path / "old.txt", 3)
    report = run(cleaner, tmp_path, dry_run=True)
    assert old.exists() and str(old) in report.removed


def test_a_missing_directory_is_no_error(cleaner: ModuleType, tmp_path: Path) -> None:
    report = run(cleaner, tmp_path / "absent")
    assert report.removed == [] and report.errors == []


def test_age_must_be_positive(cleaner: ModuleType) -> None:
    with pytest.raises(SystemExit):
        cleaner.parse_args(["--max-age-hours", "0", "/tmp"])
