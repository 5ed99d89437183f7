"""Unit tests of library/libvirt_cow_clone.py against a fake libvirt connection."""

from __future__ import annotations

import base64
import json
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from ansible.module_utils.testing import patch_module_args

import libvirt_cow_clone as clone


class FakeLibvirtError(Exception):
    pass


class FakeVolume:
    def __init__(self, pool: FakePool, name: str, xml: str) -> None:
        self.pool, self.name, self.xml = pool, name, xml

    def XMLDesc(self, _flags: int) -> str:  # noqa: N802 - libvirt's name
        return self.xml

    def path(self) -> str:
        return f"{self.pool.directory}/{self.name}"

    def delete(self, _flags: int) -> None:
        del self.pool.volumes[self.name]


class FakePool:
    def __init__(self, name: str, directory: str, active: bool = True) -> None:
        self.name, self.directory, self.active = name, directory, active
        self.volumes: dict[str, FakeVolume] = {}
        self.fail_create = False

    def isActive(self) -> bool:  # noqa: N802
        return self.active

    def XMLDesc(self, _flags: int) -> str:  # noqa: N802
        return f"<pool type='dir'><name>{self.name}</name><target><path>{self.directory}</path></target></pool>"

    def storageVolLookupByName(self, name: str) -> FakeVolume:  # noqa: N802
        if name not in self.volumes:
            raise FakeLibvirtError(f"no volume {name}")
        return self.volumes[name]

    def createXML(self, xml: str, _flags: int) -> FakeVolume:  # noqa: N802
        if self.fail_create:
            raise FakeLibvirtError("disk full")
        name = ET.fromstring(xml).findtext("name") or ""
        self.volumes[name] = FakeVolume(self, name, xml)
        return self.volumes[name]


class FakeDomain:
    def __init__(self, xml: str) -> None:
        self.xml, self.active = xml, False

    def XMLDesc(self, _flags: int) -> str:  # noqa: N802
        return self.xml

    def isActive(self) -> bool:  # noqa: N802
        return self.active

    def destroy(self) -> None:
        self.active = False


class FakeConnection:
    def __init__(self, pool: FakePool) -> None:
        self.pools = {pool.name: pool}
        self.domains: dict[str, FakeDomain] = {}
        self.fail_define = False
        self.closed = False

    def lookupByName(self, name: str) -> FakeDomain:  # noqa: N802
        if name not in self.domains:
            raise FakeLibvirtError(f"no domain {name}")
        domain = self.domains[name]
        domain.undefine = lambda: self.domains.pop(name)  # type: ignore[attr-defined]
        return domain

    def defineXML(self, xml: str) -> FakeDomain:  # noqa: N802
        if self.fail_define:
            raise FakeLibvirtError("unsupported configuration")
        name = ET.fromstring(xml).findtext("name") or ""
        self.domains[name] = FakeDomain(xml)
        return self.domains[name]

    def storagePoolLookupByName(self, name: str) -> FakePool:  # noqa: N802
        if name not in self.pools:
            raise FakeLibvirtError(f"no pool {name}")
        return self.pools[name]

    def storageVolLookupByPath(self, path: str) -> FakeVolume:  # noqa: N802
        for pool in self.pools.values():
            for volume in pool.volumes.values():
                if volume.path() == path:
                    return volume
        raise FakeLibvirtError(f"no volume at {path}")

    def close(self) -> None:
        self.closed = True


class FakeLibvirt:
    libvirtError = FakeLibvirtError  # noqa: N815 - libvirt's name

    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.opened = 0

    def open(self, _uri: str) -> FakeConnection:
        self.opened += 1
        return self.conn


@pytest.fixture
def base_image(tmp_path: Path) -> Path:
    """A file with a qcow2 header announcing a 4 GiB virtual size."""
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"QFI\xfb" + b"\0" * 20 + struct.pack(">Q", 4 << 30) + b"\0" * 64)
    return image


@pytest.fixture
def pool(tmp_path: Path) -> FakePool:
    return FakePool("lab", str(tmp_path / "disks"))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, pool: FakePool) -> FakeLibvirt:
    fake_libvirt = FakeLibvirt(FakeConnection(pool))
    monkeypatch.setattr(clone, "libvirt", fake_libvirt)
    return fake_libvirt


def run(args: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    with patch_module_args(args), pytest.raises(SystemExit) as exit_info:
        clone.main()
    return int(exit_info.value.code or 0), json.loads(capsys.readouterr().out)


def present_args(base_image: Path, **overrides: Any) -> dict[str, Any]:
    args = {"name": "cell1", "base_image": str(base_image), "pool": "lab", "network": "lab"}
    return {**args, **overrides}


def test_missing_base_image_fails_with_one_line_and_defines_nothing(
    fake: FakeLibvirt, pool: FakePool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = run(present_args(tmp_path / "missing.qcow2"), capsys)
    assert code == 1
    assert result["msg"] == f"base image {tmp_path / 'missing.qcow2'} does not exist"
    assert "\n" not in result["msg"]
    assert fake.opened == 0
    assert fake.conn.domains == {} and pool.volumes == {}


def test_clone_creates_overlay_and_domain_with_fresh_identity(
    fake: FakeLibvirt, pool: FakePool, base_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = run(present_args(base_image, memory_mib=768, vcpus=2), capsys)
    assert code == 0 and result["changed"] is True
    identity = result["clone"]
    volume = pool.volumes["cell1.qcow2"]
    assert ET.fromstring(volume.xml).findtext("backingStore/path") == str(base_image)
    assert ET.fromstring(volume.xml).findtext("capacity") == str(4 << 30)
    domain = ET.fromstring(fake.conn.domains["cell1"].xml)
    assert domain.findtext("uuid") == identity["uuid"]
    assert domain.find("devices/interface/mac").get("address") == identity["mac"]
    assert domain.find("devices/disk/source").get("file") == identity["overlay"] == volume.path()
    assert domain.findtext("memory") == "768" and domain.findtext("vcpu") == "2"
    assert identity["mac"].startswith("52:54:00:") and len(identity["machine_id"]) == 32
    assert identity["hostname"] == "cell1"


def test_two_clones_of_one_base_get_distinct_identities(
    fake: FakeLibvirt, base_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, first = run(present_args(base_image, name="cell1"), capsys)
    _, second = run(present_args(base_image, name="cell2"), capsys)
    for field in ("uuid", "mac", "machine_id", "hostname", "overlay"):
        assert first["clone"][field] != second["clone"][field], field


def test_second_run_changes_nothing_and_keeps_identity(
    fake: FakeLibvirt, base_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, first = run(present_args(base_image), capsys)
    code, second = run(present_args(base_image), capsys)
    assert code == 0 and second["changed"] is False
    assert second["clone"] == first["clone"]


def test_check_mode_reports_change_and_creates_nothing(
    fake: FakeLibvirt, pool: FakePool, base_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = run(present_args(base_image, _ansible_check_mode=True), capsys)
    assert code == 0 and result["changed"] is True
    assert fake.conn.domains == {} and pool.volumes == {}


def test_name_used_by_foreign_domain_is_refused(
    fake: FakeLibvirt, pool: FakePool, base_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.conn.domains["cell1"] = FakeDomain("<domain><name>cell1</name><memory>1048576</memory></domain>")
    code, result = run(present_args(base_image), capsys)
    assert code == 1
    assert result["msg"] == "name 'cell1' is already used by a domain that cellfleet did not clone"
    assert pool.volumes == {}


def test_existing_clone_with_other_memory_is_reported_not_changed(
    fake: FakeLibvirt, base_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(present_args(base_image, memory_mib=512), capsys)
    code, result = run(present_args(base_image, memory_mib=1024), capsys)
    assert code == 1
    assert "memory_mib 512 (wanted 1024)" in result["msg"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"memory_mib": 64}, "memory_mib 64 is out of range (128 to 1048576 MiB)"),
        ({"memory_mib": -1}, "memory_mib -1 is out of range (128 to 1048576 MiB)"),
        ({"vcpus": 0}, "vcpus 0 is out of range (1 to 64)"),
        ({"mac": "01:00:5e:00:00:01"}, "is not a unicast MAC address"),
        ({"mac": "52-54-00-00-00-01"}, "is not a unicast MAC address"),
        ({"machine_id": "0" * 32}, "must be 32 lowercase hex digits"),
        ({"hostname": "Bad_Host"}, "is not a valid host name label"),
        ({"name": "bad name"}, "is not a valid domain name"),
        ({"kernel": "/nonexistent/vmlinuz"}, "kernel and initrd go together"),
        ({"kernel_args": "quiet"}, "need direct kernel boot"),
    ],
)
def test_bad_arguments_are_refused_before_libvirt_is_touched(
    fake: FakeLibvirt,
    pool: FakePool,
    base_image: Path,
    capsys: pytest.CaptureFixture[str],
    override: dict[str, Any],
    message: str,
) -> None:
    code, result = run(present_args(base_image, **override), capsys)
    assert code == 1
    assert message in result["msg"]
    assert fake.opened == 0 and fake.conn.domains == {} and pool.volumes == {}


def test_missing_pool_is_a_clear_error(fake: FakeLibvirt, base_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = run(present_args(base_image, pool="nope"), capsys)
    assert code == 1 and result["msg"] == "storage pool 'nope' does not exist"


def test_failed_define_deletes_the_overlay(
    fake: FakeLibvirt, pool: FakePool, base_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.conn.fail_define = True
    code, result = run(present_args(base_image), capsys)
    assert code == 1 and result["msg"].startswith("defining domain cell1 failed")
    assert pool.volumes == {} and fake.conn.domains == {}


def test_failed_overlay_creation_defines_nothing(
    fake: FakeLibvirt, pool: FakePool, base_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool.fail_create = True
    code, result = run(present_args(base_image), capsys)
    assert code == 1 and "disk full" in result["msg"]
    assert fake.conn.domains == {}


def test_stale_overlay_from_an_interrupted_run_is_replaced(
    fake: FakeLibvirt, pool: FakePool, base_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = f"<volume><name>cell1.qcow2</name><backingStore><path>{base_image}</path></backingStore></volume>"
    pool.volumes["cell1.qcow2"] = FakeVolume(pool, "cell1.qcow2", stale)
    code, result = run(present_args(base_image), capsys)
    assert code == 0 and result["changed"] is True
    assert "cell1" in fake.conn.domains and pool.volumes["cell1.qcow2"].xml != stale


def test_foreign_volume_with_the_overlay_name_is_not_deleted(
    fake: FakeLibvirt, pool: FakePool, base_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = "<volume><name>cell1.qcow2</name></volume>"
    pool.volumes["cell1.qcow2"] = FakeVolume(pool, "cell1.qcow2", foreign)
    code, result = run(present_args(base_image), capsys)
    assert code == 1 and "is not an overlay of" in result["msg"]
    assert pool.volumes["cell1.qcow2"].xml == foreign and fake.conn.domains == {}


def test_absent_destroys_undefines_and_deletes_the_overlay(
    fake: FakeLibvirt, pool: FakePool, base_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(present_args(base_image), capsys)
    fake.conn.domains["cell1"].active = True
    code, result = run({"name": "cell1", "state": "absent"}, capsys)
    assert code == 0 and result["changed"] is True
    assert fake.conn.domains == {} and pool.volumes == {}
    code, result = run({"name": "cell1", "state": "absent"}, capsys)
    assert code == 0 and result["changed"] is False


def test_absent_refuses_a_domain_it_did_not_clone(fake: FakeLibvirt, capsys: pytest.CaptureFixture[str]) -> None:
    fake.conn.domains["web"] = FakeDomain("<domain><name>web</name></domain>")
    code, result = run({"name": "web", "state": "absent"}, capsys)
    assert code == 1 and "cellfleet did not clone it" in result["msg"]
    assert "web" in fake.conn.domains


def test_direct_kernel_boot_passes_identity_and_key_on_the_command_line(
    fake: FakeLibvirt, base_image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake lab"
    args = present_args(
        base_image, kernel=str(kernel), initrd=str(initrd), kernel_args="selinux=1", ssh_authorized_key=key
    )
    _, result = run(args, capsys)
    cmdline = ET.fromstring(fake.conn.domains["cell1"].xml).findtext("os/cmdline") or ""
    words = cmdline.split()
    assert f"systemd.machine_id={result['clone']['machine_id']}" in words
    assert "systemd.hostname=cell1" in words and "selinux=1" in words
    encoded = next(w for w in words if w.startswith("cellfleet.ssh_key=")).split("=", 1)[1]
    assert base64.b64decode(encoded).decode() == key


def test_raw_base_image_size_is_its_file_size(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096)
    assert clone.image_format_and_size(str(raw)) == ("raw", 4096)
