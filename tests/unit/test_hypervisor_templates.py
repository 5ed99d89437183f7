"""The hypervisor role's libvirt network: bridged to the host's bridge in production, isolated in the lab."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import jinja2
import yaml

ROLE = Path(__file__).resolve().parents[2] / "roles" / "hypervisor"


def network(**overrides: object) -> ET.Element:
    variables = {**yaml.safe_load((ROLE / "defaults" / "main.yml").read_text()), **overrides}
    template = jinja2.Template((ROLE / "templates" / "network.xml.j2").read_text())
    return ET.fromstring(template.render(**variables))


def test_production_vms_join_the_host_bridge_and_libvirt_hands_out_no_addresses() -> None:
    xml = network(hypervisor_bridge="br0")
    assert xml.find("forward").get("mode") == "bridge"
    assert xml.find("bridge").get("name") == "br0"
    assert xml.find("ip") is None


def test_the_lab_network_is_isolated_with_fixed_leases() -> None:
    leases = [{"mac": "52:54:00:77:00:0c", "ip": "10.77.0.12"}]
    xml = network(hypervisor_network_mode="isolated", hypervisor_bridge="cfbr77", hypervisor_dhcp_hosts=leases)
    assert xml.find("forward") is None, "an isolated network has no way out"
    assert xml.find("ip").get("address") == "10.77.0.1"
    assert xml.find("ip/dhcp/range").attrib == {"start": "10.77.0.100", "end": "10.77.0.199"}
    assert [host.attrib for host in xml.findall("ip/dhcp/host")] == leases
