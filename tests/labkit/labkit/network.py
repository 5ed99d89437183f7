"""A node's addresses as its own interfaces report them, for the lab toolkit and the testinfra suites alike."""

from __future__ import annotations


def interface_address_command(interface: str) -> str:
    return f"ip -o -4 addr show dev {interface}"


def interface_address(listing: str) -> str | None:
    """The IPv4 address in what interface_address_command printed; None for an interface without one."""
    fields = listing.split()
    return fields[3].split("/")[0] if len(fields) > 3 else None
