"""Advertiser: a node announces itself as ``INSTANCE._expertmesh._tcp.local.``."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading

from zeroconf import ServiceInfo

from expertmesh.discovery.interfaces import Interface
from expertmesh.discovery.mdns import MDNS
from expertmesh.discovery.record import SERVICE_TYPE, NodeRecord

logger = logging.getLogger(__name__)

# Seconds a router may remember a node that vanished without a goodbye
# (host unplugged): routers re-query before it runs out, so live nodes stay.
TTL = 30
_TIMEOUT = 10.0


class Advertiser:
    """Registers one node over mDNS and keeps its TXT record current.

    ``start()`` probes the name first: a second node called ``mini`` becomes
    ``mini-2``. ``update(record)`` republishes the TXT record; ``close()``
    sends goodbye packets so routers drop the node at once.

    Raises:
        DiscoveryError: mDNS cannot run on ``interfaces``.
    """

    def __init__(self, instance: str, port: int, addresses: list[str], interfaces: list[Interface],
                 record: NodeRecord, ttl: int = TTL):
        self._lock = threading.Lock()
        self._registered = False
        self._announcing: asyncio.Future | None = None  # the latest update's announcements; event loop only
        host = re.sub(r"[^A-Za-z0-9-]+", "-", instance).strip("-")[:40] or "node"
        # a host name of our own: two machines with one host name must not share address records
        self.info = ServiceInfo(SERVICE_TYPE, f"{instance[:63]}.{SERVICE_TYPE}", port=port,
                                parsed_addresses=addresses, properties=record.to_txt(),
                                server=f"{host}-{secrets.token_hex(3)}.local.", host_ttl=ttl, other_ttl=ttl)
        self.mdns = MDNS(interfaces)

    @property
    def instance(self) -> str:
        """The name routers see; differs from the one asked for after a collision."""
        return self.info.name[: -len(SERVICE_TYPE) - 1]

    def start(self) -> str:
        """Probe, rename on collision, announce. Returns the instance name."""
        async def register():
            await (await self.mdns.zc.async_register_service(self.info, allow_name_change=True))
        with self._lock:  # an update waits: probing may rename the record it would copy
            self.mdns.submit(register()).result(_TIMEOUT)
            self._registered = True
        logger.info("advertising %s on %s", self.info.name,
                    ", ".join(f"{i.name} ({i.ip})" for i in self.mdns.interfaces))
        return self.instance

    def update(self, record: NodeRecord) -> None:
        """Publish a new TXT record; returns once answers carry it (announcements follow)."""
        async def publish(info: ServiceInfo):
            self._stop_announcing()  # an older record announced after this one would win in caches
            self._announcing = await self.mdns.zc.async_update_service(info)
        with self._lock:
            info = self.info
            self.info = ServiceInfo(SERVICE_TYPE, info.name, port=info.port, parsed_addresses=info.parsed_addresses(),
                                    properties=record.to_txt(), server=info.server,
                                    host_ttl=info.host_ttl, other_ttl=info.other_ttl)
            if self._registered:
                self.mdns.submit(publish(self.info)).result(_TIMEOUT)

    def _stop_announcing(self) -> None:  # on the event loop
        if self._announcing is not None:
            self._announcing.cancel()

    def close(self) -> None:
        """Say goodbye (when registered) and stop zeroconf."""
        async def unregister():
            self._stop_announcing()
            await (await self.mdns.zc.async_unregister_service(self.info))
        try:
            with self._lock:
                if self._registered:
                    self._registered = False
                    self.mdns.submit(unregister()).result(_TIMEOUT)
        finally:
            self.mdns.close()
