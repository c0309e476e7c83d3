"""Which addresses lie in which networks, an IPv4 address counted in both its spellings.

A dual-stack socket connects to `::ffff:169.254.169.254` as to 169.254.169.254, so an address is
matched as the address a connection reaches, and that, when IPv4, also in its IPv4-mapped IPv6 form:
a network written either way holds it. Used to keep tenants' backends off the cloud metadata endpoint
and the gateway's own loopback (`ownership.denied_backend_networks`).
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

_MAPPED = int(IPv6Address("::ffff:0.0.0.0"))


def denied_network(address: IPAddress, networks: Iterable[IPNetwork]) -> IPNetwork | None:
    """The first of `networks` that holds `address` (see the module), or None."""
    reached = (address.ipv4_mapped if isinstance(address, IPv6Address) else None) or address
    forms = (reached, IPv6Address(_MAPPED | int(reached))) if isinstance(reached, IPv4Address) else (reached,)
    for network in networks:
        if any(form in network for form in forms):
            return network
    return None
