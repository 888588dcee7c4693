"""A LAN of network namespaces: each host is a namespace with one veth into a
Linux bridge that lives in a namespace of its own (the switch).

Nothing here touches the machine's own network namespace, so mDNS in these
tests never reaches a real interface. Names carry our pid; namespaces left
by a test run that died are swept before a new LAN is made.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import pytest

from expertmesh.testing import netns

IFACE = "mesh0"  # every host's one interface; no such interface exists outside these namespaces
_PREFIX = "emtest"


@dataclass
class Host:
    ns: netns.Namespace
    ip: str

    @property
    def prefix(self) -> list[str]:
        return self.ns.prefix

    def unplug(self) -> None:
        self.ns.ip("link", "set", IFACE, "down")

    def plug(self) -> None:
        self.ns.ip("link", "set", IFACE, "up")


class Lan:
    """``Lan(tag)``; ``host(name)`` adds a host at the next address; ``close()`` removes everything."""

    def __init__(self, tag: str, subnet: str = "10.77.0"):
        self.tag, self.subnet = tag, subnet
        self.hosts: dict[str, Host] = {}
        self.switch = netns.Namespace(f"{tag}-switch")
        try:
            self.switch.ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            self.switch.ip("link", "set", "br0", "up")
        except OSError:
            self.close()
            raise

    def host(self, name: str) -> Host:
        n = len(self.hosts) + 2
        ns = netns.Namespace(f"{self.tag}-{name}")
        host = self.hosts[name] = Host(ns, f"{self.subnet}.{n}")
        ns.ip("link", "add", IFACE, "type", "veth", "peer", "name", f"port{n}", "netns", self.switch.name)
        ns.ip("addr", "add", f"{host.ip}/24", "dev", IFACE)
        ns.ip("link", "set", IFACE, "up")
        self.switch.ip("link", "set", f"port{n}", "master", "br0", "up")
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            host.ns.delete()
        self.switch.delete()


def _sweep_stale() -> None:
    """Delete namespaces of earlier test runs whose process is gone."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in names:
        if (m := re.match(rf"{_PREFIX}(\d+)-", name)) and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def make_lan(*hosts: str) -> Lan:
    """A LAN with these hosts, or a skip saying why it cannot be made here."""
    if why := netns.unavailable():
        pytest.skip(f"needs network namespaces: {why}")
    _sweep_stale()
    try:
        lan = Lan(f"{_PREFIX}{os.getpid()}")
    except OSError as e:
        pytest.skip(f"cannot make a network namespace with a bridge: {e}")
    try:
        for name in hosts:
            lan.host(name)
    except BaseException:
        lan.close()
        raise
    return lan
