#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: set a user's or group's disk quota on a filesystem with the quota tools."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: disk_quota
short_description: Set block and inode quotas of one user or group on a filesystem (ext4, XFS)
description:
  - Reads the current limits with C(repquota -O csv) and calls C(setquota) only when they differ, so a second
    run reports no change.
  - Works on any filesystem the Linux quota tools manage (ext4 with the quota feature, XFS with quota mount
    options). community.general.xfs_quota covers XFS only; this module is the ext4 counterpart.
  - Fails before changing anything when the filesystem has no active quota of that type or the limits are
    inconsistent.
options:
  name:
    description: User or group name (or numeric id) whose limits are set.
    type: str
    required: true
  type:
    description: Quota type.
    type: str
    choices: [user, group]
    default: user
  filesystem:
    description: Mount point (or device) of the filesystem that enforces the quota.
    type: path
    required: true
  block_soft_kib:
    description: Soft block limit in KiB; 0 means no limit.
    type: int
    default: 0
  block_hard_kib:
    description: Hard block limit in KiB; 0 means no limit. Must not be below O(block_soft_kib).
    type: int
    default: 0
  inode_soft:
    description: Soft limit on the number of files; 0 means no limit.
    type: int
    default: 0
  inode_hard:
    description: Hard limit on the number of files; 0 means no limit. Must not be below O(inode_soft).
    type: int
    default: 0
  state:
    description: V(present) sets the limits; V(absent) removes them (all limits 0).
    type: str
    choices: [present, absent]
    default: present
requirements: [quota (setquota, repquota, quotaon)]
"""

EXAMPLES = r"""
- name: Limit a worker to 256 MiB and 12000 files on /
  disk_quota:
    name: cellw01
    filesystem: /
    block_soft_kib: 204800
    block_hard_kib: 262144
    inode_soft: 10000
    inode_hard: 12000
"""

RETURN = r"""
id:
  description: Numeric user or group id the limits apply to.
  type: int
  returned: success
before:
  description: Limits before the run (block_soft_kib, block_hard_kib, inode_soft, inode_hard).
  type: dict
  returned: success
after:
  description: Limits after the run.
  type: dict
  returned: success
"""

import csv
import grp
import io
import pwd
from dataclasses import asdict, dataclass

from ansible.module_utils.basic import AnsibleModule


@dataclass(frozen=True)
class Limits:
    block_soft_kib: int = 0
    block_hard_kib: int = 0
    inode_soft: int = 0
    inode_hard: int = 0


class QuotaError(Exception):
    """A condition that stops the module before it changes anything."""


def resolve_id(name: str, quota_type: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid if quota_type == "user" else grp.getgrnam(name).gr_gid
    except KeyError:
        raise QuotaError(f"{quota_type} {name} does not exist") from None


def requested_limits(params: dict) -> Limits:
    if params["state"] == "absent":
        return Limits()
    limits = Limits(
        block_soft_kib=params["block_soft_kib"],
        block_hard_kib=params["block_hard_kib"],
        inode_soft=params["inode_soft"],
        inode_hard=params["inode_hard"],
    )
    for field, value in asdict(limits).items():
        if value < 0:
            raise QuotaError(f"{field} must be 0 (no limit) or positive, got {value}")
    # A hard limit of 0 means unlimited, so any soft limit fits under it.
    if 0 < limits.block_hard_kib < limits.block_soft_kib:
        raise QuotaError(f"block_hard_kib ({limits.block_hard_kib}) is below block_soft_kib ({limits.block_soft_kib})")
    if 0 < limits.inode_hard < limits.inode_soft:
        raise QuotaError(f"inode_hard ({limits.inode_hard}) is below inode_soft ({limits.inode_soft})")
    return limits


def type_flag(quota_type: str) -> str:
    return "-u" if quota_type == "user" else "-g"


def require_active_quota(module: AnsibleModule, quota_type: str, filesystem: str) -> None:
    # quotaon -p exits non-zero when the quota is on, zero when it is off (it reports a state, not success).
    rc, out, err = module.run_command(["quotaon", "-p", type_flag(quota_type), filesystem])
    if "is on" not in out:
        raise QuotaError(f"{quota_type} quota is not active on {filesystem}: {(out + err).strip() or rc}")


def parse_repquota_csv(text: str, quota_id: int) -> Limits:
    """Limits of one id from `repquota -n -O csv` (ids appear as #<id>); an id with no entry has none."""
    reader = csv.DictReader(io.StringIO(text))
    # The first column is named User or Group after the quota type.
    id_column = (reader.fieldnames or ["User"])[0]
    for row in reader:
        if row[id_column].lstrip("#") == str(quota_id):
            return Limits(
                block_soft_kib=int(row["BlockSoftLimit"]),
                block_hard_kib=int(row["BlockHardLimit"]),
                inode_soft=int(row["FileSoftLimit"]),
                inode_hard=int(row["FileHardLimit"]),
            )
    return Limits()


def current_limits(module: AnsibleModule, quota_type: str, filesystem: str, quota_id: int) -> Limits:
    command = ["repquota", type_flag(quota_type), "-n", "-p", "-v", "-O", "csv", filesystem]
    rc, out, err = module.run_command(command)
    if rc != 0:
        raise QuotaError(f"repquota failed on {filesystem}: {err.strip() or out.strip()}")
    return parse_repquota_csv(out, quota_id)


def apply_limits(module: AnsibleModule, quota_type: str, filesystem: str, quota_id: int, limits: Limits) -> None:
    command = [
        "setquota",
        type_flag(quota_type),
        str(quota_id),
        str(limits.block_soft_kib),
        str(limits.block_hard_kib),
        str(limits.inode_soft),
        str(limits.inode_hard),
        filesystem,
    ]
    rc, out, err = module.run_command(command)
    if rc != 0:
        raise QuotaError(f"setquota failed: {err.strip() or out.strip()}")


def run(module: AnsibleModule) -> dict:
    params = module.params
    limits = requested_limits(params)
    try:
        quota_id = resolve_id(params["name"], params["type"])
    except QuotaError:
        # In a check run the account may be one that an earlier task would have created.
        if module.check_mode:
            return {"changed": True, "msg": f"{params['type']} {params['name']} does not exist yet"}
        raise
    require_active_quota(module, params["type"], params["filesystem"])
    before = current_limits(module, params["type"], params["filesystem"], quota_id)
    changed = before != limits
    if changed and not module.check_mode:
        apply_limits(module, params["type"], params["filesystem"], quota_id, limits)
    return {"changed": changed, "id": quota_id, "before": asdict(before), "after": asdict(limits)}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "type": {"type": "str", "choices": ["user", "group"], "default": "user"},
            "filesystem": {"type": "path", "required": True},
            "block_soft_kib": {"type": "int", "default": 0},
            "block_hard_kib": {"type": "int", "default": 0},
            "inode_soft": {"type": "int", "default": 0},
            "inode_hard": {"type": "int", "default": 0},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
        },
        supports_check_mode=True,
    )
    for tool in ("quotaon", "repquota", "setquota"):
        module.get_bin_path(tool, required=True)
    try:
        module.exit_json(**run(module))
    except QuotaError as error:
        module.fail_json(msg=str(error))


if __name__ == "__main__":
    main()
