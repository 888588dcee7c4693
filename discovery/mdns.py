"""One zeroconf instance on an explicit list of interfaces, and its event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Coroutine

from zeroconf import IPVersion, Zeroconf

from expertmesh.discovery.interfaces import Interface
from expertmesh.errors import DiscoveryError


class MDNS:
    """zeroconf on ``interfaces`` only (never ``InterfaceChoice.All``).

    zeroconf runs its own event loop thread; ``submit`` hands it coroutines.

    Raises:
        DiscoveryError: a socket cannot join the mDNS group on an interface.
    """

    def __init__(self, interfaces: list[Interface]):
        if not interfaces:
            raise DiscoveryError("no interface to run mDNS on")
        self.interfaces = interfaces
        try:
            self.zc = Zeroconf(interfaces=[i.ip for i in interfaces], ip_version=IPVersion.V4Only)
        except OSError as e:
            names = ", ".join(f"{i.name} ({i.ip})" for i in interfaces)
            raise DiscoveryError(f"cannot run mDNS on {names}: {e.strerror or e} "
                                 "(does the interface support multicast?)") from None

    def submit(self, coro: Coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.zc.loop)

    def close(self) -> None:
        self.zc.close()
