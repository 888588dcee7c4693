"""``mx.compile`` for decode steps.

On MLX's CPU backend most of a small step's time is per-op dispatch, and a
compiled function runs the same kernels with its elementwise ops fused, so
in fewer dispatches. Each new input shape is a new trace, so only shapes that
repeat (one token per row) are compiled; prefill shapes vary per prompt and
run as they are. ``--no-compile`` (``NodeConfig.compile``; the router's flag
calls :func:`configure`) turns it off, for A/B measurements (benchmarks/README.md).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

_enabled = True


def configure(enabled: bool) -> None:
    """Whether the decode steps built from now on in this process are compiled
    (``mx.compile``'s traces are per process, so the choice is too).

    Raises:
        ValueError: ``enabled`` is not a bool.
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise ValueError(f"compile must be True or False, not {enabled!r}")
    _enabled = enabled


def enabled() -> bool:
    """Whether decode steps built now are compiled (see :func:`configure`)."""
    return _enabled


def for_decode(fn: Callable) -> Callable:
    """``fn`` compiled (``fn`` itself when compiling is off)."""
    return mx.compile(fn) if _enabled else fn


def dense_helps() -> bool:
    """Whether the small graphs of a decoder layer's dense part (norms, RoPEs,
    a gate) are compiled: on MLX's CPU backend, where per-op dispatch is most
    of their time. Not on a GPU, where mlx-lm runs them as they are, and
    where compiled they were slower: a router layer took 372 µs compiled
    against 303 µs not, with a sync each (``benchmarks/hotpath.py``, H200)."""
    return _enabled and mx.default_device().type == mx.DeviceType.cpu


def for_dense(fn: Callable) -> Callable:
    """``fn`` compiled where :func:`dense_helps`, else ``fn`` itself."""
    return mx.compile(fn) if dense_helps() else fn


class DecodeStep(nn.Module):
    """``module`` compiled for inputs with one position per row (``x.shape[axis]
    == 1``). Arguments must be arrays, since a Python number would be baked
    into the trace and every new value would trace again; Python ints (a
    single sequence's KV offset) are passed as arrays for that reason."""

    def __init__(self, module: nn.Module, axis: int):
        super().__init__()
        self.module = module
        self._axis = axis
        self._step = for_decode(module.__call__)

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        if x.shape[self._axis] == 1:
            args = tuple(_as_array(a) for a in args)
            kwargs = {k: _as_array(v) for k, v in kwargs.items()}
            if all(isinstance(a, mx.array) for a in (*args, *kwargs.values())):
                return self._step(x, *args, **kwargs)
        return self.module(x, *args, **kwargs)


def _as_array(a):
    return mx.array(a) if type(a) is int else a


def compile_decode_steps(model: nn.Module) -> None:
    """Compile ``model``'s RMSNorms ([B, L, ...] inputs) and RoPEs ([B, heads,
    L, D]; offsets as arrays, as batched caches give them) for decode steps,
    in place. Call it after the weights are loaded: the wrappers move their
    modules' parameters one level down. Nothing changes where
    :func:`dense_helps` says no."""
    if not dense_helps():
        return
    found = [(parent, name, child) for _, parent in model.named_modules()
             for name, child in parent.children().items()
             if isinstance(child, nn.RMSNorm) or (name == "rope" and isinstance(child, nn.Module))]
    for parent, name, child in found:
        setattr(parent, name, DecodeStep(child, 1 if isinstance(child, nn.RMSNorm) else -2))
