"""Static peers given on the command line."""

from __future__ import annotations


def parse_peers(peers: list[str]) -> list[str]:
    """Validate ``HOST:PORT`` peers, dropping duplicates, keeping order.

    Raises:
        ValueError: a peer is not ``HOST:PORT`` with a port in 1..65535.
    """
    out: list[str] = []
    for peer in peers:
        host, sep, port = peer.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"peer {peer!r} is not HOST:PORT")
        if peer not in out:
            out.append(peer.strip())
    return out
