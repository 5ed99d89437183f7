"""The worker pool's launch tool refuses anything but a pool member and builds its systemd-run line itself;
the reset's skeleton logic, run on a temporary directory as this user, restores exactly the skeleton."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import cellfleet_worker_pool as pool


def make_config(tmp_path: Path) -> pool.PoolConfig:
    raw = {
        "gid": os.getgid(),
        "workers": {"cellw01": {"uid": os.getuid(), "home": str(tmp_path / "home/cellw01")}},
        "selinux_context": "user_u:user_r:user_t:s0",
        "skeleton_dir": str(tmp_path / "skel"),
        "immutable": [".bashrc", ".ssh"],
        "shared_dirs": [str(tmp_path / "shared")],
        "slice_prefix": "cellworkers",
        "unit_properties": ["NoNewPrivileges=yes", "PrivateTmp=yes"],
        "environment": {"PATH": "/usr/bin:/bin"},
    }
    path = tmp_path / "worker-pool.json"
    path.write_text(json.dumps(raw))
    return pool.load_config(path)


@pytest.mark.parametrize("name", ["root", "cellserver", "../cellw01", "cellw01 --uid=0", "--uid=0", "", "cellw1"])
def test_only_pool_members_are_accepted(tmp_path: Path, name: str) -> None:
    with pytest.raises(pool.UsageError, match="is not a worker of this pool"):
        make_config(tmp_path).worker(name)


def test_the_command_line_comes_from_the_config_and_the_command_follows_the_separator(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    worker = config.worker("cellw01")
    argv = pool.systemd_run_argv(config, worker, ["--property=User=root", "id"], {"X": "--uid=0"})
    separator = argv.index("--")
    options, command = argv[:separator], argv[separator + 1 :]
    assert command == ["--property=User=root", "id"]
    assert f"--uid={worker.uid}" in options and f"--gid={worker.gid}" in options
    assert "--property=SELinuxContext=user_u:user_r:user_t:s0" in options
    assert "--property=NoNewPrivileges=yes" in options
    assert "--slice=cellworkers-cellw01.slice" in options
    assert "--setenv=X=--uid=0" in options  # one argument: the value cannot become an option
    assert sum(option.startswith("--uid") for option in options) == 1


@pytest.mark.parametrize("assignment", ["NOVALUE", "1X=2", "A B=1", "=x", "X\0=1"])
def test_bad_environment_assignments_are_refused(assignment: str) -> None:
    with pytest.raises(pool.UsageError):
        pool.parse_env_assignment(assignment)


def test_an_empty_command_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with pytest.raises(pool.UsageError, match="no command"):
        pool.systemd_run_argv(config, config.worker("cellw01"), [], {})


def test_reset_removes_the_workers_files_and_keeps_the_skeleton(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path)
    worker = config.worker("cellw01")
    (tmp_path / "skel/.ssh").mkdir(parents=True)
    (tmp_path / "skel/.bashrc").write_text("# immutable\n")
    home = worker.home
    home.mkdir(parents=True)
    (home / "deep/er").mkdir(parents=True)
    (home / "deep/er/f").write_text("x")
    (home / ".hidden").write_text("x")
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    (shared / "sub/mine").write_text("x")
    # Root-only steps (ownership, immutable flag, SELinux labels) are recorded instead of run here.
    flags: dict[str, bool] = {}
    monkeypatch.setattr(pool, "set_immutable", lambda path, on: flags.__setitem__(str(path), on))
    monkeypatch.setattr(pool, "is_immutable", lambda path: flags.get(str(path), False))
    monkeypatch.setattr(pool, "restorecon", lambda path: None)
    monkeypatch.setattr(os, "chown", lambda *args: None)
    monkeypatch.setattr(
        pool,
        "file_matches",
        lambda source, target: (
            target.exists() and target.read_bytes() == source.read_bytes() and flags.get(str(target), False)
        ),
    )
    report = pool.ResetReport(worker=worker.name)
    pool.remove_worker_files(config, worker, report, dry_run=False)
    pool.restore_skeleton(config, worker, report, dry_run=False)
    assert sorted(p.name for p in home.iterdir()) == [".bashrc", ".ssh"]
    assert (home / ".bashrc").read_text() == "# immutable\n"
    assert flags[str(home / ".bashrc")] and flags[str(home / ".ssh")]
    assert not (shared / "sub/mine").exists()
    assert oct(home.stat().st_mode & 0o777) == "0o700"


def test_reset_usage_needs_workers_or_all() -> None:
    with pytest.raises(pool.UsageError, match="usage"):
        pool.reset_main(["--dry-run"])
    with pytest.raises(pool.UsageError, match="usage"):
        pool.reset_main(["--all", "cellw01"])
