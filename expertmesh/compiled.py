"""``mx.compile`` for decode-sized steps.

On MLX's CPU backend most of a small step's time is per-op dispatch, and a
compiled function runs the same kernels with its elementwise ops fused, so
in fewer dispatches. Each new input shape is a new trace, so only shapes that
repeat (one token per row) are compiled; prefill shapes vary per prompt and
run as they are. ``EXPERTMESH_COMPILE=0`` turns it off, for A/B measurements
(benchmarks/README.md).
"""

from __future__ import annotations

import os
from typing import Callable

import mlx.core as mx

ENABLED = os.environ.get("EXPERTMESH_COMPILE", "1") != "0"


def for_decode(fn: Callable) -> Callable:
    """``fn`` compiled (``fn`` itself when compiling is off)."""
    return mx.compile(fn) if ENABLED else fn
