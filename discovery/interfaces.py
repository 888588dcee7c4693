"""``--interface NAME_OR_IP``: which network interfaces mDNS runs on.

Every value becomes an IPv4 address of this machine; zeroconf is only ever
given that explicit list, so nothing is sent on an interface nobody chose.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import ifaddr

from expertmesh.errors import DiscoveryError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Interface:
    name: str     # "en0", "bridge0", "eth0", "lo"
    ip: str       # its IPv4 address
    prefix: int   # network prefix length

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"{self.ip}/{self.prefix}", strict=False)

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.ip).is_loopback


def local_interfaces() -> list[Interface]:
    """Every IPv4 address of this machine, with its interface's name."""
    return [Interface(a.nice_name, ip.ip, ip.network_prefix)
            for a in ifaddr.get_adapters() for ip in a.ips if ip.is_IPv4]


def _listing(found: list[Interface]) -> str:
    return ", ".join(f"{i.name} ({i.ip})" for i in found) or "none"


def resolve_interfaces(specs: list[str]) -> list[Interface]:
    """The interfaces named by ``--interface`` values (names or IPv4 addresses).

    With no values: every non-loopback interface with an IPv4 address, or
    loopback when the machine has nothing else.

    Raises:
        DiscoveryError: a value names no interface of this machine, or an
            interface without an IPv4 address.
    """
    found = local_interfaces()
    if not specs:
        chosen = [i for i in found if not i.is_loopback]
        if not chosen:
            chosen = [i for i in found if i.is_loopback]
            logger.warning("no network interface besides loopback: mDNS stays on this machine")
        return chosen
    chosen: list[Interface] = []
    for spec in specs:
        match = [i for i in found if spec in (i.name, i.ip)]
        if not match:
            raise DiscoveryError(f"no interface {spec!r} with an IPv4 address on this machine; "
                                 f"there are: {_listing(found)}")
        chosen += [i for i in match if i not in chosen]
    return chosen


def reachable_first(addresses: list[str], interfaces: list[Interface]) -> list[str]:
    """``addresses`` with those on the subnets of ``interfaces`` first."""
    def on_our_subnet(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in i.network for i in interfaces)
    return sorted(addresses, key=lambda a: not on_our_subnet(a))
