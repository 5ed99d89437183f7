#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: clone a libvirt VM copy-on-write from a base image."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: libvirt_cow_clone
short_description: Create or remove a libvirt VM as a qcow2 overlay of a base image, with a fresh identity
description:
  - Creates a qcow2 overlay volume (backing file = O(base_image)) in a libvirt storage pool and defines a
    domain on it, as one unit: if defining the domain fails, the overlay is deleted again, so nothing is left
    half-defined.
  - Each clone gets a fresh UUID, MAC address, machine-id and hostname. The identity is stored in the domain's
    metadata, so later runs report it unchanged instead of inventing a new one.
  - With direct kernel boot (O(kernel)), hostname and machine-id reach the guest on the kernel command line
    (C(systemd.hostname=), C(systemd.machine_id=)); for disk-booted images they are offered through the SMBIOS
    serial in cloud-init's NoCloud form (C(ds=nocloud;h=...;i=...)).
  - Starting and stopping the domain, networks and pools are left to community.libvirt (virt, virt_net,
    virt_pool). That collection has no operation that creates an overlay and its domain together with a
    rollback and a stable generated identity, which is all this module adds.
options:
  name:
    description: Domain name; also the overlay volume's name (C(<name>.qcow2)).
    type: str
    required: true
  state:
    description: V(present) creates the clone (defined, not started); V(absent) destroys and undefines it and
      deletes its overlay. A domain that this module did not create is never touched.
    type: str
    choices: [present, absent]
    default: present
  base_image:
    description: Path of the base image (qcow2 or raw). Required with O(state=present).
    type: path
  pool:
    description: Storage pool (active, directory type) that receives the overlay.
    type: str
    default: default
  memory_mib:
    description: Memory in MiB (128 to 1048576).
    type: int
    default: 1024
  vcpus:
    description: Number of virtual CPUs (1 to 64).
    type: int
    default: 1
  network:
    description: libvirt network the single virtio NIC joins.
    type: str
    default: default
  mac:
    description: MAC address; a random one in QEMU's 52:54:00 range when omitted.
    type: str
  hostname:
    description: Hostname given to the guest; defaults to O(name).
    type: str
  machine_id:
    description: 32 lowercase hex digits; a random one when omitted.
    type: str
  kernel:
    description: Kernel for direct kernel boot; requires O(initrd).
    type: path
  initrd:
    description: Initrd for direct kernel boot; requires O(kernel).
    type: path
  kernel_args:
    description: Extra kernel command line arguments (direct kernel boot only).
    type: str
    default: ""
  ssh_authorized_key:
    description: One public key line for root, passed as C(cellfleet.ssh_key=) (base64) on the kernel command
      line, where the golden image's seed unit installs it. Direct kernel boot only.
    type: str
  domain_type:
    description: V(kvm) for hardware virtualization, V(qemu) for software emulation.
    type: str
    choices: [kvm, qemu]
    default: kvm
  cpu_model:
    description: CPU model for the guest (for example C(qemu64), which boots fastest under emulation);
      host-passthrough when omitted with kvm, the hypervisor default otherwise.
    type: str
  serial_log:
    description: File that receives the guest's serial console; a pty when omitted.
    type: path
  uri:
    description: libvirt connection URI.
    type: str
    default: qemu:///system
requirements:
  - libvirt-python
"""

EXAMPLES = r"""
- name: Clone cell1 from the golden image
  libvirt_cow_clone:
    name: cell1
    base_image: /var/cache/cellfleet/images/debian12-0123456789abcdef/disk.qcow2
    pool: cellfleet-lab
    network: cellfleet-lab
    mac: "52:54:00:77:00:15"
    memory_mib: 1024
    domain_type: qemu
    cpu_model: qemu64
    kernel: /var/cache/cellfleet/images/debian12-0123456789abcdef/vmlinuz
    initrd: /var/cache/cellfleet/images/debian12-0123456789abcdef/initrd.img
    kernel_args: security=selinux selinux=1
    ssh_authorized_key: "{{ lookup('ansible.builtin.file', 'lab_ed25519.pub') }}"

- name: Remove it again, overlay included
  libvirt_cow_clone:
    name: cell1
    state: absent
"""

RETURN = r"""
clone:
  description: The clone's identity (empty after O(state=absent)).
  returned: always
  type: dict
  sample:
    name: cell1
    uuid: 5b0c1f0e-3c64-4c1a-9d8e-2f4b1f0b6d11
    mac: "52:54:00:77:00:15"
    machine_id: 0f1e2d3c4b5a69788796a5b4c3d2e1f0
    hostname: cell1
    overlay: /var/lib/cellfleet/lab/disks/cell1.qcow2
    base_image: /var/cache/cellfleet/images/debian12-0123456789abcdef/disk.qcow2
"""

import base64
import os
import random
import re
import struct
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, replace
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    import libvirt
except ImportError:  # reported through missing_required_lib at run time
    libvirt = None

METADATA_NS = "urn:cellfleet:clone:1"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOSTNAME_PATTERN = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAC_PATTERN = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
MACHINE_ID_PATTERN = re.compile(r"^(?!0{32})[0-9a-f]{32}$")
QCOW2_MAGIC = b"QFI\xfb"
MEMORY_RANGE_MIB = (128, 1048576)
VCPU_RANGE = (1, 64)


class CloneError(Exception):
    """A problem worth one clear line to the operator."""


@dataclass(frozen=True)
class Identity:
    name: str
    uuid: str
    mac: str
    machine_id: str
    hostname: str
    overlay: str
    base_image: str


def validate(params: dict[str, Any]) -> None:
    """Refuse bad input before anything touches libvirt."""
    name = params["name"]
    if not NAME_PATTERN.match(name):
        raise CloneError(f"name {name!r} is not a valid domain name (letters, digits, _ . -; at most 63)")
    if params["state"] == "absent":
        return
    base = params["base_image"]
    if not base:
        raise CloneError("base_image is required with state=present")
    if not os.path.isfile(base):
        raise CloneError(f"base image {base} does not exist")
    if not os.access(base, os.R_OK):
        raise CloneError(f"base image {base} is not readable")
    low, high = MEMORY_RANGE_MIB
    if not low <= params["memory_mib"] <= high:
        raise CloneError(f"memory_mib {params['memory_mib']} is out of range ({low} to {high} MiB)")
    low, high = VCPU_RANGE
    if not low <= params["vcpus"] <= high:
        raise CloneError(f"vcpus {params['vcpus']} is out of range ({low} to {high})")
    mac = params["mac"]
    if mac is not None and (not MAC_PATTERN.match(mac) or int(mac[:2], 16) & 1):
        raise CloneError(f"mac {mac!r} is not a unicast MAC address in lowercase aa:bb:cc:dd:ee:ff form")
    hostname = params["hostname"] or name
    if not HOSTNAME_PATTERN.match(hostname):
        raise CloneError(f"hostname {hostname!r} is not a valid host name label")
    machine_id = params["machine_id"]
    if machine_id is not None and not MACHINE_ID_PATTERN.match(machine_id):
        raise CloneError(f"machine_id {machine_id!r} must be 32 lowercase hex digits, not all zero")
    validate_boot(params)


def validate_boot(params: dict[str, Any]) -> None:
    kernel, initrd = params["kernel"], params["initrd"]
    if bool(kernel) != bool(initrd):
        raise CloneError("kernel and initrd go together: give both or neither")
    for path in (kernel, initrd):
        if path and not os.path.isfile(path):
            raise CloneError(f"{path} does not exist")
    if not kernel and (params["kernel_args"] or params["ssh_authorized_key"]):
        raise CloneError("kernel_args and ssh_authorized_key need direct kernel boot (kernel and initrd)")
    key = params["ssh_authorized_key"]
    if key is not None and (len(key.split()) < 2 or "\n" in key.strip()):
        raise CloneError("ssh_authorized_key must be one public key line ('TYPE BASE64 [comment]')")


def image_format_and_size(path: str) -> tuple[str, int]:
    """Format and virtual size in bytes, read from the qcow2 header (or the raw file's size)."""
    with open(path, "rb") as image:
        header = image.read(32)
    if header[:4] == QCOW2_MAGIC:
        return "qcow2", struct.unpack(">Q", header[24:32])[0]
    return "raw", os.path.getsize(path)


def random_mac() -> str:
    tail = [random.randint(0, 255) for _ in range(3)]
    return "52:54:00:" + ":".join(f"{octet:02x}" for octet in tail)


def new_identity(params: dict[str, Any], overlay: str) -> Identity:
    return Identity(
        name=params["name"],
        uuid=str(uuid.uuid4()),
        mac=params["mac"] or random_mac(),
        machine_id=params["machine_id"] or uuid.uuid4().hex,
        hostname=params["hostname"] or params["name"],
        overlay=overlay,
        base_image=params["base_image"],
    )


def volume_xml(identity: Identity, base_format: str, capacity: int) -> str:
    volume = ET.Element("volume", type="file")
    ET.SubElement(volume, "name").text = os.path.basename(identity.overlay)
    ET.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type="qcow2")
    backing = ET.SubElement(volume, "backingStore")
    ET.SubElement(backing, "path").text = identity.base_image
    ET.SubElement(backing, "format", type=base_format)
    return ET.tostring(volume, encoding="unicode")


def kernel_command_line(identity: Identity, params: dict[str, Any]) -> str:
    words = [
        "root=/dev/vda",
        "rw",
        "console=ttyS0",
        f"systemd.hostname={identity.hostname}",
        f"systemd.machine_id={identity.machine_id}",
    ]
    if params["ssh_authorized_key"]:
        encoded = base64.b64encode(params["ssh_authorized_key"].strip().encode()).decode()
        words.append(f"cellfleet.ssh_key={encoded}")
    words.extend(params["kernel_args"].split())
    return " ".join(words)


def domain_xml(identity: Identity, params: dict[str, Any]) -> str:
    domain = ET.Element("domain", type=params["domain_type"])
    ET.SubElement(domain, "name").text = identity.name
    ET.SubElement(domain, "uuid").text = identity.uuid
    metadata = ET.SubElement(ET.SubElement(domain, "metadata"), f"{{{METADATA_NS}}}clone")
    for field in ("base_image", "machine_id", "hostname", "overlay"):
        ET.SubElement(metadata, f"{{{METADATA_NS}}}{field}").text = getattr(identity, field)
    ET.SubElement(domain, "memory", unit="MiB").text = str(params["memory_mib"])
    ET.SubElement(domain, "vcpu").text = str(params["vcpus"])
    add_os(domain, identity, params)
    sysinfo = ET.SubElement(ET.SubElement(domain, "sysinfo", type="smbios"), "system")
    nocloud = f"ds=nocloud;h={identity.hostname};i={identity.machine_id}"
    ET.SubElement(sysinfo, "entry", name="serial").text = nocloud
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")  # without ACPI, `virsh shutdown` is ignored
    ET.SubElement(features, "apic")
    add_cpu(domain, params)
    ET.SubElement(domain, "clock", offset="utc")
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    ET.SubElement(domain, "on_crash").text = "destroy"
    add_devices(domain, identity, params)
    return ET.tostring(domain, encoding="unicode")


def add_os(domain: ET.Element, identity: Identity, params: dict[str, Any]) -> None:
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="pc").text = "hvm"
    if params["kernel"]:
        ET.SubElement(os_element, "kernel").text = params["kernel"]
        ET.SubElement(os_element, "initrd").text = params["initrd"]
        ET.SubElement(os_element, "cmdline").text = kernel_command_line(identity, params)
    else:
        ET.SubElement(os_element, "boot", dev="hd")
    ET.SubElement(os_element, "smbios", mode="sysinfo")


def add_cpu(domain: ET.Element, params: dict[str, Any]) -> None:
    if params["cpu_model"]:
        cpu = ET.SubElement(domain, "cpu", mode="custom", match="exact")
        ET.SubElement(cpu, "model", fallback="allow").text = params["cpu_model"]
    elif params["domain_type"] == "kvm":
        ET.SubElement(domain, "cpu", mode="host-passthrough")


def add_devices(domain: ET.Element, identity: Identity, params: dict[str, Any]) -> None:
    devices = ET.SubElement(domain, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=identity.overlay)
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    interface = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(interface, "source", network=params["network"])
    ET.SubElement(interface, "mac", address=identity.mac)
    ET.SubElement(interface, "model", type="virtio")
    if params["serial_log"]:
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=params["serial_log"])
    else:
        serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    rng = ET.SubElement(devices, "rng", model="virtio")  # first-boot host key generation needs entropy
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"


def identity_of(xml: str) -> Identity | None:
    """The identity recorded in a domain's XML, or None when cellfleet did not create it."""
    root = ET.fromstring(xml)
    metadata = root.find(f"metadata/{{{METADATA_NS}}}clone")
    if metadata is None:
        return None
    fields = {child.tag.split("}", 1)[1]: child.text or "" for child in metadata}
    mac = root.find("devices/interface/mac")
    return Identity(
        name=root.findtext("name", ""),
        uuid=root.findtext("uuid", ""),
        mac=mac.get("address", "") if mac is not None else "",
        machine_id=fields.get("machine_id", ""),
        hostname=fields.get("hostname", ""),
        overlay=fields.get("overlay", ""),
        base_image=fields.get("base_image", ""),
    )


def settings_of(xml: str) -> dict[str, Any]:
    root = ET.fromstring(xml)
    memory = root.find("memory")
    kib = int(memory.text or 0) if memory is not None else 0
    unit = memory.get("unit", "KiB") if memory is not None else "KiB"
    mib = kib // 1024 if unit == "KiB" else kib
    return {"memory_mib": mib, "vcpus": int(root.findtext("vcpu", "0"))}


def lookup_domain(conn: Any, name: str) -> Any | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def lookup_volume(pool: Any, name: str) -> Any | None:
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return None


def check_existing(domain: Any, params: dict[str, Any]) -> Identity:
    """An existing domain of that name must be this very clone, or the name is taken."""
    xml = domain.XMLDesc(0)
    identity = identity_of(xml)
    name = params["name"]
    if identity is None:
        raise CloneError(f"name {name!r} is already used by a domain that cellfleet did not clone")
    if identity.base_image != params["base_image"]:
        raise CloneError(
            f"{name} is already a clone of {identity.base_image}, not of {params['base_image']}; "
            "remove it (state=absent) to clone it again"
        )
    actual = settings_of(xml)
    wanted = {"memory_mib": params["memory_mib"], "vcpus": params["vcpus"]}
    if params["mac"]:
        actual["mac"], wanted["mac"] = identity.mac, params["mac"]
    differences = [f"{key} {actual[key]} (wanted {wanted[key]})" for key in wanted if actual[key] != wanted[key]]
    if differences:
        raise CloneError(f"{name} exists with other settings: {', '.join(differences)}; remove it first")
    return identity


def open_pool(conn: Any, pool_name: str) -> Any:
    try:
        pool = conn.storagePoolLookupByName(pool_name)
    except libvirt.libvirtError:
        raise CloneError(f"storage pool {pool_name!r} does not exist") from None
    if not pool.isActive():
        raise CloneError(f"storage pool {pool_name!r} is not active")
    return pool


def pool_directory(pool: Any) -> str:
    path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
    if not path:
        raise CloneError("storage pool has no target directory (only directory pools hold overlays)")
    return path


def remove_stale_overlay(pool: Any, volume_name: str, base_image: str) -> bool:
    """An overlay of ours without its domain is what an interrupted run leaves: delete it."""
    volume = lookup_volume(pool, volume_name)
    if volume is None:
        return False
    backing = ET.fromstring(volume.XMLDesc(0)).findtext("backingStore/path")
    if backing != base_image:
        raise CloneError(f"volume {volume_name} already exists in the pool and is not an overlay of {base_image}")
    volume.delete(0)
    return True


def ensure_present(conn: Any, params: dict[str, Any], check_mode: bool) -> tuple[bool, Identity]:
    domain = lookup_domain(conn, params["name"])
    if domain is not None:
        return False, check_existing(domain, params)
    pool = open_pool(conn, params["pool"])
    volume_name = f"{params['name']}.qcow2"
    identity = new_identity(params, os.path.join(pool_directory(pool), volume_name))
    if check_mode:
        return True, identity
    remove_stale_overlay(pool, volume_name, params["base_image"])
    base_format, capacity = image_format_and_size(params["base_image"])
    try:
        volume = pool.createXML(volume_xml(identity, base_format, capacity), 0)
    except libvirt.libvirtError as error:
        raise CloneError(f"creating overlay {volume_name} failed: {error}") from None
    try:
        conn.defineXML(domain_xml(identity, params))
    except libvirt.libvirtError as error:
        volume.delete(0)  # leave nothing half-defined behind
        raise CloneError(f"defining domain {params['name']} failed: {error}") from None
    return True, replace(identity, overlay=volume.path())


def ensure_absent(conn: Any, params: dict[str, Any], check_mode: bool) -> bool:
    domain = lookup_domain(conn, params["name"])
    if domain is None:
        return False
    identity = identity_of(domain.XMLDesc(0))
    if identity is None:
        raise CloneError(f"refusing to remove {params['name']}: cellfleet did not clone it")
    if check_mode:
        return True
    if domain.isActive():
        domain.destroy()
    domain.undefine()
    try:
        conn.storageVolLookupByPath(identity.overlay).delete(0)
    except libvirt.libvirtError:
        if os.path.exists(identity.overlay):  # overlay outside any pool libvirt knows
            os.unlink(identity.overlay)
    return True


def argument_spec() -> dict[str, Any]:
    return {
        "name": {"type": "str", "required": True},
        "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
        "base_image": {"type": "path"},
        "pool": {"type": "str", "default": "default"},
        "memory_mib": {"type": "int", "default": 1024},
        "vcpus": {"type": "int", "default": 1},
        "network": {"type": "str", "default": "default"},
        "mac": {"type": "str"},
        "hostname": {"type": "str"},
        "machine_id": {"type": "str"},
        "kernel": {"type": "path"},
        "initrd": {"type": "path"},
        "kernel_args": {"type": "str", "default": ""},
        "ssh_authorized_key": {"type": "str", "no_log": False},
        "domain_type": {"type": "str", "choices": ["kvm", "qemu"], "default": "kvm"},
        "cpu_model": {"type": "str"},
        "serial_log": {"type": "path"},
        "uri": {"type": "str", "default": "qemu:///system"},
    }


def run_module() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    if libvirt is None:
        module.fail_json(msg=missing_required_lib("libvirt-python"))
    params = module.params
    try:
        validate(params)
        conn = libvirt.open(params["uri"])
    except CloneError as error:
        module.fail_json(msg=str(error))
    except libvirt.libvirtError as error:
        module.fail_json(msg=f"cannot connect to {params['uri']}: {error}")
    try:
        if params["state"] == "present":
            changed, identity = ensure_present(conn, params, module.check_mode)
            module.exit_json(changed=changed, clone=asdict(identity))
        changed = ensure_absent(conn, params, module.check_mode)
        module.exit_json(changed=changed, clone={})
    except CloneError as error:
        module.fail_json(msg=str(error))
    finally:
        conn.close()


def main() -> None:
    run_module()


if __name__ == "__main__":
    main()
