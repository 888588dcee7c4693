"""Finding nodes: mDNS (``_expertmesh._tcp.local.``) and static ``--peer`` lists.

Nodes run an ``Advertiser``; routers run a ``Browser``. Both use only the
interfaces ``resolve_interfaces`` returns. This package hands out addresses
and what nodes say about themselves; it knows nothing of routers or nodes.
"""

from expertmesh.discovery.advertiser import TTL, Advertiser
from expertmesh.discovery.browser import Announcement, Browser
from expertmesh.discovery.interfaces import Interface, local_interfaces, resolve_interfaces
from expertmesh.discovery.peers import parse_peers
from expertmesh.discovery.record import SERVICE_TYPE, STATES, Bounds, NodeRecord

__all__ = ["Advertiser", "Announcement", "Bounds", "Browser", "Interface", "NodeRecord", "SERVICE_TYPE", "STATES",
           "TTL", "local_interfaces", "parse_peers", "resolve_interfaces"]
