"""Browser: a live view of the ``_expertmesh._tcp`` services on the chosen interfaces."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

from expertmesh.discovery.interfaces import Interface, reachable_first
from expertmesh.discovery.mdns import MDNS
from expertmesh.discovery.record import SERVICE_TYPE, Bounds, NodeRecord

logger = logging.getLogger(__name__)

_RESOLVE_MS = 3000
MAX_INSTANCES = 256  # nodes followed at once; others announced meanwhile are ignored until some leave


@dataclass(frozen=True)
class Announcement:
    """One node as mDNS describes it."""

    instance: str                  # unique on the network: "mini", "mini-2"
    addresses: tuple[str, ...]     # IPv4, those on our subnets first
    port: int
    record: NodeRecord | None      # None when the TXT record could not be read
    problem: str = ""              # why it could not

    @property
    def address(self) -> str:
        return f"{self.addresses[0]}:{self.port}" if self.addresses else f"?:{self.port}"


# (instance, announcement) when a node appears or changes; (instance, None) when it leaves
Listener = Callable[[str, "Announcement | None"], None]


class Browser:
    """Browses continuously; calls ``listener`` on zeroconf's event loop, so
    the listener must not block (put the news on a queue).

    Records are read within ``bounds`` (see record.py; a router sets its
    model's counts); one that is malformed or too large is announced with
    ``record=None`` and the reason. At most ``max_instances`` nodes are followed.

    Raises:
        DiscoveryError: mDNS cannot run on ``interfaces``.
    """

    def __init__(self, interfaces: list[Interface], listener: Listener, bounds: Bounds = Bounds(),
                 max_instances: int = MAX_INSTANCES):
        self._listener = listener
        self.bounds = bounds
        self.max_instances = max_instances
        self._resolving: dict[str, asyncio.Task] = {}  # name -> task; touched on the loop only
        self._known: set[str] = set()                   # names announced to the listener; the loop only
        self._ignoring = False                          # at max_instances (logged once per episode)
        self.mdns = MDNS(interfaces)
        self._browser: AsyncServiceBrowser | None = None

        async def start():
            self._browser = AsyncServiceBrowser(self.mdns.zc, SERVICE_TYPE, handlers=[self._on_change])
        self.mdns.submit(start()).result(10)

    def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        instance = name[: -len(SERVICE_TYPE) - 1]
        if not instance.isprintable():  # it would end up in log lines
            logger.debug("mDNS: ignoring an instance name with control characters: %r", instance[:80])
            return
        if task := self._resolving.pop(name, None):
            task.cancel()
        if state_change is ServiceStateChange.Removed:
            if name in self._known:
                self._known.discard(name)
                self._listener(instance, None)
            return
        room = len(self._known.union(self._resolving)) < self.max_instances
        self._ignoring = self._ignoring and not room
        if name in self._known or room:
            self._resolving[name] = asyncio.ensure_future(self._resolve(name, instance))
        elif not self._ignoring:
            self._ignoring = True
            logger.warning("mDNS: following %d nodes already; ignoring %s and others until some leave",
                           self.max_instances, instance)

    async def _resolve(self, name: str, instance: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        found = await info.async_request(self.mdns.zc, _RESOLVE_MS)
        self._resolving.pop(name, None)
        if not found:
            logger.debug("%s announced itself but did not answer", name)
            return
        addresses = reachable_first(info.parsed_addresses(IPVersion.V4Only), self.mdns.interfaces)
        try:
            record, problem = NodeRecord.from_txt(info.properties, self.bounds), ""
        except ValueError as e:
            record, problem = None, f"unreadable TXT record: {e}"
        self._known.add(name)
        self._listener(instance, Announcement(instance, tuple(addresses[:8]), info.port or 0, record, problem))

    def close(self) -> None:
        async def stop():
            for task in self._resolving.values():
                task.cancel()
            if self._browser is not None:
                await self._browser.async_cancel()
        try:
            self.mdns.submit(stop()).result(10)
        finally:
            self.mdns.close()
