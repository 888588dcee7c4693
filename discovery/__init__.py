"""Finding nodes: mDNS (``_expertmesh._tcp.local.``) and static ``--peer`` lists.

Nodes run an ``Advertiser``; routers run a ``Browser``. Both use only the
interfaces ``resolve_interfaces`` returns. This package hands out addresses
and what nodes say about themselves; it knows nothing of routers or nodes.
"""

from .advertiser import TTL, Advertiser
from .browser import Announcement, Browser
from .interfaces import Interface, local_interfaces, resolve_interfaces
from .peers import parse_peers
from .record import SERVICE_TYPE, STATES, Bounds, NodeRecord

__all__ = ["Advertiser", "Announcement", "Bounds", "Browser", "Interface", "NodeRecord", "SERVICE_TYPE", "STATES",
           "TTL", "local_interfaces", "parse_peers", "resolve_interfaces"]
