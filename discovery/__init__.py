"""Finding nodes. For now: the static ``--peer HOST:PORT`` list (mDNS comes next)."""

from .peers import parse_peers

__all__ = ["parse_peers"]
