"""Linux network namespaces: several "hosts" on one machine for ``make demo`` and the tests.

mDNS inside a namespace never reaches the machine's real network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def unavailable() -> str:
    """Why network namespaces cannot be made here ("" when they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "not root (making a network namespace needs CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return ""


def ip(*args: str) -> None:
    """Run ``ip ARGS``.

    Raises:
        OSError: it failed; the message is ip's own.
    """
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit code {done.returncode}'}")


class Namespace:
    """A network namespace of our own: ``Namespace(name)`` makes it, ``delete()`` removes it
    (and every interface in it).

    Raises:
        OSError: it cannot be made (no permission, name taken).
    """

    def __init__(self, name: str):
        ip("netns", "add", name)
        self.name = name
        try:
            self.ip("link", "set", "lo", "up")
        except OSError:
            self.delete()
            raise

    @property
    def prefix(self) -> list[str]:
        """What runs a command inside: ``[*ns.prefix, "python", ...]``."""
        return ["ip", "netns", "exec", self.name]

    def ip(self, *args: str) -> None:
        ip("-n", self.name, *args)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
