"""Unit tests of library/disk_quota.py with the quota tools replaced by a fake command runner."""

from __future__ import annotations

import json
from typing import Any

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

import disk_quota

HEADER = (
    "User,BlockStatus,FileStatus,BlockUsed,BlockSoftLimit,BlockHardLimit,BlockGrace,"
    "FileUsed,FileSoftLimit,FileHardLimit,FileGrace"
)


class ModuleExitError(Exception):
    def __init__(self, result: dict[str, Any], failed: bool) -> None:
        super().__init__(result.get("msg", ""))
        self.result, self.failed = result, failed


class FakeQuotaTools:
    """setquota/repquota/quotaon over an in-memory table of limits per uid."""

    def __init__(self, limits: dict[int, tuple[int, int, int, int]], quota_on: bool = True) -> None:
        self.limits = limits
        self.quota_on = quota_on
        self.setquota_calls: list[list[str]] = []

    def __call__(self, args: list[str]) -> tuple[int, str, str]:
        tool = args[0]
        if tool == "quotaon":
            state = "on" if self.quota_on else "off"
            return (1 if self.quota_on else 0), f"user quota on / (/dev/vda) is {state}\n", ""
        if tool == "repquota":
            rows = [HEADER]
            for uid, (bs, bh, i_s, ih) in self.limits.items():
                rows.append(f"#{uid},ok,ok,16,{bs},{bh},0,4,{i_s},{ih},0")
            return 0, "\n".join(rows) + "\n", ""
        if tool == "setquota":
            self.setquota_calls.append(args)
            uid, bs, bh, i_s, ih = (int(value) for value in args[2:7])
            self.limits[uid] = (bs, bh, i_s, ih)
            return 0, "", ""
        raise AssertionError(f"unexpected command {args}")


def run_module(monkeypatch: pytest.MonkeyPatch, tools: FakeQuotaTools, **args: Any) -> ModuleExitError:
    def exit_json(_self: Any, **result: Any) -> None:
        raise ModuleExitError(result, failed=False)

    def fail_json(_self: Any, **result: Any) -> None:
        raise ModuleExitError(result, failed=True)

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
    monkeypatch.setattr(basic.AnsibleModule, "run_command", lambda _self, args, **_kw: tools(args))
    monkeypatch.setattr(basic.AnsibleModule, "get_bin_path", lambda _self, name, **_kw: f"/usr/sbin/{name}")
    with patch_module_args(args), pytest.raises(ModuleExitError) as raised:
        disk_quota.main()
    return raised.value


LIMITS = {"block_soft_kib": 1000, "block_hard_kib": 2000, "inode_soft": 10, "inode_hard": 20}


def test_sets_limits_then_reports_no_change(monkeypatch: pytest.MonkeyPatch) -> None:
    tools = FakeQuotaTools({0: (0, 0, 0, 0)})
    first = run_module(monkeypatch, tools, name="20001", filesystem="/", **LIMITS)
    assert not first.failed and first.result["changed"]
    assert tools.limits[20001] == (1000, 2000, 10, 20)
    second = run_module(monkeypatch, tools, name="20001", filesystem="/", **LIMITS)
    assert not second.result["changed"]
    assert len(tools.setquota_calls) == 1


def test_check_mode_reports_change_without_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    tools = FakeQuotaTools({20001: (1, 2, 3, 4)})
    result = run_module(monkeypatch, tools, name="20001", filesystem="/", _ansible_check_mode=True, **LIMITS)
    assert result.result["changed"] and result.result["before"]["block_soft_kib"] == 1
    assert tools.setquota_calls == []


def test_absent_clears_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    tools = FakeQuotaTools({20001: (1, 2, 3, 4)})
    result = run_module(monkeypatch, tools, name="20001", filesystem="/", state="absent")
    assert result.result["changed"] and tools.limits[20001] == (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"block_soft_kib": 3000}, "block_hard_kib (2000) is below block_soft_kib (3000)"),
        ({"inode_soft": 30}, "inode_hard (20) is below inode_soft (30)"),
        ({"block_hard_kib": -1}, "block_hard_kib must be 0 (no limit) or positive"),
    ],
)
def test_inconsistent_limits_are_refused_before_any_change(
    monkeypatch: pytest.MonkeyPatch, override: dict[str, int], message: str
) -> None:
    tools = FakeQuotaTools({})
    result = run_module(monkeypatch, tools, name="20001", filesystem="/", **{**LIMITS, **override})
    assert result.failed and message in result.result["msg"]
    assert tools.setquota_calls == []


def test_inactive_quota_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    tools = FakeQuotaTools({}, quota_on=False)
    result = run_module(monkeypatch, tools, name="20001", filesystem="/", **LIMITS)
    assert result.failed and "user quota is not active on /" in result.result["msg"]
    assert tools.setquota_calls == []


def test_unknown_user_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    tools = FakeQuotaTools({})
    result = run_module(monkeypatch, tools, name="no-such-user-cf", filesystem="/", **LIMITS)
    assert result.failed and "user no-such-user-cf does not exist" in result.result["msg"]


def test_group_report_is_parsed_by_its_first_column() -> None:
    text = HEADER.replace("User", "Group", 1) + "\n#20000,ok,ok,4,5,6,0,1,7,8,0\n"
    assert disk_quota.parse_repquota_csv(text, 20000) == disk_quota.Limits(5, 6, 7, 8)
    assert disk_quota.parse_repquota_csv(text, 1) == disk_quota.Limits()


def test_result_is_json_serialisable(monkeypatch: pytest.MonkeyPatch) -> None:
    tools = FakeQuotaTools({})
    result = run_module(monkeypatch, tools, name="20001", filesystem="/", **LIMITS)
    json.dumps(result.result)


def test_check_mode_tolerates_an_account_an_earlier_task_would_create(monkeypatch: pytest.MonkeyPatch) -> None:
    tools = FakeQuotaTools({})
    result = run_module(monkeypatch, tools, name="no-such-user-cf", filesystem="/", _ansible_check_mode=True, **LIMITS)
    assert not result.failed and result.result["changed"]
    assert tools.setquota_calls == []
