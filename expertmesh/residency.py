"""Weights that stay resident on Apple silicon.

macOS may page a process's GPU buffers out when they are not wired; mlx-lm's
``generate`` wires them up to Metal's recommended working-set size around
its loop (``mx.set_wired_limit``), and nodes and the router do the same
around serving. A 16 GB Mac offers Metal about 10.7 GB of working set unless
``sudo sysctl iogpu.wired_limit_mb=N`` raises it, so a node's default memory
budget follows that size rather than total RAM. Off Apple silicon there is no
working set to wire into: a no-op, said once in the log.
"""

from __future__ import annotations

import logging

import mlx.core as mx
from mlx_lm.utils import maybe_set_recommended_wired_limit

logger = logging.getLogger(__name__)

# share of the working set (Metal) or of RAM (elsewhere) a node offers for weights by default;
# above 0.9 of the working set mlx-lm warns that generation gets slow
WORKING_SET_SHARE = 0.9
RAM_SHARE = 0.75


def working_set_bytes(info: dict | None = None) -> int | None:
    """Metal's recommended working-set size (``mx.device_info()``), or None off Apple silicon."""
    info = mx.device_info() if info is None else info
    size = info.get("max_recommended_working_set_size")
    return int(size) if size else None


def default_budget(physical: int, info: dict | None = None) -> int:
    """A node's default memory budget for weights: 90% of the working set
    where Metal reports one, else 75% of ``physical`` RAM."""
    working_set = working_set_bytes(info)
    if working_set is None:
        return int(RAM_SHARE * physical)
    return int(WORKING_SET_SHARE * min(working_set, physical))


class WiredLimit:
    """``start()`` wires weights up to the working set (as mlx-lm's
    ``generate`` does), ``stop()`` restores the previous limit."""

    def __init__(self, what: str):
        self.what = what
        self._previous: int | None = None

    def start(self) -> None:
        self._previous = maybe_set_recommended_wired_limit()
        if self._previous is None:
            logger.info("%s: %s reports no Metal working set, so weights are not wired (nothing to do off Apple "
                        "silicon)", self.what, mx.default_device())
        else:
            logger.info("%s: weights wired up to Metal's working set of %.1f GB", self.what,
                        working_set_bytes() / 1e9)

    def stop(self) -> None:
        if self._previous is not None:
            mx.set_wired_limit(self._previous)
            self._previous = None
